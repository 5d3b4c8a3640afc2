"""Derive the no-embeddings variant of a built dataset without re-annotating.

Each tar shard is rewritten without `e_mask.png` / `vertices.npy` (other members byte for byte,
same order, same shard boundaries); Parquet files, metadata.json, the opt-out list and rejects are
copied; the manifest is rewritten with the new sha256s/sizes and `config.no_embeddings = true`.
"""
from __future__ import annotations

import hashlib
from typing import Any

from dataset import fs
from dataset.layout import METADATA_FILE, OPT_OUT_FILE, REJECTS_DIR, STATS_FILE
from dataset.manifest import load_manifest
from dataset.shards import read_tar_shard, shard_entry, write_tar_shard
from transforms.s8_write.encode import strip_embedding_members
from transforms.s8_write.run_outputs import finalize_dataset


def strip_shard(dataset: str, output: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Rewrite one shard of `dataset` into `output` without embeddings; returns its manifest entry."""
    info = write_tar_shard(fs.join(output, entry["path"]),
                           (strip_embedding_members(members)
                            for members in read_tar_shard(fs.join(dataset, entry["path"]))),
                           root=output.rstrip("/"))
    if info.samples != entry["samples"]:
        raise ValueError(f"{entry['path']}: manifest says {entry['samples']} samples, "
                         f"the shard has {info.samples}")
    parquet = fs.copy_file(fs.join(dataset, entry["parquet"]), fs.join(output, entry["parquet"]))
    return shard_entry(info, hashlib.sha256(parquet).hexdigest())


def check_strip_paths(dataset: str, output: str) -> dict[str, Any]:
    """Fail early on a bad --dataset/--output; returns the input manifest."""
    if dataset.rstrip("/") == output.rstrip("/"):
        raise ValueError("--output must differ from --dataset")
    return load_manifest(dataset)


def finish_strip(dataset: str, output: str, entries: list[dict], manifest: dict) -> dict[str, Any]:
    """Copy the run-level files and write the new manifest once every shard is stripped."""
    for name in (METADATA_FILE, OPT_OUT_FILE):
        if fs.exists(fs.join(dataset, name)):
            fs.copy_file(fs.join(dataset, name), fs.join(output, name))
    for path in fs.glob(fs.join(dataset, f"{REJECTS_DIR}/*")):
        fs.copy_file(path, fs.join(output, f"{REJECTS_DIR}/" + path.rsplit("/", 1)[-1]))
    counts = None
    if fs.exists(fs.join(dataset, STATS_FILE)):
        counts = fs.load_json(dataset, STATS_FILE).get("funnel")
    config = {**manifest.get("config", {}), "no_embeddings": True, "derived_from": dataset}
    return finalize_dataset(output, entries, config, manifest.get("versions", {}),
                            manifest.get("crawl_time", 0.0), counts, write_metadata=False)

