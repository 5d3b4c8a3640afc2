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
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

from transforms.records import DETAIL_MAX_CHARS, METRICS_NAMESPACE, REJECTS_TAG, Rejected

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


def rejects_to_table(rejects: list[Rejected]) -> pa.Table:
    """`Rejected`s as one REJECTS_SCHEMA table (the rows `WriteRejects` writes)."""
    return pa.Table.from_pylist([rejected_to_row(rejected) for rejected in rejects],
                                schema=REJECTS_SCHEMA)


def truncated_details(details: pa.Array) -> pa.Array:
    """A string column of details cut as `Rejected` cuts one: over DETAIL_MAX_CHARS characters,
    the first DETAIL_MAX_CHARS - 3 and '...'."""
    long = pc.greater(pc.utf8_length(details), DETAIL_MAX_CHARS)
    if not pc.any(long).as_py():
        return details
    cut = pc.utf8_slice_codeunits(details, 0, DETAIL_MAX_CHARS - 3)
    return pc.if_else(long, pc.binary_join_element_wise(cut, "...", ""), details)


def reject_table(stage: str, reasons: pa.Array, record_ids: pa.Array, details: pa.Array,
                 photo_ids: pa.Array, user_nsids: pa.Array) -> pa.Table:
    """Rejects of one stage built column by column as a REJECTS_SCHEMA table: the rows
    `rejects_to_table` gives for the same `reject(...)` calls, without a Python object per row."""
    columns = [record_ids, pa.repeat(pa.scalar(stage, pa.string()), len(reasons)), reasons,
               truncated_details(details), photo_ids, user_nsids]
    return pa.Table.from_arrays([column.cast(field.type) for column, field in
                                 zip(columns, REJECTS_SCHEMA)], schema=REJECTS_SCHEMA)


def count_reject_table(table: pa.Table) -> list[tuple[str, int]]:
    """("stage.reason", count) pairs of a REJECTS_SCHEMA table (`reject_counts_key`'s keys)."""
    keys = pc.binary_join_element_wise(table.column("stage"), table.column("reason"), ".")
    return [(count["values"], count["counts"]) for count in pc.value_counts(keys).to_pylist()]


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
