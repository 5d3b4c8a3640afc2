"""What a dataset holds: the pure core of `beam_jobs.stats` (the job formats and plots it).

Counts come from the manifest's shard entries (the same `build_stats` that writes stats.json);
the funnel from stats.json's "funnel" block (transforms.funnel's order).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from dataset.annotations import default_store, store_stats
from dataset.schema import build_stats
from transforms.funnel import funnel_rows


def funnel_steps(stats: Mapping[str, Any]) -> list[tuple[str, int]]:
    """The funnel of stats.json as (label, count) rows, top-down (transforms.funnel.funnel_rows),
    closed by the samples in the dataset now (its "totals", after any takedown)."""
    steps = [(label, count) for label, count, _ in funnel_rows(stats.get("funnel") or {})]
    totals = stats.get("totals") or {}
    if "samples" in totals:
        steps.append(("samples in the dataset", int(totals["samples"])))
    return steps


def counts_by_license_split(shards: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
    """{licence: {split: {"samples", "bytes", "shards"}}} over manifest shard entries (stats.json's
    "written" block, computed by the same `build_stats`)."""
    return build_stats(list(shards))["written"]


def license_rows(shards: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the licence table: licence, split, shards, samples, bytes, % of all samples.

    Each licence has one row per split and an 'all' row; a last row totals the dataset.
    """
    table = counts_by_license_split(shards)
    total_samples = sum(c["samples"] for splits in table.values() for c in splits.values())
    total_bytes = sum(c["bytes"] for splits in table.values() for c in splits.values())

    def row(license_: str, split: str, shards_: int, samples: int, size: int) -> dict[str, Any]:
        share = 100.0 * samples / total_samples if total_samples else 0.0
        return {"license": license_, "split": split, "shards": shards_, "samples": samples,
                "bytes": size, "percent": share}

    rows = []
    for license_, splits in table.items():
        for split, cell in splits.items():
            rows.append(row(license_, split, cell["shards"], cell["samples"], cell["bytes"]))
        rows.append(row(license_, "all", sum(c["shards"] for c in splits.values()),
                        sum(c["samples"] for c in splits.values()),
                        sum(c["bytes"] for c in splits.values())))
    rows.append(row("total", "all", sum(r["shards"] for r in rows if r["split"] == "all"),
                    total_samples, total_bytes))
    return rows


def human_bytes(size: float) -> str:
    """`size` bytes in B, KiB, MiB, GiB or TiB (one decimal above bytes)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def annotation_store_lines(dataset: str, store: Optional[str] = None) -> list[str]:
    """One line per model key of the annotation store (default DATASET/annotations): entries,
    annotated / rejected, files, bytes and the annotator; nothing when there is no store."""
    stats = store_stats(store or default_store(dataset))
    return [f"Annotation store {stats['store']}: model {key} ({model['versions'].get('annotator')}): "
            f"{model['entries']} entries ({model['annotated']} annotated, {model['rejected']} rejected), "
            f"{model['files']} files, {human_bytes(model['bytes'])}"
            for key, model in sorted(stats["models"].items())]
