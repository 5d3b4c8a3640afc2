"""manifest.json: load and save, and what it says about the shard files.

{"format_version", "config", "versions", "crawl_time", "shards": [entry...]}; one entry per tar
shard, sorted by path (`schema.SHARD_ENTRY_FIELDS`). Its presence marks a complete dataset.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from dataset import fs
from dataset.layout import MANIFEST_FILE, shard_parquet_path


def load_manifest(dataset: str) -> dict[str, Any]:
    """The manifest.json of a built dataset; FileNotFoundError (clear) when it is not one."""
    if not fs.exists(fs.join(dataset, MANIFEST_FILE)):
        raise FileNotFoundError(f"{dataset} has no {MANIFEST_FILE}: not a dataset")
    return fs.load_json(dataset, MANIFEST_FILE)


def save_manifest(dataset: str, manifest: Mapping[str, Any]) -> None:
    """Write DATASET/manifest.json (atomically, the one JSON layout)."""
    fs.save_json(dataset, MANIFEST_FILE, manifest)


def expected_shard_files(shards: Iterable[Mapping[str, Any]]) -> set[str]:
    """Relative paths of every tar and Parquet file the manifest names."""
    names = set()
    for entry in shards:
        names.add(entry["path"])
        names.add(shard_parquet_path(entry))
    return names
