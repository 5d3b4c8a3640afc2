"""Stage 4, decode: validate fetched bytes and turn them into an upright RGB uint8 array.

The pure core is `decode_image(data) -> (array, DecodeInfo)`, which raises `DecodeError(reason)`;
`DecodeImages` wraps it in a DoFn (FetchedImage -> DecodedImage, or a 'decode' reject).

Rules (each failure is a reject reason):
* 'empty' zero bytes; 'html' a body that starts with '<' (error pages served as images);
  'not_an_image' Pillow cannot identify it; 'corrupt' it cannot be decoded; 'truncated' the data
  ends early (Pillow's LOAD_TRUNCATED_IMAGES stays False: a half-grey photo is not kept).
* 'decompression_bomb': width x height above `max_pixels`, checked from the header before any
  pixel is decoded (Pillow's own bomb error is mapped to the same reason).
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
import io
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from PIL import Image, ImageOps, UnidentifiedImageError

from transforms.records import METRICS_NAMESPACE, REJECTS_TAG, DecodedImage, FetchedImage
from transforms.rejects import reject
from transforms.stage import StageDoFn, StageOutput, stage_output

STAGE = "decode"
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: far above Flickr's ~500 px / 1024 px JPEGs
DEFAULT_MIN_SIDE = 32
DEFAULT_BLANK_STD = 2.0
DEFAULT_BLANK_LEVELS = 4
THUMB_SIDE = 64

DECODE_REASONS = ("empty", "html", "not_an_image", "corrupt", "truncated", "decompression_bomb",
                  "too_small", "near_blank")

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class DecodeError(Exception):
    """Bytes that do not give a usable photo; `reason` is one of DECODE_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


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
    image = _open_and_load(data, max_pixels, min_side)
    width, height = image.size
    stored_mode, image_format = image.mode, image.format or ""
    orientation = _orientation(image)
    if orientation not in (1, 0):
        try:
            image = ImageOps.exif_transpose(image)
        except Exception as error:
            raise DecodeError("corrupt", f"EXIF orientation {orientation}: {error}"[:200]) from None
    rgb = _to_rgb(image)
    grey_std, levels = _blankness(rgb)
    if grey_std < blank_std or levels <= blank_levels:
        raise DecodeError("near_blank", f"grey std {grey_std:.2f}, {levels} grey levels")
    array = np.asarray(rgb)
    info = DecodeInfo(sha256=hashlib.sha256(data).hexdigest(), original_size=(width, height),
                      format=image_format, mode=stored_mode, orientation=orientation or 1,
                      grey_std=grey_std)
    return array, info


def _open_and_load(data: bytes, max_pixels: int, min_side: int, draft_side: int = 0) -> Image.Image:
    """Open and decode `data` with the checks of `decode_image` up to the pixels (raise
    DecodeError). With `draft_side`, a JPEG is decoded at the smallest scale (1/2 .. 1/8) that
    keeps both sides >= draft_side: a fast look, not the photo."""
    if not data:
        raise DecodeError("empty", "zero bytes")
    if data.lstrip()[:1] == b"<":
        raise DecodeError("html", repr(data.lstrip()[:40]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise DecodeError("decompression_bomb", str(error)[:200]) from None
        except UnidentifiedImageError:
            raise DecodeError("not_an_image", f"unidentified, starts {data[:8]!r}") from None
        except Exception as error:  # Pillow raises many types on bad headers
            raise DecodeError("corrupt", f"{type(error).__name__}: {error}"[:200]) from None
        width, height = image.size
        if width * height > max_pixels:
            raise DecodeError("decompression_bomb", f"{width}x{height} > {max_pixels} pixels")
        if min(width, height) < min_side:
            raise DecodeError("too_small", f"{width}x{height}, min side {min_side}")
        if draft_side:
            image.draft(None, (draft_side, draft_side))
        try:
            image.load()
        except Image.DecompressionBombError as error:
            raise DecodeError("decompression_bomb", str(error)[:200]) from None
        except OSError as error:
            reason = "truncated" if "truncated" in str(error) else "corrupt"
            raise DecodeError(reason, f"{type(error).__name__}: {error}"[:200]) from None
        except Exception as error:
            raise DecodeError("corrupt", f"{type(error).__name__}: {error}"[:200]) from None
    return image


def quick_check(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
                blank_std: float = DEFAULT_BLANK_STD,
                blank_levels: int = DEFAULT_BLANK_LEVELS) -> Optional[DecodeError]:
    """Would `decode_image` refuse `data`? The same rules on a draft-scale decode (a fraction of
    the cost for JPEGs), so that the fetch stage can try the next source instead of keeping
    garbage. Returns the DecodeError, or None when the bytes look like a usable photo."""
    try:
        image = _open_and_load(data, max_pixels, min_side, draft_side=THUMB_SIDE)
        grey_std, levels = _blankness(_to_rgb(image))
    except DecodeError as error:
        return error
    if grey_std < blank_std or levels <= blank_levels:
        return DecodeError("near_blank", f"grey std {grey_std:.2f}, {levels} grey levels")
    return None


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # unreadable EXIF: treat as upright
        return 1


def _to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image of any Pillow mode: 16-bit scaled to 8 bits, alpha composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        scale = 257.0 if mode != "F" else 1.0
        grey = np.asarray(image).astype(np.float32) / scale
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("P", "L", "1") and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode == "P":
        return image.convert("RGB")
    if image.mode in _ALPHA_MODES:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[:, :, 3:4] / 255.0
        rgb = rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)
        return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    return image.convert("RGB")


def _blankness(image: Image.Image) -> tuple[float, int]:
    """(std, number of distinct levels) of a ~THUMB_SIDE-square grey box-filtered thumbnail."""
    factor = (max(1, image.width // THUMB_SIDE), max(1, image.height // THUMB_SIDE))
    grey = np.asarray(image.reduce(factor).convert("L"), dtype=np.float32)
    return float(grey.std()), int(np.unique(grey).size)


class _DecodeDoFn(StageDoFn):
    stage = STAGE

    def __init__(self, max_pixels: int, min_side: int, blank_std: float, blank_levels: int):
        self._kwargs = dict(max_pixels=max_pixels, min_side=min_side, blank_std=blank_std,
                            blank_levels=blank_levels)
        self._decoded = Metrics.counter(METRICS_NAMESPACE, "decode.ok")

    def process_element(self, fetched: FetchedImage) -> Iterator:
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
