"""Scan YFCC100M metadata: how many photos each licence would yield and why the rest drop out.

    python -m beam_jobs.scan --yfcc=PATH[,PATH...] --output=DIR [--licenses=...] [--opt_out=...]

Runs the read and prefilter stages only (no network): use it to plan the cost of a rebuild.
Writes

    DIR/candidates/candidates-SSSSS-of-NNNNN.parquet   one row per kept photo, every field
    DIR/rejects/rejects-SSSSS-of-NNNNN.parquet         every dropped line / photo with a reason
    DIR/rejects/duplicates-SSSSS-of-NNNNN.parquet      the repeated photo ids (same schema)
    DIR/scan_counts.json   {"lines_read", "candidates", "candidates_per_license",
                            "rejects_per_reason"}; lines_read = candidates + all rejects

and prints a summary table. The candidates are built as Arrow tables per block of lines and
wait in DIR/_staging (removed at the end) during the duplicate check. Any Beam flag (--runner,
--direct_num_workers, Dataflow flags) passes through; the local default is the in-process runner
(see beam_jobs.common).
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from typing import Any, Callable, Iterable, Optional, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems

from dataset.ownership import remove_empty_beam_temp_folders
from transforms.reject_limits import FLAG_HELP as MAX_REJECT_RATE_HELP
from transforms.reject_limits import check_reject_rates, parse_max_reject_rates
from beam_jobs.common import JobOptions, make_pipeline, run_main, split_job_flags, split_list
from beam_jobs.progress import input_size, report_progress
from transforms.records import FDH_LICENSES
from transforms.rejects import (REJECTS_SCHEMA, count_reject_table, reject_counts_key,
                               rejects_to_table)
from transforms.s2_prefilter import (COUNT_CANDIDATES, COUNT_LINES, COUNT_REJECTS, DEFAULT_DROP_TAGS,
                                     CountReadAndPrefilter, ReadAndPrefilterParts,
                                     ScanReadAndPrefilter, scan_buckets, validate_licenses)
from transforms.spill import new_staging_dir, remove_staging
from transforms.yfcc_format import YFCC_RECORD_SCHEMA, records_to_table

COUNTS_FILENAME = "scan_counts.json"
CANDIDATES_DIR = "candidates"
# Count keys: (kind, name) pairs summed in the pipeline, then folded into the JSON layout.
LINES, CANDIDATE, REJECT = COUNT_LINES, COUNT_CANDIDATES, COUNT_REJECTS


class ScanOptions(JobOptions):
    """Flags of the scan job (the defaults are applied in `run`, not here)."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--max_reject_rate", default=None, help=MAX_REJECT_RATE_HELP)
        parser.add_argument(
            "--yfcc",
            help="YFCC100M metadata file(s): comma-separated paths or globs, local or gs://; "
                 "plain, .gz or .bz2; 23- or 25-column lines. Required.")
        parser.add_argument(
            "--output",
            help="Output directory (local or gs://) for candidates/, rejects/ and "
                 f"{COUNTS_FILENAME}. Required.")
        parser.add_argument(
            "--licenses",
            help="Comma-separated licence slugs to keep (default: FDH's four, "
                 f"{','.join(FDH_LICENSES)}).")
        parser.add_argument(
            "--opt_out",
            help="Comma-separated opt-out list file(s) (user:NSID / photo:ID per line); "
                 "their users and photos are dropped.")
        parser.add_argument(
            "--drop_tags",
            help="Comma-separated user tags whose photos are dropped, compared in Flickr's clean "
                 "form (case, spaces and punctuation ignored: no_cv = no cv = NOCV) "
                 f"(default: {','.join(DEFAULT_DROP_TAGS)}).")
        parser.add_argument(
            "--counts_only", action="store_true",
            help=f"Write only {COUNTS_FILENAME} (no candidates/ nor rejects/): the fastest way "
                 "to plan a rebuild; only photo ids cross the duplicate check.")
        parser.add_argument(
            "--num_shards", type=int,
            help="Number of candidate/reject Parquet files (default: chosen by the runner; a fixed "
                 "number makes Beam gather every row before writing, so local memory then grows "
                 "with the input).")


# Stored bytes of a .gz/.bz2 metadata file times this estimates its text (to size the duplicate
# check's buckets; a high guess only makes more, smaller buckets).
COMPRESSED_TEXT_RATIO = 5


def input_text_bytes(patterns: Sequence[str]) -> int:
    """Estimated bytes of text in the files the patterns match (compressed ones scaled up)."""
    return sum(metadata.size_in_bytes
               * (COMPRESSED_TEXT_RATIO if metadata.path.endswith((".gz", ".bz2")) else 1)
               for result in FileSystems.match(list(patterns)) for metadata in result.metadata_list)


# Rows are written and counted in batches: one Parquet table and one count per name per batch
# instead of a row conversion, a Parquet append and a count element per record.
WRITE_BATCH_SIZE = 2048


def _count_by(count_key: Callable[[Any], tuple[str, str]]
              ) -> Callable[[list], Iterable[tuple[tuple[str, str], int]]]:
    """Count a batch (list) of elements by `count_key(element)`."""
    return lambda batch: Counter(map(count_key, batch)).items()


def count_rejects(table: pa.Table) -> list[tuple[tuple[str, str], int]]:
    """((REJECT, "stage.reason"), rows) pairs of a REJECTS_SCHEMA table."""
    return [((REJECT, key), count) for key, count in count_reject_table(table)]


def count_candidates(table: pa.Table) -> list[tuple[tuple[str, str], int]]:
    """((CANDIDATE, licence), rows) pairs of a YFCC_RECORD_SCHEMA table."""
    counts = pc.value_counts(table.column("license")).to_pylist()
    return [((CANDIDATE, count["values"]), count["counts"]) for count in counts]


class _WriteAndCount(beam.PTransform):
    """Write batches of elements (lists, or tables with `to_table` None) as Parquet files
    PREFIX-SSSSS-of-NNNNN.parquet, converting each with `to_table`; return the
    ((kind, name), count) pairs `count(batch)` gives."""

    def __init__(self, to_table: Optional[Callable[[list], pa.Table]], schema: pa.Schema,
                 prefix: str, num_shards: int,
                 count: Callable[[Any], Iterable[tuple[tuple[str, str], int]]]):
        super().__init__()
        self._to_table, self._schema, self._prefix = to_table, schema, prefix
        self._num_shards, self._count = num_shards, count

    def expand(self, batches):
        tables = batches if self._to_table is None else batches | "ToTable" >> beam.Map(
            self._to_table)
        _ = tables | "Write" >> beam.io.WriteToParquetBatched(
            self._prefix, self._schema, file_name_suffix=".parquet", num_shards=self._num_shards)
        return batches | "Count" >> beam.FlatMap(self._count)


def count_pairs(lines: beam.PCollection, candidate_counts: beam.PCollection,
                *reject_counts: beam.PCollection) -> beam.PCollection:
    """((kind, name), count) for lines read, candidates per licence, rejects per reason."""
    keyed = (
        lines | "KeyLines" >> beam.Map(lambda path_count: ((LINES, ""), path_count[1])),
        candidate_counts, *reject_counts,
    )
    return keyed | "AllCounts" >> beam.Flatten() | "Sum" >> beam.CombinePerKey(sum)


def build_counts(pairs: Iterable[tuple[tuple[str, str], int]]) -> dict[str, Any]:
    """Fold ((kind, name), count) pairs into the scan_counts.json layout."""
    counts: dict[str, Any] = {LINES: 0, "candidates": 0, CANDIDATE: {}, REJECT: {}}
    for (kind, name), value in pairs:
        if kind == LINES:
            counts[LINES] += value
        else:
            counts[kind][name] = counts[kind].get(name, 0) + value
    counts["candidates"] = sum(counts[CANDIDATE].values())
    # A licence whose every candidate was a duplicate sums to 0 in counts-only mode.
    counts[CANDIDATE] = dict(sorted((slug, n) for slug, n in counts[CANDIDATE].items() if n))
    counts[REJECT] = dict(sorted(counts[REJECT].items()))
    counts["rejects"] = sum(counts[REJECT].values())
    return counts


def write_json(path: str, payload: dict) -> None:
    """Write JSON through FileSystems (local or gs://), to a temporary name then renamed."""
    temporary = path + ".tmp"
    with FileSystems.create(temporary) as handle:
        handle.write(json.dumps(payload, indent=2, sort_keys=False).encode("utf-8") + b"\n")
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temporary], [path])


def read_json(path: str) -> dict:
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def remove_previous_outputs(output: str) -> None:
    """Delete the shards a previous scan wrote to `output`, so that globs see only this run's."""
    patterns = [f"{output}/{CANDIDATES_DIR}/candidates-*-of-*.parquet",
                f"{output}/rejects/rejects-*-of-*.parquet",
                f"{output}/rejects/duplicates-*-of-*.parquet", f"{output}/{COUNTS_FILENAME}"]
    stale = [metadata.path for result in FileSystems.match(patterns)
             for metadata in result.metadata_list]
    if stale:
        logging.info("removing %d outputs of a previous scan in %s", len(stale), output)
        FileSystems.delete(stale)


def build_scan(pipeline: beam.Pipeline, yfcc: Sequence[str], output: str,
               licenses: Sequence[str] = FDH_LICENSES, opt_out: Sequence[str] = (),
               drop_tags: Sequence[str] = DEFAULT_DROP_TAGS, num_shards: int = 0,
               staging_dir: Optional[str] = None, buckets: Optional[int] = None) -> None:
    """Add the scan steps to `pipeline`. With `staging_dir` (the caller removes it after the
    run) the candidates and rejects travel as Arrow tables, the candidates staged there during
    the duplicate check (`ScanReadAndPrefilter`); without, as lists of records and `Rejected`s
    (`ReadAndPrefilterParts`). `buckets`: of the duplicate check of tables (default: sized
    from the input, `scan_buckets`)."""
    if staging_dir is None:
        read = pipeline | "ReadAndPrefilter" >> ReadAndPrefilterParts(
            list(yfcc), licenses, opt_out, drop_tags, batch_size=WRITE_BATCH_SIZE)
        candidates_to_table, rejects_table = records_to_table, rejects_to_table
        count = _count_by(lambda record: (CANDIDATE, record.license))
        count_reject_batch = _count_by(lambda rejected: (REJECT, reject_counts_key(rejected)))
    else:
        read = pipeline | "ReadAndPrefilter" >> ScanReadAndPrefilter(
            list(yfcc), licenses, opt_out, drop_tags, staging_dir=staging_dir,
            buckets=buckets or scan_buckets(input_text_bytes(yfcc)))
        candidates_to_table, rejects_table = None, None
        count, count_reject_batch = count_candidates, count_rejects
    candidate_counts = read.main | "WriteCandidates" >> _WriteAndCount(
        candidates_to_table, YFCC_RECORD_SCHEMA, f"{output}/{CANDIDATES_DIR}/candidates",
        num_shards, count)
    # The same files as transforms.rejects.WriteRejects writes, in batches; the duplicate-photo
    # rejects go to files of their own, so that no Flatten holds every reject (a local run).
    reject_counts = [
        rejects | f"Write{name.title()}" >> _WriteAndCount(
            rejects_table, REJECTS_SCHEMA, f"{output}/rejects/{name}", num_shards,
            count_reject_batch)
        for name, rejects in (("rejects", read.read_rejects),
                              ("duplicates", read.duplicate_rejects))]
    write_counts(count_pairs(read.line_counts, candidate_counts, *reject_counts), output)


def build_counts_only_scan(pipeline: beam.Pipeline, yfcc: Sequence[str], output: str,
                           staging_dir: str, licenses: Sequence[str] = FDH_LICENSES,
                           opt_out: Sequence[str] = (),
                           drop_tags: Sequence[str] = DEFAULT_DROP_TAGS) -> None:
    """Add the steps of a counts-only scan (only scan_counts.json) to `pipeline`; the
    candidates' ids are staged in `staging_dir` for the duplicate check."""
    pairs = pipeline | "CountReadAndPrefilter" >> CountReadAndPrefilter(
        list(yfcc), licenses, opt_out, drop_tags, staging_dir=staging_dir)
    write_counts(pairs | "Sum" >> beam.CombinePerKey(sum), output)


def write_counts(pairs: beam.PCollection, output: str) -> None:
    """Fold summed ((kind, name), count) pairs into OUTPUT/scan_counts.json."""
    counts_path = f"{output}/{COUNTS_FILENAME}"
    _ = (pairs
         | "Gather" >> beam.combiners.ToList()
         | "Fold" >> beam.Map(build_counts)
         | "WriteCounts" >> beam.Map(lambda counts: write_json(counts_path, counts)))


def format_summary(counts: dict) -> str:
    """A short text table of a scan_counts.json dict."""
    lines_read = counts[LINES] or 1
    rows = [("lines read", counts[LINES])]
    rows += [(f"  candidates {slug}", n) for slug, n in counts[CANDIDATE].items()]
    rows += [("candidates", counts["candidates"])]
    rows += [(f"  rejected {reason}", n) for reason, n in counts[REJECT].items()]
    rows += [("rejected", counts["rejects"])]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {n:>12,d}  {100.0 * n / lines_read:6.2f}%"
                     for name, n in rows)


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the scan job with command-line `argv`; return the scan_counts.json dict."""
    scan, options = split_job_flags(ScanOptions, argv, __doc__)
    yfcc, output = split_list(scan.yfcc), (scan.output or "").rstrip("/")
    if not yfcc or not output:
        raise ValueError("scan needs --yfcc=PATH[,PATH...] and --output=DIR (see --help)")
    licenses = validate_licenses(split_list(scan.licenses) or FDH_LICENSES)
    drop_tags = split_list(scan.drop_tags) if scan.drop_tags is not None else DEFAULT_DROP_TAGS

    parse_max_reject_rates(scan.max_reject_rate)  # a bad value fails here, exit 2
    remove_previous_outputs(output)
    pipeline = make_pipeline(options)
    staging_dir = new_staging_dir(output, "scan")
    if scan.counts_only:
        build_counts_only_scan(pipeline, yfcc, output, staging_dir, licenses,
                               split_list(scan.opt_out), drop_tags)
    else:
        build_scan(pipeline, yfcc, output, licenses, split_list(scan.opt_out), drop_tags,
                   scan.num_shards or 0, staging_dir)
    try:
        with report_progress("scan", input_size(yfcc)):
            pipeline.run().wait_until_finish()
    finally:
        remove_staging(staging_dir)
    remove_empty_beam_temp_folders(output)
    counts = read_json(f"{output}/{COUNTS_FILENAME}")
    if counts[LINES] != counts["candidates"] + counts["rejects"]:
        raise RuntimeError(f"accounting broken: {counts[LINES]} lines read != "
                           f"{counts['candidates']} candidates + {counts['rejects']} rejects")
    print(format_summary(counts))
    check_reject_rates({"funnel.lines_read": counts[LINES], "funnel.candidates": counts["candidates"],
                        **counts[REJECT]}, scan.max_reject_rate, f"{output}/rejects/*.parquet")
    return counts


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(run, argv)


if __name__ == "__main__":
    main()
