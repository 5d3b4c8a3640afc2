"""Export a built dataset to FDH's own layout, which DP2's FDH configs read.

    OUTPUT/train/out-%06d.tar (+ .parquet)   OUTPUT/val/out-%06d.tar (+ .parquet)
    OUTPUT/metadata.json                      OUTPUT/manifest.json

Our layout is `<licence>/<split>/out-*.tar`; FDH's (its download.py) and DP2's configs
(configs/datasets/fdh.py: `fdh/train/out-{000000..001423}.tar`) have no licence level. The export
takes the chosen licences in the order given, then each licence's shards in index order, and
re-packs their samples unchanged (same members, same bytes) into shards numbered contiguously
from 000000 per split, rolling at the same caps as FDH (3,000 samples or 200 MiB of tar). Each tar
gets its Parquet rows (with `shard` set to the new path); metadata.json is merged from the chosen
source shards' Parquet; the manifest lists the shards and where they came from. Streams one sample at a time.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator, Optional, Sequence

from dataset import fs
from dataset.layout import FORMAT_VERSION, PARQUET_EXT, SHARD_STEM, TAR_EXT, shard_location, shard_parquet_path
from dataset.manifest import load_manifest, save_manifest
from dataset.metadata import metadata_entries, write_metadata_json
from dataset.schema import KEY_COLUMN
from dataset.shards import TarShardWriter, iter_parquet_rows, read_tar_shard, write_parquet_shard

MAX_SAMPLES = 3000  # FDH download.py: shards roll at 3,000 samples or 200 MiB
MAX_BYTES = 200 * 2**20
TAR_BLOCK = 512
SPLITS = ("train", "val")
EXPORT_FORMAT = "fdh"


def fdh_shard_path(split: str, index: int) -> str:
    """Relative path of an exported tar: `{split}/out-{index:06d}.tar` (FDH's layout)."""
    return f"{split}/{SHARD_STEM}{int(index):06d}.{TAR_EXT}"


def _fdh_parquet_path(tar_path: str) -> str:
    return tar_path[:-len(TAR_EXT)] + PARQUET_EXT


def sample_tar_bytes(members: dict[str, Any]) -> int:
    """Bytes one sample takes in a tar: a 512-byte header per member plus its data padded to 512."""
    return sum(TAR_BLOCK * (1 + -(-len(data) // TAR_BLOCK))
               for name, data in members.items() if not name.startswith("__"))


def source_shards(manifest: dict, licenses: Sequence[str], split: str) -> list[dict]:
    """The manifest entries of `split` for `licenses`, licence by licence (as given), by index."""
    by_license = {license: [] for license in licenses}
    for entry in manifest["shards"]:
        license, entry_split, index = shard_location(entry["path"])
        if entry_split == split and license in by_license:
            by_license[license].append((index, entry))
    return [entry for license in licenses for _, entry in sorted(by_license[license], key=lambda p: p[0])]


def _samples_with_rows(dataset: str, entries: Iterable[dict]) -> Iterator[tuple[dict, dict, str]]:
    """(tar members, Parquet row, licence slug) of every sample of `entries`, in file order; the
    tar and the Parquet must agree."""
    for entry in entries:
        license = shard_location(entry["path"])[0]
        tar = read_tar_shard(fs.join(dataset, entry["path"]))
        rows = iter_parquet_rows(fs.join(dataset, shard_parquet_path(entry)))
        for members, row in itertools.zip_longest(tar, rows):
            if members is None or row is None or members["__key__"] != row[KEY_COLUMN]:
                raise ValueError(f"{entry['path']}: tar and Parquet disagree at "
                                 f"{None if members is None else members['__key__']!r} / "
                                 f"{None if row is None else row[KEY_COLUMN]!r}: run verify")
            yield members, row, license


def _chunks(items: Iterator[tuple[dict, dict, str]], max_samples: int, max_bytes: int
            ) -> Iterator[Iterator[tuple[dict, dict, str]]]:
    """Split the stream into consecutive shards of <= max_samples and <= max_bytes of samples (a
    single sample larger than max_bytes gets a shard of its own)."""
    pending = next(items, None)
    while pending is not None:
        state = {"count": 0, "bytes": 0}

        def one_shard():
            nonlocal pending
            while pending is not None:
                size = sample_tar_bytes(pending[0])
                if state["count"] and (state["count"] >= max_samples or state["bytes"] + size > max_bytes):
                    return
                state["count"] += 1
                state["bytes"] += size
                yield pending
                pending = next(items, None)

        yield one_shard()


def _write_fdh_shard(output: str, relative: str, items: Iterable[tuple[dict, dict, str]],
                     split: str) -> dict[str, Any]:
    """One exported tar and its Parquet; returns its manifest entry."""
    rows: list[dict[str, Any]] = []
    licenses: list[str] = []
    with TarShardWriter(fs.join(output, relative), root=output) as writer:
        for members, row, license in items:
            writer.write(members)
            rows.append({**row, "shard": relative})
            if license not in licenses:
                licenses.append(license)
        info = writer.close()
    parquet = _fdh_parquet_path(relative)
    parquet_sha = write_parquet_shard(fs.join(output, parquet), rows)
    return {**info.to_dict(), "split": split, "licenses": licenses, "parquet": parquet,
            "parquet_sha256": parquet_sha}


def export_fdh_layout(dataset: str, licenses: Sequence[str], output: str,
                      max_samples: int = MAX_SAMPLES, max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """Write `licenses` of `dataset` to `output` in FDH's layout; returns the new manifest.

    ValueError when a licence is not in the dataset, output is the dataset, or it already holds a
    manifest (an export is never written over)."""
    dataset, output = dataset.rstrip("/"), output.rstrip("/")
    if not licenses:
        raise ValueError("choose at least one licence (--licenses=cc-by-2,...)")
    if dataset == output:
        raise ValueError("--output must differ from --dataset")
    if fs.exists(fs.join(output, "manifest.json")):
        raise ValueError(f"{output} already holds a manifest.json: choose an empty --output")
    source = load_manifest(dataset)
    present = {shard_location(e["path"])[0] for e in source["shards"]}
    missing = [license for license in licenses if license not in present]
    if missing:
        raise ValueError(f"licences {missing} are not in {dataset} (it has {sorted(present)})")
    shards, chosen = [], []
    for split in SPLITS:
        chosen += source_shards(source, licenses, split)
        items = _samples_with_rows(dataset, source_shards(source, licenses, split))
        for index, chunk in enumerate(_chunks(items, max_samples, max_bytes)):
            shards.append(_write_fdh_shard(output, fdh_shard_path(split, index), chunk, split))
    # merged from the source shards (each key sorted; a re-packed shard may span two of them)
    count = write_metadata_json(output, metadata_entries(dataset, chosen))
    manifest = {
        "format": EXPORT_FORMAT, "format_version": FORMAT_VERSION,
        "derived_from": {"dataset": dataset, "licenses": list(licenses),
                         "config": source.get("config"), "versions": source.get("versions"),
                         "crawl_time": source.get("crawl_time")},
        "config": {"max_samples": max_samples, "max_bytes": max_bytes},
        "samples": count, "shards": shards,
    }
    save_manifest(output, manifest)
    return manifest
