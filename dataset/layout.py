"""Where things are in a dataset: the shard path template (format, parse, glob), file names and
tar member names. The one place that encodes them.

Shards: `{licence}/{split}/out-{index:06d}.tar`, numbered contiguously from 000000 per licence
and split, with the Parquet file of the same stem beside each tar.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from transforms.opt_out import OPT_OUT_FILENAME

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
METADATA_FILE = "metadata.json"
STATS_FILE = "stats.json"
OPT_OUT_FILE = OPT_OUT_FILENAME
REJECTS_DIR = "rejects"
STAGED_SUFFIX = ".takedown-staged"  # Parquet files a takedown has not moved into place yet

SHARD_STEM = "out-"
TAR_EXT = "tar"
PARQUET_EXT = "parquet"
SHARD_NAME_RE = re.compile(
    r"^(?P<license>[^/]+)/(?P<split>[^/]+)/out-(?P<index>\d{6})\.(?P<ext>tar|parquet)$")

# Tar members every FDH sample has; the embedding pair unless the dataset has none.
REQUIRED_MEMBERS = ("image.png", "mask.png", "maskrcnn_mask.png", "keypoints.npy")
EMBEDDING_MEMBERS = ("e_mask.png", "vertices.npy")
# Members in the order they are written to the tar (after `__key__`).
MEMBER_ORDER = ("image.png", "mask.png", "maskrcnn_mask.png", "e_mask.png", "keypoints.npy",
                "vertices.npy", "json")


def shard_path(license: str, split: str, index: int) -> str:
    """Relative path of a tar shard: `{license}/{split}/out-{index:06d}.tar`."""
    return f"{license}/{split}/{SHARD_STEM}{int(index):06d}.{TAR_EXT}"


def shard_location(path: str) -> tuple[str, str, int]:
    """(licence, split, index) parsed from a shard's relative path; ValueError if malformed."""
    found = SHARD_NAME_RE.match(path)
    if not found:
        raise ValueError(f"not a shard path: {path!r}")
    return found["license"], found["split"], int(found["index"])


def is_shard_file(relative: str, ext: str | None = None) -> bool:
    """Whether a path relative to the dataset root names a tar or Parquet shard (of `ext`)."""
    found = SHARD_NAME_RE.match(relative)
    return bool(found) and (ext is None or found["ext"] == ext)


def shard_glob(ext: str) -> str:
    """The glob (relative to the root) of every shard file with extension `ext`."""
    return f"*/*/{SHARD_STEM}*.{ext}"


def parquet_path_for(tar_path: str) -> str:
    """The Parquet file beside a tar shard (same stem)."""
    if not tar_path.endswith("." + TAR_EXT):
        raise ValueError(f"not a tar shard path: {tar_path}")
    return tar_path[:-len(TAR_EXT)] + PARQUET_EXT


def shard_parquet_path(entry: Mapping[str, Any]) -> str:
    """The Parquet path (relative to the dataset root) of a manifest shard entry."""
    return entry.get("parquet") or parquet_path_for(entry["path"])


def relative_shard_path(path: str, root: str | None = None) -> str:
    """`path` relative to the dataset `root`; without a root, its last three parts (licence/split/name)."""
    if root:
        prefix = root.rstrip("/") + "/"
        if not path.startswith(prefix):
            raise ValueError(f"{path} is not under {root}")
        return path[len(prefix):]
    return "/".join(path.replace("\\", "/").split("/")[-3:])
