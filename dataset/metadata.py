"""metadata.json: FDH's {sample_key: entry} in key order, always derived from the shards' Parquet.

Streamed by a k-way merge of the (key sorted) Parquet shards, at most MERGE_FAN_IN files at a time
(intermediate sorted runs go to a local temporary directory), so its memory depends on neither the
sample nor the shard count, and it always agrees with the Parquet files. The bytes equal
`fs.save_json(dataset, METADATA_FILE, dict(entries))`.
"""
from __future__ import annotations

import functools
import heapq
import itertools
import json
import os
import tempfile
from typing import Iterable, Iterator, Optional

from dataset import fs
from dataset.layout import METADATA_FILE
from dataset.schema import KEY_COLUMN, METADATA_FIELDS
from dataset.shards import iter_parquet_rows


def write_metadata_json(dataset: str, entries: Iterable[tuple[str, dict]]) -> int:
    """Stream (key, entry) pairs, in key order, into DATASET/metadata.json; returns the count.

    The bytes equal `save_json(dataset, METADATA_FILE, dict(entries))`.
    """
    count = 0
    last = None
    with fs.atomic_create(fs.join(dataset, METADATA_FILE)) as handle:
        for key, entry in entries:
            if last is not None and key <= last:
                raise ValueError(f"metadata keys out of order or repeated: {last!r} then {key!r}")
            body = json.dumps(entry, sort_keys=True, indent=fs.JSON_INDENT).replace(
                "\n", "\n" + " " * fs.JSON_INDENT)
            prefix = "{\n" if count == 0 else ",\n"
            handle.write(f"{prefix}{' ' * fs.JSON_INDENT}{json.dumps(key)}: {body}".encode("utf-8"))
            count += 1
            last = key
        handle.write(b"{}\n" if count == 0 else b"\n}\n")
    return count


MERGE_FAN_IN = 32  # Parquet shards (or merged runs) read at once while merging metadata.json


def _shard_metadata(dataset: str, entry: dict) -> Iterator[tuple[str, dict]]:
    """(key, metadata entry) of one shard's Parquet, in file (key) order, 64 rows in memory."""
    for row in iter_parquet_rows(fs.join(dataset, entry["parquet"]),
                                 columns=[KEY_COLUMN, *METADATA_FIELDS], batch_size=64):
        key = row.pop(KEY_COLUMN)
        yield key, row


def _read_run(path: str) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            key, entry = json.loads(line)
            yield key, entry


def _merge(sources: list[Iterator[tuple[str, dict]]]) -> Iterator[tuple[str, dict]]:
    return heapq.merge(*sources, key=lambda pair: pair[0])


def metadata_entries(dataset: str, shards: Iterable[dict],
                     fan_in: Optional[int] = None) -> Iterator[tuple[str, dict]]:
    """(key, FDH metadata entry) of every sample, merged in key order from the shards' Parquet.

    Memory is bounded by `fan_in`, not by the number of shards: each open Parquet reader holds a
    decoded row group, so with more than `fan_in` shards, groups of `fan_in` are first merged into
    sorted runs (JSON lines in a local temporary directory), and runs are merged likewise until one
    merge of at most `fan_in` (default MERGE_FAN_IN) inputs is left. JSON keeps every value
    exactly (str, int, float, None).
    """
    fan_in = max(2, int(fan_in or MERGE_FAN_IN))
    shards = list(shards)
    if len(shards) <= fan_in:
        yield from _merge([_shard_metadata(dataset, entry) for entry in shards])
        return
    with tempfile.TemporaryDirectory(prefix="fdh-metadata-") as scratch:
        sources = [functools.partial(_shard_metadata, dataset, entry) for entry in shards]
        runs: list[str] = []
        names = itertools.count()
        while len(sources) > fan_in:
            previous, runs = runs, []
            for start in range(0, len(sources), fan_in):
                runs.append(os.path.join(scratch, f"run-{next(names)}.jsonl"))
                with open(runs[-1], "w", encoding="utf-8") as handle:
                    for pair in _merge([source() for source in sources[start:start + fan_in]]):
                        handle.write(json.dumps(pair) + "\n")
            for path in previous:
                os.remove(path)
            sources = [functools.partial(_read_run, path) for path in runs]
        yield from _merge([source() for source in sources])
