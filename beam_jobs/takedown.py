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

from typing import Any, Iterable, Iterator, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_jobs.common import JobOptions, make_pipeline, report_path_for, run_main, split_job_flags
from beam_jobs.nsid import check_nsids
from dataset import fs
from dataset.lock import run_lock
from dataset.manifest import check_manifest_paths, load_manifest
from dataset.search import Match
from dataset.takedown import (find_shard_matches, opt_out_update, remove_from_annotation_store,
                              rewrite_shard, update_run_files)
from transforms.opt_out import OptOut, read_opt_out
from transforms.records import METRICS_NAMESPACE

REPORT_FILE = "takedown_report.json"


class TakedownOptions(JobOptions):
    """Flags of the takedown job (any Beam / Dataflow flag passes through)."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument("--dataset", required=True,
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
        parser.add_argument("--annotation_store", default=None,
                            help="Annotation store to purge too (default: DATASET/annotations).")
        parser.add_argument("--report", default=None,
                            help="Where the job writes its JSON report (default: a temp file "
                                 "for local runs; required on remote runners).")


# ---------------------------------------------------------------------------- Beam steps ---

class FindMatches(beam.DoFn):
    """Manifest shard entry -> (shard path, Match) for each selected sample in its Parquet."""

    def __init__(self, dataset: str, request: OptOut):
        self._dataset = dataset
        self._request = request
        self._found = Metrics.counter(METRICS_NAMESPACE, "takedown.samples_found")

    def process(self, entry: dict) -> Iterator[tuple[str, Match]]:
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

    def process(self, element: tuple[str, Iterable[Match]]) -> Iterator[dict[str, Any]]:
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
        fs.write_json(self._report, report)
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
    request = OptOut(frozenset(check_nsids(options.user_nsid)), frozenset(options.photo_id))
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
    manifest = load_manifest(dataset)
    check_manifest_paths(dataset, manifest)  # nothing is written where a bad entry points
    opt_out_update(dataset, request)  # opt_out.txt and the request read back, before any write
    shards = manifest["shards"]
    report_path = report_path_for(takedown.report, options, REPORT_FILE)
    with run_lock(dataset, "takedown"), make_pipeline(options) as pipeline:
        _ = pipeline | "Takedown" >> Takedown(dataset, shards, request, report_path,
                                               takedown.record_unmatched)
    report = fs.read_json(report_path)
    report["annotation_store"] = remove_from_annotation_store(dataset, request, takedown.annotation_store)
    print(format_report(report) + "\nannotation store: {entries_removed} entries removed, "
          "{files_rewritten} files rewritten".format(**report["annotation_store"]))
    return report


def main(argv: Optional[list[str]] = None) -> None:
    run_main(run, argv)


if __name__ == "__main__":
    main()
