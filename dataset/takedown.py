"""Remove users' or photos' samples from a built dataset: the core of `beam_jobs.takedown`.

Per shard: find the matches from its Parquet key/user/photo columns (`find_shard_matches`), then
rewrite the tar without them (kept members byte for byte) and stage the filtered Parquet rows
beside it (`rewrite_shard`). Once: fold the rewrites into manifest.json, metadata.json,
stats.json and opt_out.txt, then move the staged Parquet files into place (`update_run_files`).
The Parquet files move last: they are the index a re-run searches, so an interrupted takedown
finishes when run again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from dataset import fs
from dataset.annotations import default_store, remove_entries
from dataset.layout import (MANIFEST_FILE, METADATA_FILE, OPT_OUT_FILE, STAGED_SUFFIX, STATS_FILE,
                            shard_parquet_path)
from dataset.manifest import load_manifest, save_manifest
from dataset.metadata import metadata_entries, write_metadata_json
from dataset.schema import KEY_COLUMN, build_stats
from dataset.search import Match, read_search_table, table_matches
from dataset.shards import read_parquet_rows, read_tar_shard, write_parquet_shard, write_tar_shard
from transforms.funnel import TAKEDOWN_KEY
from transforms.opt_out import OptOut, format_opt_out, validate_opt_out, parse_opt_out


@dataclass
class ShardFilter:
    """The result of dropping samples from one shard's raw members."""

    kept: list[dict[str, Any]]
    removed: list[str]


def filter_members(members: Iterable[Mapping[str, Any]], drop_keys: Iterable[str]) -> ShardFilter:
    """Keep the raw member dicts whose `__key__` is not in `drop_keys`, in file order.

    The members' bytes are passed through untouched, so the kept samples are byte-identical
    after the shard is written again.
    """
    drop = set(drop_keys)
    kept, removed = [], []
    for member in members:
        (removed.append(member["__key__"]) if member["__key__"] in drop else kept.append(dict(member)))
    return ShardFilter(kept, removed)


def filter_rows(rows: Iterable[Mapping[str, Any]], drop_keys: Iterable[str]) -> list[dict[str, Any]]:
    """Parquet rows whose key is not in `drop_keys`, in their order."""
    drop = set(drop_keys)
    return [dict(row) for row in rows if row[KEY_COLUMN] not in drop]


def new_opt_out_lines(existing: OptOut, request: OptOut,
                      reasons: Optional[Mapping[str, str]] = None) -> str:
    """Opt-out file text for the entries of `request` that `existing` does not hold yet; a line
    found in `reasons` ({'photo:ID': why}) gets its reason as a trailing `# comment`."""
    text = format_opt_out(request.user_nsids - existing.user_nsids,
                          request.photo_ids - existing.photo_ids)
    return with_reasons(text, reasons or {})


def with_reasons(text: str, reasons: Mapping[str, str]) -> str:
    """Opt-out lines with `  # reason` appended where `reasons` has one (one line, white space
    collapsed). The opt-out parser ignores comments, so the entries read back the same."""
    lines = []
    for line in text.splitlines():
        reason = " ".join(reasons.get(line, "").split())
        lines.append(f"{line}  # {reason}\n" if reason else line + "\n")
    annotated = "".join(lines)
    if parse_opt_out(annotated) != parse_opt_out(text):
        raise ValueError("opt-out reasons changed the entries")  # a bug here, never silent
    return annotated


def opt_out_entries(request: OptOut) -> list[str]:
    """The opt-out file lines of `request` (`user:NSID`, `photo:ID`), sorted."""
    return format_opt_out(request.user_nsids, request.photo_ids).splitlines()


def updated_stats(stats: Mapping[str, Any], shards: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """stats.json after a takedown: counts recomputed from the manifest, and the samples they lost
    added to the funnel under "takedown.samples_removed" (cumulative).

    The removed count is stats.json's old total minus the manifest's new one, not the matches of
    this run, so a rerun after a killed takedown (the manifest or stats.json already updated, the
    Parquet index not yet) counts each sample once (issue 10, finding 9).
    """
    funnel = dict(stats.get("funnel") or {})
    old_total = (stats.get("totals") or {}).get("samples")
    removed = 0 if old_total is None else int(old_total) - sum(int(e["samples"]) for e in shards)
    if removed > 0:
        funnel[TAKEDOWN_KEY] = int(funnel.get(TAKEDOWN_KEY, 0)) + removed
    return {**stats, **build_stats(list(shards), funnel)}


def opt_out_update(dataset: str, wanted: OptOut,
                   reasons: Optional[Mapping[str, str]] = None) -> tuple[str, OptOut, str]:
    """(existing opt_out.txt text, what it records, the lines to append for `wanted`, with
    `reasons` as comments).

    Raises ValueError naming the line when the existing file does not parse, or when an entry
    cannot be written so that it reads back: call it before writing anything, so that a bad
    line never leaves a half-applied takedown (issue 10, finding 3).
    """
    path = fs.join(dataset, OPT_OUT_FILE)
    existing = fs.read_text(path) or ""
    try:
        recorded = validate_opt_out(existing, path)
    except ValueError as error:
        raise ValueError(f"{error}; fix that line before a takedown (nothing was changed)") from None
    return existing, recorded, new_opt_out_lines(recorded, wanted, reasons)


class TakedownError(RuntimeError):
    """A shard the takedown must read or rewrite is damaged: the job stops rather than skip it."""


def find_shard_matches(dataset: str, entry: dict, request: OptOut) -> list[Match]:
    """The samples of one shard that `request` selects, from its Parquet key/user/photo columns."""
    path = shard_parquet_path(entry)
    try:
        table = read_search_table(fs.join(dataset, path))
    except Exception as error:
        # Never skip a shard: the person's samples could be in it. Fail, and say how to look.
        raise TakedownError(f"{path}: cannot search it ({type(error).__name__}: {error}); nothing "
                            f"in the run-level files changed; check with `python -m "
                            f"beam_jobs.verify --dataset={dataset}`") from error
    return table_matches(table, request)


def rewrite_shard(dataset: str, entry: dict, matches: Iterable[Match]) -> dict[str, Any]:
    """Drop `matches` from one shard: the tar is rewritten in place (write then rename), the
    Parquet rows are written to a staged file that `update_run_files` moves into place."""
    matches = sorted(matches, key=lambda m: m.key)
    drop = {m.key for m in matches}
    tar_path = fs.join(dataset, entry["path"])
    filtered = filter_members(read_tar_shard(tar_path), drop)
    info = write_tar_shard(tar_path, filtered.kept)
    parquet = shard_parquet_path(entry)
    rows = filter_rows(read_parquet_rows(fs.join(dataset, parquet)), drop)
    parquet_sha256 = write_parquet_shard(fs.join(dataset, parquet + STAGED_SUFFIX), rows)
    if len(rows) != len(filtered.kept):
        raise TakedownError(f"{entry['path']}: {len(filtered.kept)} samples left in the tar but "
                           f"{len(rows)} Parquet rows; run `python -m beam_jobs.verify`")
    return {"path": entry["path"], "parquet": parquet, "parquet_sha256": parquet_sha256,
            "sha256": info.sha256,
            "samples": info.samples, "bytes": info.bytes,
            "removed": [dict(key=m.key, user_nsid=m.user_nsid, photo_id=m.photo_id) for m in matches],
            "removed_from_tar": sorted(filtered.removed)}


def update_run_files(dataset: str, request: OptOut, rewrites: list[dict[str, Any]],
                     record_unmatched: bool = False,
                     reasons: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """Fold the shard rewrites into manifest.json, metadata.json, stats.json and opt_out.txt
    (with `reasons`, see `new_opt_out_lines`), then move the staged Parquet files into place.
    Writes a file only when it changes."""
    rewrites = sorted(rewrites, key=lambda r: r["path"])
    removed = sorted((m for r in rewrites for m in r["removed"]), key=lambda m: m["key"])
    removed_keys = {m["key"] for m in removed}
    changed = []
    wanted = request if record_unmatched else OptOut(
        frozenset(m["user_nsid"] for m in removed if m["user_nsid"] in request.user_nsids),
        frozenset(m["photo_id"] for m in removed if m["photo_id"] in request.photo_ids))
    existing_text, recorded, lines = opt_out_update(dataset, wanted, reasons)  # before any write

    manifest = load_manifest(dataset)
    by_path = {r["path"]: r for r in rewrites}
    manifest_changed = False
    for entry in manifest["shards"]:
        rewrite = by_path.get(entry["path"])
        if rewrite is None:
            continue
        for field in ("sha256", "samples", "bytes", "parquet_sha256"):
            if entry.get(field) != rewrite[field]:
                entry[field] = rewrite[field]
                manifest_changed = True
    if manifest_changed:
        save_manifest(dataset, manifest)
        changed.append(MANIFEST_FILE)

    if removed_keys and fs.exists(fs.join(dataset, METADATA_FILE)):
        # Streamed from the shards' Parquet (the staged files where a shard was rewritten) by
        # the writer's own k-way merge: bounded memory, and the same bytes the writer writes.
        staged = {e["path"] for e in manifest["shards"] if e["path"] in by_path and fs.exists(
            fs.join(dataset, shard_parquet_path(e) + STAGED_SUFFIX))}
        sources = [{**e, "parquet": shard_parquet_path(e) + STAGED_SUFFIX}
                   if e["path"] in staged else e for e in manifest["shards"]]
        write_metadata_json(dataset, metadata_entries(dataset, sources))
        changed.append(METADATA_FILE)

    if fs.exists(fs.join(dataset, STATS_FILE)):
        stats = fs.load_json(dataset, STATS_FILE)
        new_stats = updated_stats(stats, manifest["shards"])
        if new_stats != stats:
            fs.save_json(dataset, STATS_FILE, new_stats)
            changed.append(STATS_FILE)

    opt_out_path = fs.join(dataset, OPT_OUT_FILE)
    if lines:
        if existing_text and not existing_text.endswith("\n"):
            existing_text += "\n"
        fs.write_bytes_atomic(opt_out_path, (existing_text + lines).encode("utf-8"))
        changed.append(OPT_OUT_FILE)

    for rewrite in rewrites:  # last: the Parquet files are the index a re-run searches
        final = fs.join(dataset, rewrite["parquet"])
        if fs.exists(final + STAGED_SUFFIX):
            fs.rename(final + STAGED_SUFFIX, final)
    changed += [r["path"] for r in rewrites] + [r["parquet"] for r in rewrites]

    matched = OptOut(frozenset(m["user_nsid"] for m in removed),
                     frozenset(m["photo_id"] for m in removed))
    return {
        "dataset": dataset,
        "removed": removed,
        "shards": [{k: r[k] for k in ("path", "samples", "sha256", "bytes")}
                   | {"removed": len(r["removed"])} for r in rewrites],
        "recorded_opt_out": lines.splitlines(),
        "unmatched_user_nsids": sorted(request.user_nsids - matched.user_nsids),
        "unmatched_photo_ids": sorted(request.photo_ids - matched.photo_ids),
        "already_recorded": opt_out_entries(OptOut(
            request.user_nsids & recorded.user_nsids, request.photo_ids & recorded.photo_ids)),
        "changed_files": sorted(changed),
    }


def remove_from_annotation_store(dataset: str, request: OptOut, store: Optional[str] = None) -> dict[str, int]:
    """Drop the request's users / photos from the annotation store (default DATASET/annotations),
    rewriting the files that held them: {"entries_removed", "files_rewritten"}."""
    return remove_entries(store or default_store(dataset), request.user_nsids, request.photo_ids)
