"""Remove Flickr users and photos from a built FDH dataset (the takedown of the dataset card).

    python -m beam_jobs.takedown --dataset=OUT --user_nsid=12345678@N00 [--user_nsid=...]
        [--photo_id=5577445566] [--from_file=requests.txt]

Every sample of those users and photos leaves the dataset: the shards that hold one are
rewritten under the same name (write then rename; the other samples' tar members are copied
byte for byte), their Parquet rows go, and metadata.json, manifest.json (sha256, sample and
byte counts) and stats.json (samples and bytes per licence x split) are updated. The request
is appended to OUT/opt_out.txt (the format of transforms/opt_out.py), which `rebuild
--opt_out=OUT/opt_out.txt` honours. A shard left with no sample stays as a valid empty tar
(and an empty Parquet file) listed with 0 samples, so shard names stay contiguous as FDH's are.

Idempotent: a second run finds nothing, writes nothing and prints so. Users or photos not in
the dataset change nothing (pass --record_unmatched to list them in opt_out.txt anyway).

The job is a Beam pipeline so it scales to the full 1,448-shard dataset on Dataflow:

    manifest shards ─FindMatches (Parquet, 3 columns)─► (shard, match) ─GroupByKey─►
    ─RewriteShard (tar + staged Parquet)─► ─ToList─► UpdateRunFiles (json files, opt-out,
    then the staged Parquet files replace the old ones, last)

The Parquet files are the index the job searches, so they are replaced last: a run that dies
halfway leaves the old index, and running it again finishes the takedown.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Iterable, Iterator, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_jobs.common import (JobOptions, load_dataset_manifest, make_pipeline, read_json_report,
                              report_path_for, split_job_flags, write_json_report)
from beam_jobs.verify import STAGED_SUFFIX
from transforms import dataset_ops
from transforms.s8_write import dataset_path
from transforms.opt_out import OptOut, parse_opt_out, read_opt_out
from transforms.records import METRICS_NAMESPACE

REPORT_FILE = "takedown_report.json"


class TakedownOptions(JobOptions):
    """Flags of the takedown job (any Beam / Dataflow flag passes through)."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument("--dataset", default=None,
                            help="Root of the dataset to edit (local path or gs://).")
        parser.add_argument("--user_nsid", action="append", default=[],
                            help="Flickr user NSID whose samples go; repeat for several.")
        parser.add_argument("--photo_id", action="append", type=int, default=[],
                            help="Flickr photo id whose samples go; repeat for several.")
        parser.add_argument("--from_file", action="append", default=[],
                            help="Opt-out file (transforms/opt_out.py format: user:NSID, "
                                 "photo:ID, one a line) with more users/photos; repeatable.")
        parser.add_argument("--record_unmatched", action="store_true", default=False,
                            help="Also add users/photos found in no sample to opt_out.txt, so "
                                 "future rebuilds skip them (by default nothing changes).")
        parser.add_argument("--report", default=None,
                            help="Where the job writes its JSON report (default: a temp file "
                                 "for local runs; required on remote runners).")


class TakedownError(RuntimeError):
    """A shard the takedown must read or rewrite is damaged: the job stops rather than skip it."""


# ---------------------------------------------------------------------------- pure steps ---

def find_shard_matches(dataset: str, entry: dict, request: OptOut) -> list[dataset_ops.Match]:
    """The samples of one shard that `request` selects, from its Parquet key/user/photo columns."""
    import pyarrow.parquet as pq

    path = dataset_ops.shard_parquet_path(entry)
    try:
        with FileSystems.open(dataset_path(dataset, path)) as handle:
            table = pq.read_table(handle, columns=list(dataset_ops.SEARCH_COLUMNS))
    except Exception as error:
        # Never skip a shard: the person's samples could be in it. Fail, and say how to look.
        raise TakedownError(f"{path}: cannot search it ({type(error).__name__}: {error}); nothing "
                            f"in the run-level files changed; check with `python -m "
                            f"beam_jobs.verify --dataset={dataset}`") from error
    return dataset_ops.table_matches(table, request)


def rewrite_shard(dataset: str, entry: dict, matches: Iterable[dataset_ops.Match]) -> dict[str, Any]:
    """Drop `matches` from one shard: the tar is rewritten in place (write then rename), the
    Parquet rows are written to a staged file that `update_run_files` moves into place."""
    from transforms import s8_write

    matches = sorted(matches, key=lambda m: m.key)
    drop = {m.key for m in matches}
    tar_path = dataset_path(dataset, entry["path"])
    filtered = dataset_ops.filter_members(s8_write.read_tar_shard(tar_path), drop)
    info = s8_write.write_tar_shard(tar_path, filtered.kept)
    parquet = dataset_ops.shard_parquet_path(entry)
    rows = dataset_ops.filter_rows(s8_write.read_parquet_rows(dataset_path(dataset, parquet)), drop)
    parquet_sha256 = s8_write.write_parquet_shard(dataset_path(dataset, parquet + STAGED_SUFFIX), rows)
    if len(rows) != len(filtered.kept):
        raise TakedownError(f"{entry['path']}: {len(filtered.kept)} samples left in the tar but "
                           f"{len(rows)} Parquet rows; run `python -m beam_jobs.verify`")
    return {"path": entry["path"], "parquet": parquet, "parquet_sha256": parquet_sha256,
            "sha256": info.sha256,
            "samples": info.samples, "bytes": info.bytes,
            "removed": [dict(key=m.key, user_nsid=m.user_nsid, photo_id=m.photo_id) for m in matches],
            "removed_from_tar": sorted(filtered.removed)}


def _read_text(path: str) -> Optional[str]:
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        return handle.read().decode("utf-8")


def update_run_files(dataset: str, request: OptOut, rewrites: list[dict[str, Any]],
                     record_unmatched: bool = False) -> dict[str, Any]:
    """Fold the shard rewrites into manifest.json, metadata.json, stats.json and opt_out.txt,
    then move the staged Parquet files into place. Writes a file only when it changes."""
    from transforms import s8_write

    rewrites = sorted(rewrites, key=lambda r: r["path"])
    removed = sorted((m for r in rewrites for m in r["removed"]), key=lambda m: m["key"])
    removed_keys = {m["key"] for m in removed}
    changed = []

    manifest = s8_write.load_json(dataset, s8_write.MANIFEST_FILE)
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
        s8_write.save_json(dataset, s8_write.MANIFEST_FILE, manifest)
        changed.append(s8_write.MANIFEST_FILE)

    if removed_keys and FileSystems.exists(dataset_path(dataset, s8_write.METADATA_FILE)):
        # Streamed from the shards' Parquet (the staged files where a shard was rewritten) by
        # the writer's own k-way merge: bounded memory, and the same bytes the writer writes.
        staged = {e["path"] for e in manifest["shards"] if e["path"] in by_path and FileSystems.exists(
            dataset_path(dataset, dataset_ops.shard_parquet_path(e) + STAGED_SUFFIX))}
        sources = [{**e, "parquet": dataset_ops.shard_parquet_path(e) + STAGED_SUFFIX}
                   if e["path"] in staged else e for e in manifest["shards"]]
        s8_write.write_metadata_json(dataset, s8_write.metadata_entries(dataset, sources))
        changed.append(s8_write.METADATA_FILE)

    if FileSystems.exists(dataset_path(dataset, s8_write.STATS_FILE)):
        stats = s8_write.load_json(dataset, s8_write.STATS_FILE)
        new_stats = dataset_ops.updated_stats(stats, manifest["shards"], len(removed))
        if new_stats != stats:
            s8_write.save_json(dataset, s8_write.STATS_FILE, new_stats)
            changed.append(s8_write.STATS_FILE)

    wanted = request if record_unmatched else OptOut(
        frozenset(m["user_nsid"] for m in removed if m["user_nsid"] in request.user_nsids),
        frozenset(m["photo_id"] for m in removed if m["photo_id"] in request.photo_ids))
    opt_out_path = dataset_path(dataset, s8_write.OPT_OUT_FILE)
    existing_text = _read_text(opt_out_path) or ""
    recorded = parse_opt_out(existing_text, opt_out_path)
    lines = dataset_ops.new_opt_out_lines(recorded, wanted)
    if lines:
        if existing_text and not existing_text.endswith("\n"):
            existing_text += "\n"
        s8_write.write_bytes_atomic(opt_out_path, (existing_text + lines).encode("utf-8"))
        changed.append(s8_write.OPT_OUT_FILE)

    for rewrite in rewrites:  # last: the Parquet files are the index a re-run searches
        final = dataset_path(dataset, rewrite["parquet"])
        if FileSystems.exists(final + STAGED_SUFFIX):
            FileSystems.rename([final + STAGED_SUFFIX], [final])
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
        "already_recorded": dataset_ops.opt_out_entries(OptOut(
            request.user_nsids & recorded.user_nsids, request.photo_ids & recorded.photo_ids)),
        "changed_files": sorted(changed),
    }


# ---------------------------------------------------------------------------- Beam steps ---

class FindMatches(beam.DoFn):
    """Manifest shard entry -> (shard path, Match) for each selected sample in its Parquet."""

    def __init__(self, dataset: str, request: OptOut):
        self._dataset = dataset
        self._request = request
        self._found = Metrics.counter(METRICS_NAMESPACE, "takedown.samples_found")

    def process(self, entry: dict) -> Iterator[tuple[str, dataset_ops.Match]]:
        for match in find_shard_matches(self._dataset, entry, self._request):
            self._found.inc()
            yield entry["path"], match


class RewriteShard(beam.DoFn):
    """(shard path, matches) -> the rewrite summary of that shard."""

    def __init__(self, dataset: str, shards: list[dict]):
        self._dataset = dataset
        self._shards = {entry["path"]: entry for entry in shards}
        self._rewritten = Metrics.counter(METRICS_NAMESPACE, "takedown.shards_rewritten")
        self._removed = Metrics.counter(METRICS_NAMESPACE, "takedown.samples_removed")

    def process(self, element: tuple[str, Iterable[dataset_ops.Match]]) -> Iterator[dict[str, Any]]:
        path, matches = element
        result = rewrite_shard(self._dataset, self._shards[path], matches)
        self._rewritten.inc()
        self._removed.inc(len(result["removed_from_tar"]))
        yield result


class UpdateRunFiles(beam.DoFn):
    """All shard rewrites (one list) -> run-level files updated; writes the JSON report."""

    def __init__(self, dataset: str, request: OptOut, record_unmatched: bool, report: str):
        self._dataset = dataset
        self._request = request
        self._record_unmatched = record_unmatched
        self._report = report

    def process(self, rewrites: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        report = update_run_files(self._dataset, self._request, rewrites, self._record_unmatched)
        write_json_report(self._report, report)
        yield report


class Takedown(beam.PTransform):
    """Remove the samples selected by `request` from the dataset at `dataset` (see module doc)."""

    def __init__(self, dataset: str, shards: list[dict], request: OptOut, report: str,
                 record_unmatched: bool = False):
        super().__init__()
        self._dataset = dataset
        self._shards = shards
        self._request = request
        self._report = report
        self._record_unmatched = record_unmatched

    def expand(self, pbegin):
        return (
            pbegin
            | "ManifestShards" >> beam.Create(self._shards, reshuffle=True)
            | "FindMatches" >> beam.ParDo(FindMatches(self._dataset, self._request))
            | "GroupByShard" >> beam.GroupByKey()
            | "RewriteShard" >> beam.ParDo(RewriteShard(self._dataset, self._shards))
            | "Collect" >> beam.combiners.ToList()
            | "UpdateRunFiles" >> beam.ParDo(UpdateRunFiles(
                self._dataset, self._request, self._record_unmatched, self._report)))


# ------------------------------------------------------------------------------ launcher ---

def load_request(options: TakedownOptions) -> OptOut:
    """The users/photos to remove from flags and --from_file; raises ValueError if none."""
    request = OptOut(frozenset(options.user_nsid), frozenset(options.photo_id))
    if options.from_file:
        request = request.merge(read_opt_out(options.from_file))
    if not request:
        raise ValueError("nothing to take down: give --user_nsid, --photo_id or --from_file")
    return request


def format_report(report: dict[str, Any]) -> str:
    """What the job prints: every removed sample, the shards rewritten, what was recorded."""
    lines = []
    removed = report["removed"]
    if removed:
        lines.append(f"Removed {len(removed)} samples from {len(report['shards'])} shards of "
                     f"{report['dataset']}:")
        for match in removed:
            lines.append(f"  removed {match['key']} (user_nsid {match['user_nsid']}, "
                         f"photo id {match['photo_id']})")
        for shard in report["shards"]:
            lines.append(f"  rewrote {shard['path']}: removed {shard['removed']}, "
                         f"{shard['samples']} samples left")
    else:
        lines.append(f"No sample to remove in {report['dataset']}: nothing changed in its shards.")
    already = set(report.get("already_recorded", []))
    for kind, prefix, values in (("user_nsid", "user", report["unmatched_user_nsids"]),
                                 ("photo id", "photo", report["unmatched_photo_ids"])):
        for value in values:
            note = " (already in opt_out.txt)" if f"{prefix}:{value}" in already else ""
            lines.append(f"  no sample has {kind} {value}{note}")
    for line in report["recorded_opt_out"]:
        lines.append(f"  recorded in opt_out.txt: {line}")
    return "\n".join(lines)


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the takedown; returns the report (also printed)."""
    takedown, options = split_job_flags(TakedownOptions, argv, __doc__)
    request = load_request(takedown)
    if not takedown.dataset:
        raise ValueError("--dataset is required")
    dataset = takedown.dataset.rstrip("/")
    shards = load_dataset_manifest(dataset)["shards"]
    report_path = report_path_for(takedown.report, options, REPORT_FILE)
    with make_pipeline(options) as pipeline:
        _ = pipeline | "Takedown" >> Takedown(dataset, shards, request, report_path,
                                               takedown.record_unmatched)
    report = read_json_report(report_path)
    print(format_report(report))
    return report


def main(argv: Optional[list[str]] = None) -> None:
    try:
        run(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.WARNING)
    main()
