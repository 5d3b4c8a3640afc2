"""Derive the no-embeddings variant of a built dataset without re-annotating.

Each tar shard is rewritten without `e_mask.png` / `vertices.npy` (other members byte for byte,
same order, same shard boundaries); Parquet files, metadata.json, the opt-out list and rejects are
copied; the manifest is rewritten with the new sha256s/sizes and `config.no_embeddings = true`.
"""
from __future__ import annotations

import hashlib
from typing import Any

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.s8_write.encode import strip_embedding_members
from transforms.s8_write.run_outputs import (MANIFEST_FILE, METADATA_FILE, OPT_OUT_FILE, STATS_FILE,
                                             dataset_path, finalize_dataset, load_json)
from transforms.s8_write.shards import (read_tar_shard, shard_entry, write_bytes_atomic,
                                        write_tar_shard)


def copy_file(source: str, destination: str) -> bytes:
    """Copy one file (atomically at the destination); returns its bytes."""
    with FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        data = handle.read()
    write_bytes_atomic(destination, data)
    return data


def strip_shard(dataset: str, output: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Rewrite one shard of `dataset` into `output` without embeddings; returns its manifest entry."""
    info = write_tar_shard(dataset_path(output, entry["path"]),
                           (strip_embedding_members(members)
                            for members in read_tar_shard(dataset_path(dataset, entry["path"]))),
                           root=output.rstrip("/"))
    if info.samples != entry["samples"]:
        raise ValueError(f"{entry['path']}: manifest says {entry['samples']} samples, "
                         f"the shard has {info.samples}")
    parquet = copy_file(dataset_path(dataset, entry["parquet"]), dataset_path(output, entry["parquet"]))
    return shard_entry(info, hashlib.sha256(parquet).hexdigest())


def check_strip_paths(dataset: str, output: str) -> dict[str, Any]:
    """Fail early on a bad --dataset/--output; returns the input manifest."""
    if dataset.rstrip("/") == output.rstrip("/"):
        raise ValueError("--output must differ from --dataset")
    if not FileSystems.exists(dataset_path(dataset, MANIFEST_FILE)):
        raise FileNotFoundError(f"{dataset} has no {MANIFEST_FILE}: not a complete dataset")
    return load_json(dataset, MANIFEST_FILE)


def finish_strip(dataset: str, output: str, entries: list[dict], manifest: dict) -> dict[str, Any]:
    """Copy the run-level files and write the new manifest once every shard is stripped."""
    for name in (METADATA_FILE, OPT_OUT_FILE):
        if FileSystems.exists(dataset_path(dataset, name)):
            copy_file(dataset_path(dataset, name), dataset_path(output, name))
    rejects = [meta.path for result in FileSystems.match([dataset_path(dataset, "rejects/*")])
               for meta in result.metadata_list]
    for path in rejects:
        copy_file(path, dataset_path(output, "rejects/" + path.rsplit("/", 1)[-1]))
    counts = None
    if FileSystems.exists(dataset_path(dataset, STATS_FILE)):
        counts = load_json(dataset, STATS_FILE).get("funnel")
    config = {**manifest.get("config", {}), "no_embeddings": True, "derived_from": dataset}
    return finalize_dataset(output, entries, config, manifest.get("versions", {}),
                            manifest.get("crawl_time", 0.0), counts, write_metadata=False)


def strip_dataset(dataset: str, output: str) -> dict[str, Any]:
    """The no-embeddings variant of `dataset` in `output`, in this process; returns the new manifest."""
    manifest = check_strip_paths(dataset, output)
    entries = [strip_shard(dataset, output, entry) for entry in manifest["shards"]]
    return finish_strip(dataset, output, entries, manifest)
