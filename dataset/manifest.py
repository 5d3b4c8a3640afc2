"""manifest.json: load and save, and what it says about the shard files.

{"format_version", "config", "versions", "crawl_time", "shards": [entry...]}; one entry per tar
shard, sorted by path (`schema.SHARD_ENTRY_FIELDS`). Its presence marks a complete dataset.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from dataset import fs
from dataset.layout import (MANIFEST_FILE, PARQUET_EXT, TAR_EXT, is_shard_file, parquet_path_for,
                            shard_parquet_path, shard_path)


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


def unsafe_shard_path(entry: Mapping[str, Any]) -> str | None:
    """Why a manifest entry's paths must not be used (absolute, `..`, not the shard template), or
    None. Jobs that write where a manifest points (takedown, strip_embeddings) check every entry
    first, so a hand-edited manifest never makes them write outside the dataset (issue 10, 8)."""
    path = entry.get("path")
    parquet = entry.get("parquet") or (parquet_path_for(path) if isinstance(path, str)
                                       and path.endswith(".tar") else None)
    for value, ext in ((path, TAR_EXT), (parquet, PARQUET_EXT)):
        if not isinstance(value, str):
            return f"{value!r}: not a path"
        if value.startswith(("/", "\\")) or "://" in value or ":" in value.split("/", 1)[0]:
            return f"{value!r}: an absolute path"
        if ".." in value.replace("\\", "/").split("/"):
            return f"{value!r}: contains '..'"
        if not is_shard_file(value, ext):
            return f"{value!r}: not a shard path of the form {shard_path('LICENCE', 'SPLIT', 0)}"
    if parquet_path_for(path) != parquet:
        return f"{parquet!r}: not beside its tar {path!r}"
    return None


def check_manifest_paths(dataset: str, manifest: Mapping[str, Any]) -> None:
    """Raise ValueError (one line, before anything is written) for the first unsafe shard entry."""
    for entry in manifest.get("shards", []):
        problem = unsafe_shard_path(entry) if isinstance(entry, Mapping) else f"{entry!r}: not an entry"
        if problem:
            raise ValueError(f"{dataset}/{MANIFEST_FILE} lists {problem}; refusing to write anything")
