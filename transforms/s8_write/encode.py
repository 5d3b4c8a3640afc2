"""Encode one `FdhSample` into the FDH WebDataset members, its metadata.json entry and its Parquet row.

Everything here is a pure function of the sample (and the run-level `crawl_time`), with fixed
encoder options, so that the same sample always gives the same bytes:

* PNGs through Pillow with a fixed `compress_level`, no `optimize`, no metadata chunks; the image is
  8-bit RGB, masks are 1-bit (mode "1"), as DeepPrivacy2's `get_dataloader_fdh_wds` reads them.
* `.npy` through `np.save(allow_pickle=False)`: keypoints float32 (17, 3), vertices int16 (288, 160).
* `json`: the sample's FDH metadata.json entry (sorted keys), an extra member FDH loaders ignore.
"""
from __future__ import annotations

import datetime
import io
import json
import math
from typing import Any, Optional

import numpy as np
from PIL import Image

from dataset.layout import EMBEDDING_MEMBERS
from dataset.schema import CONSENT_COLUMNS, METADATA_FIELDS
from transforms.records import CROP_HEIGHT, CROP_WIDTH, FDH_LICENSES, NUM_CSE_VERTICES, FdhSample

# Pillow PNG options; changing them changes every shard's bytes (recorded in the manifest config).
PNG_COMPRESS_LEVEL = 1  # bench: level 6 is ~3x slower per image for ~7% smaller PNGs

# The run-level crawl time used when neither the caller nor an existing manifest gives one:
# 0.0 (1970-01-01) marks "not recorded". The rebuild job passes its launch time (`--crawl_time`).
DEFAULT_CRAWL_TIME = 0.0




class SampleError(ValueError):
    """A sample that cannot be written as an FDH sample (wrong shape, dtype, split or licence)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes with fixed options: uint8 (H, W, 3) -> 8-bit RGB; bool (H, W) -> 1-bit (mode "1")."""
    image = Image.fromarray(np.ascontiguousarray(array))  # bool -> mode "1", uint8 HxWx3 -> "RGB"
    if image.mode not in ("1", "RGB"):
        raise ValueError(f"cannot encode a {array.dtype}{array.shape} array as an FDH PNG")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    """`.npy` bytes (np.save, no pickles)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def check_writable(sample: FdhSample, no_embeddings: bool = False) -> None:
    """Raise `SampleError` (reason, detail) when `sample` cannot be written as an FDH sample."""
    if not sample.key or "." in sample.key or "/" in sample.key:
        raise SampleError("bad_key", f"key {sample.key!r} is empty or has a dot or slash")
    if sample.split not in ("train", "val"):
        raise SampleError("no_split", f"split is {sample.split!r}; apply AssignSplit first")
    if sample.record.license not in FDH_LICENSES:
        raise SampleError("licence_not_fdh", f"licence {sample.record.license!r}")
    shape = (CROP_HEIGHT, CROP_WIDTH)
    arrays = [("image", sample.image, shape + (3,), (np.uint8,)),
              ("mask", sample.mask, shape, (np.bool_,)),
              ("maskrcnn_mask", sample.maskrcnn_mask, shape, (np.bool_,)),
              ("keypoints", sample.keypoints, (17, 3), (np.float32, np.float64))]
    if not no_embeddings:
        arrays += [("e_mask", sample.e_mask, shape, (np.bool_,)),
                   ("vertices", sample.vertices, shape, (np.int16, np.int32, np.int64))]
    for name, array, want_shape, dtypes in arrays:
        if array is None:
            raise SampleError("missing_array", f"{name} is None")
        if tuple(array.shape) != want_shape or array.dtype.type not in dtypes:
            raise SampleError("bad_array", f"{name} is {array.dtype}{tuple(array.shape)}, "
                                           f"want {dtypes[0].__name__}{want_shape}")
    if not np.isfinite(sample.keypoints).all():
        raise SampleError("bad_array", "keypoints are not finite")
    if not no_embeddings and sample.vertices.size and (
            int(sample.vertices.min()) < 0 or int(sample.vertices.max()) >= NUM_CSE_VERTICES):
        raise SampleError("bad_array", f"vertices outside [0, {NUM_CSE_VERTICES})")


def crawl_date(crawl_time: float) -> str:
    """UTC date (YYYY-MM-DD) of a unix time, as FDH's `date_crawled`."""
    return datetime.datetime.fromtimestamp(float(crawl_time), datetime.timezone.utc).strftime("%Y-%m-%d")


def sample_metadata(sample: FdhSample, crawl_time: float = DEFAULT_CRAWL_TIME) -> dict[str, Any]:
    """The sample's FDH metadata.json entry (FDH's field names and value types).

    `id` is the Flickr photo id (FDH's own running id is unpublished); `date_uploaded` and
    `yfcc100m_line_idx` are strings as in FDH; `date_crawled`/`unixtime_crawled` come from the
    one run-level `crawl_time` so that re-runs are byte-identical.
    """
    record = sample.record
    return {
        "author": record.user_nickname,
        "category": sample.split,
        "cateogry": sample.split,
        "date_crawled": crawl_date(crawl_time),
        "date_taken": record.date_taken,
        "date_uploaded": str(record.date_uploaded),
        "id": int(record.photo_id),
        "license": record.license_name,
        "license_url": record.license_url,
        "photo_title": record.title,
        "photo_url": record.page_url,
        "unixtime_crawled": float(crawl_time),
        "user_nsid": record.user_nsid,
        "yfcc100m_line_idx": None if record.line_idx is None else str(record.line_idx),
    }


def _float_or_none(value: Optional[float]) -> Optional[float]:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def sample_row(sample: FdhSample, shard_path: str,
               crawl_time: float = DEFAULT_CRAWL_TIME) -> dict[str, Any]:
    """The sample's Parquet row (`PARQUET_SCHEMA`): metadata fields + key, crop box, scores, shard.
    The consent columns are None here: the rebuild's consent check fills them in (issue 15)."""
    x0, y0, x1, y1 = (int(v) for v in sample.crop_box)
    scores = sample.keypoint_scores
    row = {
        "key": sample.key,
        "photo_id": int(sample.record.photo_id),
        "person_index": int(sample.person_index),
        "license_slug": sample.record.license,
        "split": sample.split,
        **sample_metadata(sample, crawl_time),
        "crop_x0": x0, "crop_y0": y0, "crop_x1": x1, "crop_y1": y1,
        "detection_score": _float_or_none(sample.detection_score),
        "keypoint_scores": None if scores is None else [float(v) for v in np.asarray(scores, np.float32)],
        "annotator": sample.annotator,
        "source_sha256": sample.source_sha256,
        **dict.fromkeys(CONSENT_COLUMNS),
        "shard": shard_path,
    }
    return row


def metadata_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """The metadata.json entry held in a Parquet row (the inverse of `sample_row` for those fields)."""
    return {name: row[name] for name in METADATA_FIELDS}


def encode_sample(sample: FdhSample, no_embeddings: bool = False,
                  crawl_time: float = DEFAULT_CRAWL_TIME) -> dict[str, bytes | str]:
    """The WebDataset member dict of one sample: {"__key__": key, "image.png": ..., ...}.

    Members in `MEMBER_ORDER`; without `e_mask.png`/`vertices.npy` when `no_embeddings`.
    Raises `SampleError` for a sample that does not fit the FDH layout.
    """
    check_writable(sample, no_embeddings)
    members: dict[str, bytes | str] = {
        "__key__": sample.key,
        "image.png": encode_png(sample.image),
        "mask.png": encode_png(sample.mask),
        "maskrcnn_mask.png": encode_png(sample.maskrcnn_mask),
    }
    if not no_embeddings:
        members["e_mask.png"] = encode_png(sample.e_mask)
    members["keypoints.npy"] = encode_npy(sample.keypoints.astype(np.float32, copy=False))
    if not no_embeddings:
        members["vertices.npy"] = encode_npy(sample.vertices.astype(np.int16, copy=False))
    members["json"] = json.dumps(sample_metadata(sample, crawl_time), sort_keys=True).encode("utf-8")
    return members


def strip_embedding_members(members: dict[str, bytes | str]) -> dict[str, bytes | str]:
    """The member dict without the CSE embedding members (the no-embeddings variant)."""
    return {name: data for name, data in members.items() if name not in EMBEDDING_MEMBERS}
