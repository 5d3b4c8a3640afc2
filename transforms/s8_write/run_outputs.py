"""Run-level files of a dataset: manifest.json, metadata.json, stats.json (and opt_out.txt).

* manifest.json: {"format_version", "config", "versions", "crawl_time", "shards": [entry...]}
  with one entry per tar shard, sorted by path: path, sha256, samples, bytes, license, split,
  parquet, parquet_sha256.
* metadata.json: FDH's {sample_key: entry} in key order, streamed by a k-way merge of the (key
  sorted) Parquet shards, at most MERGE_FAN_IN files at a time (intermediate sorted runs go to a
  local temporary directory), so its memory depends on neither the sample nor the shard count,
  and it always agrees with the Parquet files.
* stats.json: the funnel (counts per stage and reject reason, as given) and samples/bytes/shards
  per licence x split.

All JSON is `json.dumps(obj, sort_keys=True, indent=1)` + newline, written to a temporary name
then renamed, so the files are byte-identical across re-runs.
"""
from __future__ import annotations

import functools
import heapq
import itertools
import json
import logging
import os
import platform
import tempfile
import zlib
from typing import Any, Iterable, Iterator, Optional

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.opt_out import OPT_OUT_FILENAME
from transforms.s8_write.encode import DEFAULT_CRAWL_TIME, METADATA_FIELDS, PNG_COMPRESS_LEVEL
from transforms.s8_write.shards import (TEMP_MARKER, atomic_create, iter_parquet_rows,
                                        write_bytes_atomic)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
METADATA_FILE = "metadata.json"
STATS_FILE = "stats.json"
OPT_OUT_FILE = OPT_OUT_FILENAME
JSON_INDENT = 1


def dataset_path(dataset: str, name: str) -> str:
    return FileSystems.join(dataset.rstrip("/"), name)


def dumps(obj: Any) -> str:
    """The one JSON layout of every run-level file."""
    return json.dumps(obj, sort_keys=True, indent=JSON_INDENT) + "\n"


def load_json(dataset: str, name: str) -> Any:
    """Read DATASET/NAME as JSON."""
    with FileSystems.open(dataset_path(dataset, name),
                          compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return json.loads(handle.read().decode("utf-8"))


def save_json(dataset: str, name: str, obj: Any) -> None:
    """Write DATASET/NAME as JSON (sorted keys, fixed indent), to a temporary name then renamed."""
    write_bytes_atomic(dataset_path(dataset, name), dumps(obj).encode("utf-8"))


def write_metadata_json(dataset: str, entries: Iterable[tuple[str, dict]]) -> int:
    """Stream (key, entry) pairs, in key order, into DATASET/metadata.json; returns the count.

    The bytes equal `save_json(dataset, METADATA_FILE, dict(entries))`.
    """
    count = 0
    last = None
    with atomic_create(dataset_path(dataset, METADATA_FILE)) as handle:
        for key, entry in entries:
            if last is not None and key <= last:
                raise ValueError(f"metadata keys out of order or repeated: {last!r} then {key!r}")
            body = json.dumps(entry, sort_keys=True, indent=JSON_INDENT).replace(
                "\n", "\n" + " " * JSON_INDENT)
            prefix = "{\n" if count == 0 else ",\n"
            handle.write(f"{prefix}{' ' * JSON_INDENT}{json.dumps(key)}: {body}".encode("utf-8"))
            count += 1
            last = key
        handle.write(b"{}\n" if count == 0 else b"\n}\n")
    return count


MERGE_FAN_IN = 32  # Parquet shards (or merged runs) read at once while merging metadata.json


def _shard_metadata(dataset: str, entry: dict) -> Iterator[tuple[str, dict]]:
    """(key, metadata entry) of one shard's Parquet, in file (key) order, 64 rows in memory."""
    for row in iter_parquet_rows(dataset_path(dataset, entry["parquet"]),
                                 columns=["key", *METADATA_FIELDS], batch_size=64):
        key = row.pop("key")
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


def code_versions() -> dict[str, str]:
    """Versions of the code that decide the output bytes (recorded in the manifest)."""
    import importlib.metadata as metadata

    import numpy
    import PIL
    import pyarrow

    def package_version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {"fdh_beam": package_version("fdh-beam"), "apache_beam": beam.__version__,
            "numpy": numpy.__version__, "pillow": PIL.__version__, "pyarrow": pyarrow.__version__,
            "python": platform.python_version(), "zlib": zlib.ZLIB_RUNTIME_VERSION}


def resolve_crawl_time(output_dir: str, crawl_time: Optional[float] = None,
                       default: float = DEFAULT_CRAWL_TIME) -> float:
    """The run-level crawl time: the one given, else the existing manifest's, else `default`."""
    if crawl_time is not None:
        return float(crawl_time)
    if FileSystems.exists(dataset_path(output_dir, MANIFEST_FILE)):
        return float(load_json(output_dir, MANIFEST_FILE).get("crawl_time", default))
    return float(default)


def build_stats(shards: list[dict], counts: Optional[dict] = None) -> dict[str, Any]:
    """stats.json: the funnel counts and samples/bytes/shards per licence x split."""
    written: dict[str, dict[str, dict[str, int]]] = {}
    for entry in shards:
        cell = written.setdefault(entry["license"], {}).setdefault(
            entry["split"], {"samples": 0, "bytes": 0, "shards": 0})
        cell["samples"] += int(entry["samples"])
        cell["bytes"] += int(entry["bytes"])
        cell["shards"] += 1
    return {
        "funnel": {str(name): value for name, value in sorted((counts or {}).items())},
        "written": written,
        "totals": {"samples": sum(int(e["samples"]) for e in shards),
                   "bytes": sum(int(e["bytes"]) for e in shards), "shards": len(shards)},
    }


def build_manifest(shards: list[dict], config: dict, versions: dict,
                   crawl_time: float) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "config": {"png_compress_level": PNG_COMPRESS_LEVEL, **config},
        "versions": {**code_versions(), **versions},
        "crawl_time": float(crawl_time),
        "shards": sorted(shards, key=lambda entry: entry["path"]),
    }


def _glob(pattern: str) -> list[str]:
    return [meta.path for result in FileSystems.match([pattern]) for meta in result.metadata_list]


def remove_leftovers(dataset: str, shards: list[dict]) -> list[str]:
    """Delete temporary files of killed writers and shards that the manifest does not list."""
    listed = {dataset_path(dataset, e["path"]) for e in shards}
    listed |= {dataset_path(dataset, e["parquet"]) for e in shards}
    root = dataset.rstrip("/")
    found = _glob(f"{root}/*/*/.*{TEMP_MARKER}*")
    found += [path for pattern in ("out-*.tar", "out-*.parquet")
              for path in _glob(f"{root}/*/*/{pattern}") if path not in listed]
    if found:
        logging.info("removing %d leftover files under %s", len(found), dataset)
        FileSystems.delete(sorted(found))
    return sorted(found)


def finalize_dataset(output_dir: str, shards: list[dict], config: Optional[dict] = None,
                     versions: Optional[dict] = None, crawl_time: float = DEFAULT_CRAWL_TIME,
                     counts: Optional[dict] = None, write_metadata: bool = True) -> dict[str, Any]:
    """Write metadata.json (from the shards' Parquet), stats.json and manifest.json; returns the manifest.

    Call it after every shard is written; it also removes leftover temporary files and shards not
    in `shards`. The manifest is written last: its presence marks a complete dataset.
    """
    manifest = build_manifest(list(shards), dict(config or {}), dict(versions or {}), crawl_time)
    remove_leftovers(output_dir, manifest["shards"])
    if write_metadata:
        write_metadata_json(output_dir, metadata_entries(output_dir, manifest["shards"]))
    save_json(output_dir, STATS_FILE, build_stats(manifest["shards"], counts))
    save_json(output_dir, MANIFEST_FILE, manifest)
    return manifest


def _finalize_collected(shards: list[dict], counts: dict, output_dir: str, config: dict,
                        versions: dict, crawl_time: float) -> dict[str, Any]:
    return finalize_dataset(output_dir, shards, config, versions, crawl_time, counts)


class WriteRunOutputs(beam.PTransform):
    """Write manifest.json, metadata.json and stats.json once every shard is written.

    Input: the PCollection of shard entries from `WriteShards`, or a dict {"shards": that,
    "counts": a singleton PCollection of {"stage.reason": count}} (e.g. `CountRejects` merged with
    kept counts). Output: a singleton PCollection holding the manifest dict.
    """

    def __init__(self, output_dir: str, config: Optional[dict] = None,
                 versions: Optional[dict] = None, crawl_time: Optional[float] = None):
        super().__init__()
        self._output_dir = output_dir.rstrip("/")
        self._config = dict(config or {})
        self._versions = dict(versions or {})
        self._crawl_time = resolve_crawl_time(self._output_dir, crawl_time)

    def expand(self, inputs):
        if isinstance(inputs, dict):
            shards, counts = inputs["shards"], inputs.get("counts")
        else:
            shards, counts = inputs, None
        shard_list = shards | "CollectShards" >> beam.combiners.ToList()
        counts_side = (beam.pvalue.AsSingleton(counts, default_value={}) if counts is not None
                       else None)
        return shard_list | "Finalize" >> beam.Map(
            _finalize_collected, counts=counts_side if counts_side is not None else {},
            output_dir=self._output_dir, config=self._config, versions=self._versions,
            crawl_time=self._crawl_time)
