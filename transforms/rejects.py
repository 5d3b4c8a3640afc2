"""Rejects: every element a stage drops becomes a `Rejected` record with a reason.

Stages emit them on the `rejects` side output through `reject()`, which also bumps a Beam
counter `fdh/<stage>.<reason>`. `WriteRejects` writes them as Parquet under OUTPUT/rejects/ and
`CountRejects` folds them into {"stage.reason": count} for stats.json.
"""
from __future__ import annotations

import functools
from typing import Optional

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics

from transforms.records import METRICS_NAMESPACE, REJECTS_TAG, Rejected

REJECTS_SCHEMA = pa.schema([
    ("record_id", pa.string()),
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("photo_id", pa.int64()),
    ("user_nsid", pa.string()),
])
# Beam's Parquet writer buffers 64 MiB of Arrow data per file before its first row group: ~150
# MiB of a local rebuild's peak at a million rejects. 4 MiB is ~55k rejects per row group.
ROW_GROUP_BYTES = 4 << 20


@functools.lru_cache(maxsize=1024)
def _reject_counter(stage: str, reason: str):
    # Metrics.counter() builds a new metric name each call (~3 us, at 100M lines a cost); the
    # returned counter holds no state of its own (inc() finds the current bundle's container),
    # so one per (stage, reason) per process can be reused.
    return Metrics.counter(METRICS_NAMESPACE, f"{stage}.{reason}")


def reject(stage: str, reason: str, record_id: str, detail: str = "",
           photo_id: Optional[int] = None, user_nsid: Optional[str] = None) -> beam.pvalue.TaggedOutput:
    """Build a `Rejected`, count it, and wrap it for the rejects side output of a DoFn."""
    _reject_counter(stage, reason).inc()
    return beam.pvalue.TaggedOutput(
        REJECTS_TAG, Rejected(record_id=record_id, stage=stage, reason=reason, detail=detail,
                              photo_id=photo_id, user_nsid=user_nsid))


def rejected_to_row(rejected: Rejected) -> dict:
    return {
        "record_id": rejected.record_id, "stage": rejected.stage, "reason": rejected.reason,
        "detail": rejected.detail, "photo_id": rejected.photo_id, "user_nsid": rejected.user_nsid,
    }


def reject_counts_key(rejected: Rejected) -> str:
    return f"{rejected.stage}.{rejected.reason}"


class WriteRejects(beam.PTransform):
    """Write `Rejected` records as Parquet files OUTPUT/rejects/rejects-SSSSS-of-NNNNN.parquet,
    in row groups of about `row_group_bytes` of Arrow data (what a writer buffers at most)."""

    def __init__(self, output_dir: str, num_shards: int = 0,
                 row_group_bytes: int = ROW_GROUP_BYTES):
        super().__init__()
        self._output_dir = output_dir.rstrip("/")
        self._num_shards = num_shards
        self._row_group_bytes = row_group_bytes

    def expand(self, rejects):
        return (
            rejects
            | "ToRow" >> beam.Map(rejected_to_row)
            | "WriteParquet" >> beam.io.WriteToParquet(
                f"{self._output_dir}/rejects/rejects", REJECTS_SCHEMA,
                file_name_suffix=".parquet", num_shards=self._num_shards,
                row_group_buffer_size=self._row_group_bytes))


class CountRejects(beam.PTransform):
    """Fold rejects into one dict {"stage.reason": count} (a singleton PCollection)."""

    def expand(self, rejects):
        return (
            rejects
            | "Key" >> beam.Map(lambda r: (reject_counts_key(r), 1))
            | "Sum" >> beam.CombinePerKey(sum)
            | "ToDict" >> beam.combiners.ToDict())
