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

from typing import Any, Iterator, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_jobs.common import JobOptions, make_pipeline, report_path_for, run_main, split_job_flags
from dataset import fs
from dataset.manifest import load_manifest
from dataset.stats import human_bytes
from dataset.verify import verify_run_files, verify_shard
from transforms.records import METRICS_NAMESPACE

REPORT_FILE = "verify_report.json"


class VerifyOptions(JobOptions):
    """Flags of the verify job (any Beam / Dataflow flag passes through)."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument("--dataset", required=True,
                            help="Root of the dataset to check (local path or gs://).")
        parser.add_argument("--no_embeddings", default=None, choices=("true", "false"),
                            help="Whether samples lack vertices.npy / e_mask.png (default: the "
                                 "manifest's config.no_embeddings, else false).")
        parser.add_argument("--report", default=None,
                            help="Where the job writes its JSON report (default: a temp file "
                                 "for local runs; required on remote runners).")


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
        fs.write_json(self._report, report)
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
                f"{human_bytes(report['bytes'])} verified")
    lines = [f"FAILED: {report['dataset']}: {len(report['problems'])} problems"]
    return "\n".join(lines + [f"  {problem}" for problem in report["problems"]])


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run verify; returns the report (also printed)."""
    verify, options = split_job_flags(VerifyOptions, argv, __doc__)
    if not verify.dataset:
        raise ValueError("--dataset is required")
    dataset = verify.dataset.rstrip("/")
    manifest = load_manifest(dataset)
    if verify.no_embeddings is None:
        no_embeddings = bool(manifest.get("config", {}).get("no_embeddings", False))
    else:
        no_embeddings = verify.no_embeddings == "true"
    report_path = report_path_for(verify.report, options, REPORT_FILE)
    with make_pipeline(options) as pipeline:
        _ = pipeline | "Verify" >> VerifyDataset(dataset, manifest, report_path, no_embeddings)
    report = fs.read_json(report_path)
    print(format_report(report))
    return report


def main(argv: Optional[list[str]] = None) -> None:
    run_main(run, argv, exit_code=lambda report: 0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
