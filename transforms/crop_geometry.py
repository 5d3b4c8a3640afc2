"""FDH crop-box geometry (DeepPrivacy2 box_utils) and the tight box of a mask.

Shared by select (which drops persons whose crop box is too small, before the rule) and crop
(which cuts that box out); it lives below the stages so that neither imports the other.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from transforms.records import CROP_HEIGHT, CROP_WIDTH

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive), integer pixels

TARGET_ASPECT = CROP_HEIGHT / CROP_WIDTH  # 1.8
AXIS_MIN_EXPANSION = 0.1
MAX_PERSON_FRACTION = 0.7  # DP2's percentage_background = 0.3
MIN_BOX_AREA = 32 * 32


def mask_box(mask: np.ndarray) -> Optional[Box]:
    """Tight box (x0, y0, x1, y1), x1/y1 exclusive, of a bool (H, W) mask; None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def expand_axis(start: int, end: int, target: int, limit: int) -> tuple[int, int]:
    """Resize [start, end) to length `target` around its centre, then shift it inside [0, limit)
    as far as possible; a span longer than `limit` stays centred, overflowing on both sides."""
    grow = (target - (end - start)) // 2
    start, end = start - grow, end + grow
    if end - start != target:
        end += 1
    if start < 0 and end < limit:
        shift = min(-start, limit - end)
        start, end = start + shift, end + shift
    if end > limit and start > 0:
        shift = min(end - limit, start)
        start, end = start - shift, end - shift
    return start, end


def grow_box(box: Box, image_hw: tuple[int, int], fraction: float = AXIS_MIN_EXPANSION) -> Box:
    """Grow width and height by int(sqrt(h*w) * fraction), each capped at the image size."""
    x0, y0, x1, y1 = box
    expansion = int(math.sqrt((y1 - y0) * (x1 - x0)) * fraction)
    height, width = image_hw
    x0, x1 = expand_axis(x0, x1, min(x1 - x0 + expansion, width), width)
    y0, y1 = expand_axis(y0, y1, min(y1 - y0 + expansion, height), height)
    return x0, y0, x1, y1


def expand_to_aspect(box: Box, image_hw: tuple[int, int], aspect: float = TARGET_ASPECT) -> Box:
    """Grow the short axis so that h / w = aspect (within integer truncation); may leave the image."""
    x0, y0, x1, y1 = box
    height, width = y1 - y0, x1 - x0
    ratio = height / width
    if ratio == aspect:
        return box
    if ratio < aspect:
        y0, y1 = expand_axis(y0, y1, int(width * aspect), image_hw[0])
    else:
        x0, x1 = expand_axis(x0, x1, int(height / aspect), image_hw[1])
    return x0, y0, x1, y1


def expand_for_background(box: Box, image_hw: tuple[int, int], mask_pixels: int,
                          max_person_fraction: float = MAX_PERSON_FRACTION) -> Box:
    """If the person covers >= max_person_fraction of the box, scale both sides up (ceil) so that it
    covers max_person_fraction of the new box."""
    x0, y0, x1, y1 = box
    height, width = y1 - y0, x1 - x0
    person_fraction = mask_pixels / (height * width)
    if (1 - person_fraction) > (1 - max_person_fraction):
        return box
    scale = math.sqrt((mask_pixels / max_person_fraction) / (height * width))
    x0, x1 = expand_axis(x0, x1, int(math.ceil(scale * width)), image_hw[1])
    y0, y1 = expand_axis(y0, y1, int(math.ceil(scale * height)), image_hw[0])
    return x0, y0, x1, y1


def grown_aspect_box(person_box: Sequence[float], image_hw: tuple[int, int]) -> Box:
    """A person box grown by 10 % and expanded to 1.8: the crop box before the background step,
    which only grows it (so its area is a lower bound of the final crop box's)."""
    x0, y0, x1, y1 = (int(v) for v in person_box)  # truncation, as DP2's .long()
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty person box {tuple(person_box)}")
    return expand_to_aspect(grow_box((x0, y0, x1, y1), image_hw), image_hw)


def crop_box_for_person(person_box: Sequence[float], image_hw: tuple[int, int],
                        mask_pixels: int) -> Box:
    """The FDH crop box of a person: grow by 10 %, expand to 1.8, then to <= 70 % person."""
    return expand_for_background(grown_aspect_box(person_box, image_hw), image_hw, int(mask_pixels))


def box_area(box: Box) -> int:
    """Area in pixels of an integer box."""
    return (box[2] - box[0]) * (box[3] - box[1])


def is_too_small(box: Box, min_area: int = MIN_BOX_AREA) -> bool:
    """DP2 drops expanded boxes under 32*32 pixels of area."""
    return box_area(box) < min_area
