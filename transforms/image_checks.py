"""The decode rules shared by fetch (a cheap look before choosing a source) and decode.

`open_and_load` opens and decodes bytes with every guard up to the pixels; `to_rgb` and
`blankness` turn them into RGB and measure flatness; `quick_check` runs the rules at draft scale.
Each failure is a `DecodeError(reason)`, reason one of DECODE_REASONS (see transforms.s4_decode).

Guards against decode amplification (issue 10, finding 5) and corrupt data (finding 14):
* a pixel cap of 25 MP from the header, before any pixel is decoded: FDH's inputs are the
  mirror's ~500 px photos and Flickr's same-secret sizes up to 1024 px (~0.8 MP), so 25 MP leaves
  30x room and bounds one RGBA decode to 100 MB;
* JPEGs above DRAFT_PIXELS decode at a reduced DCT scale (Image.draft), never at full size;
* at most LARGE_DECODE_SLOTS decodes above LARGE_DECODE_PIXELS run at once per worker process;
* alpha compositing works in strips of ~STRIP_PIXELS pixels: no float copy of a whole image;
* JPEG entropy data is checked by libjpeg-turbo in strict mode (simplejpeg, greyscale at 1/8
  scale): 'Corrupt JPEG data' warnings, which Pillow ignores, become 'corrupt' rejects.
"""
from __future__ import annotations

import io
import threading
import warnings
from contextlib import nullcontext
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 25_000_000  # 25 MP: 30x FDH's largest input (1024 px); see module doc
DEFAULT_MIN_SIDE = 32
DEFAULT_BLANK_STD = 2.0
DEFAULT_BLANK_LEVELS = 4
THUMB_SIDE = 64
DRAFT_PIXELS = 4_000_000  # JPEGs above this decode at the largest DCT scale (1/2..1/8) under it
LARGE_DECODE_PIXELS = 4_000_000  # decodes above this take one of LARGE_DECODE_SLOTS per process
LARGE_DECODE_SLOTS = 2
STRIP_PIXELS = 256 * 1024  # float temporaries of one compositing strip: ~10 MB

DECODE_REASONS = ("empty", "html", "not_an_image", "corrupt", "truncated", "decompression_bomb",
                  "too_small", "near_blank")

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_LARGE_DECODES = threading.BoundedSemaphore(LARGE_DECODE_SLOTS)


class DecodeError(Exception):
    """Bytes that do not give a usable photo; `reason` is one of DECODE_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def open_and_load(data: bytes, max_pixels: int, min_side: int,
                  draft_side: int = 0) -> tuple[Image.Image, tuple[int, int]]:
    """Open and decode `data` with the checks of `decode_image` up to the pixels (raise
    DecodeError); returns the image and its stored (width, height). With `draft_side`, a JPEG is
    decoded at the smallest scale (1/2 .. 1/8) that keeps both sides >= draft_side: a fast look,
    not the photo."""
    if not data:
        raise DecodeError("empty", "zero bytes")
    if data.lstrip()[:1] == b"<":
        raise DecodeError("html", repr(data.lstrip()[:40]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = _open(data)
        width, height = image.size
        if width * height > max_pixels:
            raise DecodeError("decompression_bomb", f"{width}x{height} > {max_pixels} pixels")
        if min(width, height) < min_side:
            raise DecodeError("too_small", f"{width}x{height}, min side {min_side}")
        if draft_side:
            image.draft(None, (draft_side, draft_side))
        elif image.format == "JPEG" and width * height > DRAFT_PIXELS:
            image.draft(None, _draft_size(width, height))
        large = image.size[0] * image.size[1] > LARGE_DECODE_PIXELS
        with _LARGE_DECODES if large else nullcontext():
            _load(image)
        if image.format == "JPEG":  # after Pillow, which names a plain truncation 'truncated'
            check_jpeg_entropy(data)
    return image, (width, height)


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise DecodeError("decompression_bomb", str(error)[:200]) from None
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", f"unidentified, starts {data[:8]!r}") from None
    except Exception as error:  # Pillow raises many types on bad headers
        raise DecodeError("corrupt", f"{type(error).__name__}: {error}"[:200]) from None


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise DecodeError("decompression_bomb", str(error)[:200]) from None
    except OSError as error:
        reason = "truncated" if "truncated" in str(error) else "corrupt"
        raise DecodeError(reason, f"{type(error).__name__}: {error}"[:200]) from None
    except Exception as error:
        raise DecodeError("corrupt", f"{type(error).__name__}: {error}"[:200]) from None


def _draft_size(width: int, height: int) -> tuple[int, int]:
    """The size to ask Image.draft for so that a JPEG decodes at <= DRAFT_PIXELS (scale 1/8 max)."""
    scale = 2
    while scale < 8 and (width // scale) * (height // scale) > DRAFT_PIXELS:
        scale *= 2
    return -(-width // scale), -(-height // scale)


def check_jpeg_entropy(data: bytes) -> None:
    """Raise DecodeError('corrupt') when libjpeg-turbo reports corrupt JPEG data (random bytes in
    the scan, a zeroed tail: 'premature end of data segment', 'extraneous bytes', bad Huffman
    codes). Decodes greyscale at 1/8 scale with fast DCT: every entropy-coded bit is still read."""
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(data, colorspace="gray", fastdct=True, fastupsample=True,
                               min_factor=8, strict=True)
    except ValueError as error:
        raise DecodeError("corrupt", f"JPEG data: {error}"[:200]) from None


def quick_check(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
                blank_std: float = DEFAULT_BLANK_STD,
                blank_levels: int = DEFAULT_BLANK_LEVELS) -> Optional[DecodeError]:
    """Would `decode_image` refuse `data`? The same rules on a draft-scale decode (a fraction of
    the cost for JPEGs), so that the fetch stage can try the next source instead of keeping
    garbage. Returns the DecodeError, or None when the bytes look like a usable photo."""
    try:
        image, _ = open_and_load(data, max_pixels, min_side, draft_side=THUMB_SIDE)
        check_not_blank(to_rgb(image), blank_std, blank_levels)
    except DecodeError as error:
        return error
    return None


def check_not_blank(rgb: Image.Image, blank_std: float, blank_levels: int) -> float:
    """Raise DecodeError('near_blank') for a flat image; returns the thumbnail's grey std."""
    grey_std, levels = blankness(rgb)
    if grey_std < blank_std or levels <= blank_levels:
        raise DecodeError("near_blank", f"grey std {grey_std:.2f}, {levels} grey levels")
    return grey_std


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image of any Pillow mode: 16-bit scaled to 8 bits, alpha composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        scale = 257.0 if mode != "F" else 1.0
        grey = _by_strips(image, lambda rows: np.clip(
            np.rint(rows.astype(np.float32) / scale), 0, 255).astype(np.uint8))
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("P", "L", "1") and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode == "P":
        return image.convert("RGB")
    if image.mode in _ALPHA_MODES:
        return Image.fromarray(_by_strips(image.convert("RGBA"), _on_white), "RGB")
    return image.convert("RGB")


def _on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 RGB of uint8 RGBA rows composited on white (float32, rounded)."""
    rgba = rgba.astype(np.float32)
    alpha = rgba[:, :, 3:4] / 255.0
    rgb = rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _by_strips(image: Image.Image, convert) -> np.ndarray:
    """`convert` applied to the pixels of ~STRIP_PIXELS at a time (whole rows): the numpy copies
    and float temporaries stay one strip big; only the uint8 result is whole."""
    width, height = image.size
    strip_rows = max(1, STRIP_PIXELS // width)
    out = None
    for top in range(0, height, strip_rows):
        rows = convert(np.asarray(image.crop((0, top, width, min(height, top + strip_rows)))))
        if out is None:
            out = np.empty((height,) + rows.shape[1:], rows.dtype)
        out[top:top + len(rows)] = rows
    return out


def blankness(image: Image.Image) -> tuple[float, int]:
    """(std, number of distinct levels) of a ~THUMB_SIDE-square grey box-filtered thumbnail."""
    factor = (max(1, image.width // THUMB_SIDE), max(1, image.height // THUMB_SIDE))
    grey = np.asarray(image.reduce(factor).convert("L"), dtype=np.float32)
    return float(grey.std()), int(np.unique(grey).size)
