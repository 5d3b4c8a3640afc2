"""Check a built FDH dataset end to end: every shard re-read, every sample decoded.

    python -m beam_jobs.verify --dataset=OUT

Per shard (one ParDo element each, so Dataflow spreads the 1,448 shards over workers): the
tar's sha256 and size against manifest.json, every sample decodes with FDH's members and shapes
(image RGB 288x160, 1-bit masks, keypoints float32 (17, 3), vertices int16 < 27554 unless the
dataset has no embeddings), the sample count against the manifest, and the tar's keys against
its Parquet rows. Then once: no shard file missing or extra, shard names contiguous per licence
and split, metadata.json's keys equal to the shards' keys (no duplicates), stats.json's per
licence x split counts equal to the manifest's.

Exit status 0 with a one-line `OK: ...` summary; 1 with the list of problems; 2 for bad flags
or a directory that is not a dataset (no manifest.json).
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Iterator, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_jobs.common import (JobOptions, load_dataset_manifest, make_pipeline, read_json_report,
                              report_path_for, split_job_flags, write_json_report)
from transforms import dataset_ops
from transforms.s8_write import dataset_path
from transforms.records import METRICS_NAMESPACE

REPORT_FILE = "verify_report.json"
STAGED_SUFFIX = ".takedown-staged"  # Parquet files a takedown has not moved into place yet
MAX_SAMPLE_PROBLEMS = 20  # per shard; the rest are counted


class VerifyOptions(JobOptions):
    """Flags of the verify job (any Beam / Dataflow flag passes through)."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument("--dataset", default=None,
                            help="Root of the dataset to check (local path or gs://).")
        parser.add_argument("--no_embeddings", default=None, choices=("true", "false"),
                            help="Whether samples lack vertices.npy / e_mask.png (default: the "
                                 "manifest's config.no_embeddings, else false).")
        parser.add_argument("--report", default=None,
                            help="Where the job writes its JSON report (default: a temp file "
                                 "for local runs; required on remote runners).")


def verify_shard(dataset: str, entry: dict, no_embeddings: bool) -> dict[str, Any]:
    """Everything verify checks inside one shard; returns its report with the tar's keys."""
    from transforms import s8_write

    report = dataset_ops.ShardReport(entry["path"])
    problems = report.problems
    tar_path = dataset_path(dataset, entry["path"])
    keys: list[str] = []
    if not FileSystems.exists(tar_path):
        problems.append("missing")
    else:
        with FileSystems.open(tar_path) as handle:
            digest, report.bytes = dataset_ops.sha256_of_stream(handle)
        if digest != entry.get("sha256"):
            problems.append(f"sha256 {digest} != manifest {entry.get('sha256')}")
        if report.bytes != entry.get("bytes", report.bytes):
            problems.append(f"{report.bytes} bytes != manifest {entry.get('bytes')}")
        sample_problems: list[str] = []
        try:
            for members in s8_write.read_tar_shard(tar_path):
                keys.append(str(members.get("__key__")))
                sample_problems += dataset_ops.check_sample(members, no_embeddings)
        except Exception as error:  # a damaged tar is a finding, not a crash
            problems.append(f"unreadable after {len(keys)} samples: {type(error).__name__}: {error}")
        problems += sample_problems[:MAX_SAMPLE_PROBLEMS]
        if len(sample_problems) > MAX_SAMPLE_PROBLEMS:
            problems.append(f"... and {len(sample_problems) - MAX_SAMPLE_PROBLEMS} more sample problems")
        report.samples = len(keys)
        if len(keys) != entry.get("samples"):
            problems.append(f"{len(keys)} samples != manifest {entry.get('samples')}")
        if len(set(keys)) != len(keys):
            problems.append("a key appears twice in the tar")
    parquet = dataset_ops.shard_parquet_path(entry)
    parquet_keys: list[str] = []
    if not FileSystems.exists(dataset_path(dataset, parquet)):
        problems.append(f"{parquet}: missing")
    else:
        try:
            parquet_keys = [row[dataset_ops.KEY_COLUMN]
                            for row in s8_write.read_parquet_rows(dataset_path(dataset, parquet))]
        except Exception as error:
            problems.append(f"{parquet}: unreadable: {type(error).__name__}: {error}")
        else:
            if entry.get("parquet_sha256"):
                with FileSystems.open(dataset_path(dataset, parquet)) as handle:
                    parquet_digest, _ = dataset_ops.sha256_of_stream(handle)
                if parquet_digest != entry["parquet_sha256"]:
                    problems.append(f"{parquet}: sha256 {parquet_digest} != manifest "
                                    f"{entry['parquet_sha256']}")
            if FileSystems.exists(tar_path) and sorted(parquet_keys) != sorted(keys):
                only_tar = sorted(set(keys) - set(parquet_keys))
                only_parquet = sorted(set(parquet_keys) - set(keys))
                problems.append(f"{parquet}: {len(parquet_keys)} rows vs {len(keys)} tar samples; "
                                f"only in tar {only_tar[:5]}, only in Parquet {only_parquet[:5]}")
    result = report.to_dict()
    result["parquet_keys"] = parquet_keys
    return result


def verify_run_files(dataset: str, manifest: dict, shard_reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The checks across shards, folded with the shard reports into the final report."""
    from transforms import s8_write
    from transforms.s8_write.shards import TEMP_MARKER

    shards = manifest.get("shards", [])
    problems = dataset_ops.naming_problems(shards)
    for report in sorted(shard_reports, key=lambda r: r["path"]):
        problems += [f"{report['path']}: {p}" for p in report["problems"]]

    expected = dataset_ops.expected_shard_files(shards)
    patterns = [dataset_path(dataset, f"*/*/out-*.{ext}") for ext in ("tar", "parquet")]
    root = dataset.rstrip("/") + "/"
    for result in FileSystems.match(patterns):
        for metadata in result.metadata_list:
            relative = metadata.path[len(root):] if metadata.path.startswith(root) else metadata.path
            if relative not in expected:
                problems.append(f"{relative}: shard file not in the manifest")

    leftovers = [dataset_path(dataset, f"*/*/*{STAGED_SUFFIX}"), dataset_path(dataset, f"*/*/.*{TEMP_MARKER}*")]
    for result in FileSystems.match(leftovers):
        for metadata in result.metadata_list:
            relative = metadata.path[len(root):] if metadata.path.startswith(root) else metadata.path
            why = ("an unfinished takedown: run it again" if relative.endswith(STAGED_SUFFIX)
                   else "a writer's temporary file: a killed run?")
            problems.append(f"{relative}: leftover of {why}")

    parquet_keys = [k for r in shard_reports for k in r["parquet_keys"]]
    if FileSystems.exists(dataset_path(dataset, s8_write.METADATA_FILE)):
        metadata = s8_write.load_json(dataset, s8_write.METADATA_FILE)
        problems += [f"{s8_write.METADATA_FILE}: {p}"
                     for p in dataset_ops.key_problems(metadata.keys(), parquet_keys)]
        del metadata
    else:
        problems.append(f"{s8_write.METADATA_FILE}: missing")

    if FileSystems.exists(dataset_path(dataset, s8_write.STATS_FILE)):
        stats = s8_write.load_json(dataset, s8_write.STATS_FILE)
        problems += [f"{s8_write.STATS_FILE}: {p}" for p in dataset_ops.stats_count_problems(stats, shards)]
    else:
        problems.append(f"{s8_write.STATS_FILE}: missing")

    return {"dataset": dataset, "ok": not problems, "problems": problems, "shards": len(shards),
            "samples": sum(r["samples"] for r in shard_reports),
            "bytes": sum(r["bytes"] for r in shard_reports)}


class VerifyShard(beam.DoFn):
    """Manifest shard entry -> its report (problems, samples, bytes, Parquet keys)."""

    def __init__(self, dataset: str, no_embeddings: bool):
        self._dataset = dataset
        self._no_embeddings = no_embeddings
        self._shards = Metrics.counter(METRICS_NAMESPACE, "verify.shards")
        self._bad = Metrics.counter(METRICS_NAMESPACE, "verify.bad_shards")
        self._samples = Metrics.counter(METRICS_NAMESPACE, "verify.samples")

    def process(self, entry: dict) -> Iterator[dict[str, Any]]:
        report = verify_shard(self._dataset, entry, self._no_embeddings)
        self._shards.inc()
        self._samples.inc(report["samples"])
        if report["problems"]:
            self._bad.inc()
        yield report


class VerifyRunFiles(beam.DoFn):
    """All shard reports (one list) -> the final report, written as JSON to `report`."""

    def __init__(self, dataset: str, manifest: dict, report: str):
        self._dataset = dataset
        self._manifest = manifest
        self._report = report

    def process(self, shard_reports: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        report = verify_run_files(self._dataset, self._manifest, shard_reports)
        write_json_report(self._report, report)
        yield report


class VerifyDataset(beam.PTransform):
    """Verify every shard of `manifest` in parallel, then the run-level files once."""

    def __init__(self, dataset: str, manifest: dict, report: str, no_embeddings: bool = False):
        super().__init__()
        self._dataset = dataset
        self._manifest = manifest
        self._report = report
        self._no_embeddings = no_embeddings

    def expand(self, pbegin):
        return (
            pbegin
            | "ManifestShards" >> beam.Create(self._manifest.get("shards", []), reshuffle=True)
            | "VerifyShard" >> beam.ParDo(VerifyShard(self._dataset, self._no_embeddings))
            | "Collect" >> beam.combiners.ToList()
            | "VerifyRunFiles" >> beam.ParDo(VerifyRunFiles(self._dataset, self._manifest, self._report)))


def format_report(report: dict[str, Any]) -> str:
    """One OK line, or a count and every problem, one a line."""
    if report["ok"]:
        return (f"OK: {report['dataset']}: {report['shards']} shards, {report['samples']} samples, "
                f"{dataset_ops.human_bytes(report['bytes'])} verified")
    lines = [f"FAILED: {report['dataset']}: {len(report['problems'])} problems"]
    return "\n".join(lines + [f"  {problem}" for problem in report["problems"]])


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run verify; returns the report (also printed)."""
    verify, options = split_job_flags(VerifyOptions, argv, __doc__)
    if not verify.dataset:
        raise ValueError("--dataset is required")
    dataset = verify.dataset.rstrip("/")
    manifest = load_dataset_manifest(dataset)
    if verify.no_embeddings is None:
        no_embeddings = bool(manifest.get("config", {}).get("no_embeddings", False))
    else:
        no_embeddings = verify.no_embeddings == "true"
    report_path = report_path_for(verify.report, options, REPORT_FILE)
    with make_pipeline(options) as pipeline:
        _ = pipeline | "Verify" >> VerifyDataset(dataset, manifest, report_path, no_embeddings)
    report = read_json_report(report_path)
    print(format_report(report))
    return report


def main(argv: Optional[list[str]] = None) -> None:
    try:
        report = run(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.WARNING)
    main()
