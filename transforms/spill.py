"""Spilled shuffles: stage data in files and send only references through a GroupByKey.

Beam's in-process runner holds a whole PCollection at each GroupByKey, so what crosses one
decides local memory. A step that must group much data by bucket (the duplicate check of the
scan) stages its rows instead: `spill_by_bucket` sorts a table by bucket and appends one Arrow
IPC stream per bucket to a new file under a staging folder (local or gs://), returning
(bucket, SpillRef) pairs of a few dozen bytes; after the GroupByKey, `read_spilled` reads a
bucket's slices back. Memory then holds one bucket at a time, not the input.

The staging folder belongs to one run (`new_staging_dir`); `remove_staging` deletes the files
this module wrote there (`*.arrows`) and nothing else.
"""
from __future__ import annotations

import os
import uuid
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

SUFFIX = ".arrows"
STAGING_FOLDER = "_staging"


class SpillRef(NamedTuple):
    """Where one bucket's slice of a staged table lies: a file, a byte offset and a length."""

    path: str
    offset: int
    length: int


def new_staging_dir(output: str, job: str) -> str:
    """A fresh staging folder for one run of `job` under `output` (OUTPUT/_staging/JOB-HEX)."""
    return f"{output.rstrip('/')}/{STAGING_FOLDER}/{job}-{uuid.uuid4().hex[:16]}"


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def spill_by_bucket(table: pa.Table, buckets: np.ndarray, staging_dir: str
                    ) -> Iterator[tuple[int, SpillRef]]:
    """Write `table`'s rows to a new file in `staging_dir`, grouped by `buckets` (one int per
    row), and yield (bucket, SpillRef) for each bucket present, in bucket order."""
    if not len(buckets):
        return
    order = np.argsort(buckets, kind="stable")
    table, buckets = table.take(pa.array(order)), buckets[order]
    starts = np.flatnonzero(np.diff(buckets, prepend=buckets[0] - 1)).tolist()
    path = f"{staging_dir}/{uuid.uuid4().hex}{SUFFIX}"
    refs, offset = [], 0
    with FileSystems.create(path) as handle:
        for start, end in zip(starts, starts[1:] + [len(buckets)]):
            data = _ipc_bytes(table.slice(start, end - start))
            handle.write(data)
            refs.append((int(buckets[start]), SpillRef(path, offset, len(data))))
            offset += len(data)
    yield from refs


def read_spilled(refs: Iterable[SpillRef]) -> pa.Table:
    """The rows of `refs` (one bucket's slices) as one table, in the order of the refs."""
    tables = []
    for ref in refs:
        with FileSystems.open(ref.path, mime_type="application/octet-stream",
                              compression_type="uncompressed") as handle:
            handle.seek(ref.offset)
            tables.append(pa.ipc.open_stream(handle.read(ref.length)).read_all())
    return pa.concat_tables(tables)


def remove_staging(staging_dir: str) -> int:
    """Delete the staged files of a run (and its folder when local and then empty); the number
    of files deleted. Files this module did not name are left alone."""
    matched = FileSystems.match([f"{staging_dir}/*{SUFFIX}"])[0].metadata_list
    paths = [metadata.path for metadata in matched]
    if paths:
        FileSystems.delete(paths)
    for folder in (staging_dir, os.path.dirname(staging_dir)):
        if "://" not in folder and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
    return len(paths)
