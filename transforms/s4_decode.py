"""Stage 4, decode: validate fetched bytes and turn them into an upright RGB uint8 array.

The pure core is `decode_image(data) -> (array, DecodeInfo)`, which raises `DecodeError(reason)`;
`DecodeImages` wraps it in a DoFn (FetchedImage -> DecodedImage, or a 'decode' reject; a
re-derive's `StoredPhoto` becomes its pixel-free `stand_in`).

Rules (each failure is a reject reason):
* 'empty' zero bytes; 'html' a body that starts with '<' (error pages served as images);
  'not_an_image' Pillow cannot identify it; 'corrupt' it cannot be decoded; 'truncated' the data
  ends early (Pillow's LOAD_TRUNCATED_IMAGES stays False: a half-grey photo is not kept); a JPEG
  whose entropy data libjpeg-turbo reports as corrupt (random bytes, a zeroed tail) is 'corrupt'.
* 'decompression_bomb': width x height above `max_pixels` (25 MP by default), checked from the
  header before any pixel is decoded (Pillow's own bomb error is mapped to the same reason).
  JPEGs above 4 MP decode at a reduced DCT scale; see transforms.image_checks for these guards.
* 'too_small': shorter side below `min_side`.
* EXIF orientation is applied (`ImageOps.exif_transpose`); `original_size` is the stored size.
* Modes: L/1/CMYK/YCbCr/... are converted to RGB; 16-bit greyscale (I;16*, I) is scaled to 8 bits
  (value / 257); images with alpha (RGBA, LA, P or L with transparency) are composited on white,
  like img2dataset does, so transparent areas become white rather than arbitrary hidden colours.
* 'near_blank': on a ~64x64 greyscale box-filtered thumbnail, a standard deviation below `blank_std`
  (flat or nearly flat images: some mirror objects are grey/black garbage) or at most
  `blank_levels` distinct grey levels (flat images, 2-colour placeholders). Real low-contrast
  photos (skimage's moon) have a std of ~8 and dozens of levels, far from both thresholds.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from PIL import ImageOps

from transforms.image_checks import (DEFAULT_BLANK_LEVELS, DEFAULT_BLANK_STD, DEFAULT_MAX_PIXELS,
                                     DEFAULT_MIN_SIDE, DecodeError, check_not_blank, open_and_load,
                                     to_rgb)
from transforms.records import METRICS_NAMESPACE, REJECTS_TAG, DecodedImage, FetchedImage, StoredPhoto
from transforms.rejects import reject
from transforms.stage import StageDoFn, StageOutput, stage_output

STAGE = "decode"


@dataclass(frozen=True)
class DecodeInfo:
    """Facts about a decoded photo."""

    sha256: str  # of the source bytes
    original_size: tuple[int, int]  # (width, height) as stored, before EXIF orientation
    format: str  # Pillow format name, e.g. 'JPEG'
    mode: str  # Pillow mode as stored, e.g. 'CMYK'
    orientation: int  # EXIF orientation tag (1 when absent)
    grey_std: float  # std of the 64x64 grey thumbnail (near-blank test)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
                 blank_std: float = DEFAULT_BLANK_STD,
                 blank_levels: int = DEFAULT_BLANK_LEVELS) -> tuple[np.ndarray, DecodeInfo]:
    """Decode `data` to an upright uint8 (H, W, 3) array or raise DecodeError (see module doc)."""
    image, (width, height) = open_and_load(data, max_pixels, min_side)
    stored_mode, image_format = image.mode, image.format or ""
    orientation = _orientation(image)
    if orientation not in (1, 0):
        try:
            image = ImageOps.exif_transpose(image)
        except Exception as error:
            raise DecodeError("corrupt", f"EXIF orientation {orientation}: {error}"[:200]) from None
    rgb = to_rgb(image)
    grey_std = check_not_blank(rgb, blank_std, blank_levels)
    array = np.asarray(rgb)
    info = DecodeInfo(sha256=hashlib.sha256(data).hexdigest(), original_size=(width, height),
                      format=image_format, mode=stored_mode, orientation=orientation or 1,
                      grey_std=grey_std)
    return array, info


def _orientation(image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # unreadable EXIF: treat as upright
        return 1


def stand_in(stored: StoredPhoto) -> DecodedImage:
    """The DecodedImage of a StoredPhoto: its stored sha256 and size, no pixels (a zero-stride
    (H, W, 3) view of one black pixel): all that annotate's store lookup and select use to reject
    a photo whose stored result yields no sample."""
    image = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (stored.height, stored.width, 3))
    return DecodedImage(record=stored.record, image=image, sha256=stored.sha256,
                        original_size=(stored.width, stored.height))


class _DecodeDoFn(StageDoFn):
    stage = STAGE

    def __init__(self, max_pixels: int, min_side: int, blank_std: float, blank_levels: int):
        self._kwargs = dict(max_pixels=max_pixels, min_side=min_side, blank_std=blank_std,
                            blank_levels=blank_levels)
        self._decoded = Metrics.counter(METRICS_NAMESPACE, "decode.ok")

    def process_element(self, fetched: FetchedImage) -> Iterator:
        if isinstance(fetched, StoredPhoto):
            yield stand_in(fetched)
            return
        record = fetched.record
        try:
            array, info = decode_image(fetched.data, **self._kwargs)
        except DecodeError as error:
            yield reject(STAGE, error.reason, str(record.photo_id), error.detail,
                         photo_id=record.photo_id, user_nsid=record.user_nsid)
            return
        self._decoded.inc()
        yield DecodedImage(record=record, image=array, sha256=info.sha256,
                           original_size=info.original_size, url=fetched.url)


class DecodeImages(beam.PTransform):
    """FetchedImage -> StageOutput(main=DecodedImage, rejects=Rejected) (see module docstring)."""

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
                 blank_std: float = DEFAULT_BLANK_STD, blank_levels: int = DEFAULT_BLANK_LEVELS):
        super().__init__()
        if max_pixels < 1 or min_side < 1:
            raise ValueError("max_pixels and min_side must be >= 1")
        self._params = (max_pixels, min_side, blank_std, blank_levels)

    def expand(self, fetched: beam.PCollection) -> StageOutput:
        return stage_output(fetched | "DecodeBytes" >> beam.ParDo(_DecodeDoFn(*self._params)).with_outputs(
            REJECTS_TAG, main="main"))
