"""Finish a written dataset: manifest.json, metadata.json and stats.json once every shard is written.

The formats live in `dataset` (layout, schema, metadata, fs); this module decides what a run
records (config, code versions, crawl time) and when the files are written: the manifest last,
so its presence marks a complete dataset.
"""
from __future__ import annotations

import platform
import zlib
from typing import Any, Optional

import apache_beam as beam

from dataset import fs, ownership
from dataset.layout import FORMAT_VERSION, MANIFEST_FILE, STATS_FILE
from dataset.metadata import metadata_entries, write_metadata_json
from dataset.schema import build_stats
from transforms.s8_write.encode import DEFAULT_CRAWL_TIME, PNG_COMPRESS_LEVEL


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
    if fs.exists(fs.join(output_dir, MANIFEST_FILE)):
        return float(fs.load_json(output_dir, MANIFEST_FILE).get("crawl_time", default))
    return float(default)


def build_manifest(shards: list[dict], config: dict, versions: dict,
                   crawl_time: float) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "config": {"png_compress_level": PNG_COMPRESS_LEVEL, **config},
        "versions": {**code_versions(), **versions},
        "crawl_time": float(crawl_time),
        "shards": sorted(shards, key=lambda entry: entry["path"]),
    }


def remove_leftovers(dataset: str, shards: list[dict]) -> list[str]:
    """Delete temporary files of killed writers and the shards the previous manifest listed that
    `shards` does not (never a file no manifest listed: `dataset.ownership`)."""
    return ownership.remove_leftovers(dataset, shards)


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
    fs.save_json(output_dir, STATS_FILE, build_stats(manifest["shards"], counts))
    fs.save_json(output_dir, MANIFEST_FILE, manifest)
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
