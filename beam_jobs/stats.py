"""Print and plot what a built FDH dataset holds: licences, splits, and the funnel that made it.

    python -m beam_jobs.stats --dataset=OUT [--plots_dir=DIR]

Prints a table of samples, bytes and share per licence and split (from manifest.json, so it is
right after a takedown too) and the funnel from stats.json (lines read, rejected per stage and
reason, samples kept). Writes `license_pie.png` (samples per licence, like FDH's README figure)
and `funnel.png` (a bar chart of the funnel) into the dataset dir or --plots_dir (local or gs://).

A plain command line, not a Beam pipeline: it reads two small JSON files. Exit status 2 when
--dataset is not a dataset.
"""
from __future__ import annotations

import io
import os
import re
from collections import Counter
from typing import Any, Optional, Sequence

from beam_jobs.common import JobOptions, run_main, split_job_flags
from dataset import fs
from dataset.layout import STATS_FILE
from dataset.manifest import load_manifest
from dataset.stats import annotation_store_lines, funnel_steps, human_bytes, license_rows

PIE_FILE = "license_pie.png"
FUNNEL_FILE = "funnel.png"


class StatsOptions(JobOptions):
    """Flags of the stats job."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument("--dataset", required=True,
                            help="Root of a built dataset (local path or gs://).")
        parser.add_argument("--plots_dir", default=None,
                            help=f"Where to write {PIE_FILE} and {FUNNEL_FILE} "
                                 "(default: the dataset dir).")


def without_single_split_totals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The licence rows less the 'all' row of a licence with one split (it would repeat it)."""
    splits = Counter(r["license"] for r in rows if r["split"] != "all")
    return [r for r in rows
            if not (r["split"] == "all" and r["license"] != "total" and splits[r["license"]] == 1)]


def license_table(shards: Sequence[dict[str, Any]]) -> str:
    """The licence x split table as text (sizes in B/KiB/MiB/..., never '0.0 MiB')."""
    rows = without_single_split_totals(license_rows(shards))
    return format_table(
        ("licence", "split", "shards", "samples", "size", "share"),
        [(r["license"], r["split"], r["shards"], f"{r['samples']:,}",
          human_bytes(r["bytes"]), f"{r['percent']:.1f}%") for r in rows])


def funnel_table(steps: Sequence[tuple[str, int]]) -> str:
    """The funnel as text: each row's count and its share of the first row (the lines read)."""
    first = steps[0][1] if steps and steps[0][1] else 0
    return format_table(
        ("step", "count", "of first"),
        [(label, f"{count:,}", f"{100.0 * count / first:.1f}%" if first else "-")
         for label, count in steps])


def _figure_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def license_pie_png(shards: Sequence[dict[str, Any]], title: str = "FDH samples per licence") -> bytes:
    """PNG bytes of a pie chart of samples per licence (labels with counts and shares)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = [r for r in license_rows(shards) if r["split"] == "all" and r["license"] != "total"]
    figure = Figure(figsize=(6.4, 4.8))
    axes = figure.subplots()
    counts = [r["samples"] for r in rows]
    if sum(counts) == 0:
        axes.text(0.5, 0.5, "no samples", ha="center", va="center", fontsize=14)
        axes.set_axis_off()
    else:
        labels = [f"{r['license']}\n{r['samples']:,} ({human_bytes(r['bytes'])})"
                  for r in rows]
        axes.pie(counts, labels=labels, autopct="%1.1f%%", startangle=90, counterclock=False,
                 wedgeprops={"linewidth": 1, "edgecolor": "white"}, textprops={"fontsize": 9})
        axes.axis("equal")
    axes.set_title(f"{title} (total {sum(counts):,})")
    return _figure_bytes(figure)


def funnel_png(steps: Sequence[tuple[str, int]], title: str = "Rebuild funnel") -> bytes:
    """PNG bytes of a horizontal bar chart of the funnel, first step on top, counts on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 0.45 * max(len(steps), 2) + 1.2))
    axes = figure.subplots()
    labels = [label for label, _ in steps]
    counts = [count for _, count in steps]
    positions = list(range(len(steps)))
    # Steps blue, the rejects taken out between them (labels "  - stage.reason") red.
    colors = ["#c0504d" if label.lstrip().startswith("- ") else "#4f81bd" for label in labels]
    if steps:
        colors[-1] = "#9bbb59"  # what is left: the samples in the dataset
    axes.barh(positions, counts, color=colors)
    axes.set_yticks(positions, labels=labels, fontsize=9)
    axes.invert_yaxis()
    peak = max(counts, default=0) or 1
    smallest = min((c for c in counts if c > 0), default=1)
    log = peak / smallest > 1000  # 100M lines read next to a few hundred rejects
    for position, count in zip(positions, counts):
        axes.text(count * 1.05 if log else count + peak * 0.01, position, f"{count:,}",
                  va="center", fontsize=8)
    if log:
        axes.set_xscale("log")
        axes.set_xlim(max(smallest / 2, 0.5), peak * 5)
    else:
        axes.set_xlim(0, peak * 1.15)
    axes.set_xlabel("count (log scale)" if log else "count")
    axes.set_title(title)
    return _figure_bytes(figure)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table, numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_numberish(r[i]) for r in cells[1:]) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(r, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _numberish(text: str) -> bool:
    return bool(re.match(r"^[-+]?[\d,.]+( ?%| [KMGT]?i?B)?$", text))


def run(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Print the tables and write the PNGs; returns {"license_pie": path, "funnel": path}."""
    args, _ = split_job_flags(StatsOptions, argv, __doc__)
    dataset = args.dataset.rstrip("/")
    shards = load_manifest(dataset).get("shards", [])
    stats: dict[str, Any] = {}
    if fs.exists(fs.join(dataset, STATS_FILE)):
        stats = fs.load_json(dataset, STATS_FILE)
    steps = funnel_steps(stats)

    print(f"Dataset {dataset}: licence distribution")
    print(license_table(shards))
    print()
    if steps:
        print("Funnel (stats.json)")
        print(funnel_table(steps))
    else:
        print(f"Funnel: no funnel counts in {STATS_FILE}")

    for line in annotation_store_lines(dataset):
        print(line)
    out = (args.plots_dir or dataset).rstrip("/")
    if args.plots_dir and "://" not in out:
        os.makedirs(out, exist_ok=True)
    written = {"license_pie": fs.join(out, PIE_FILE), "funnel": fs.join(out, FUNNEL_FILE)}
    fs.write_bytes_atomic(written["license_pie"], license_pie_png(shards))
    fs.write_bytes_atomic(written["funnel"], funnel_png(steps))
    print()
    print(f"Wrote {written['license_pie']} and {written['funnel']}")
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(run, argv)


if __name__ == "__main__":
    main()
