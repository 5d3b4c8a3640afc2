"""Crop each selected person to a 288x160 FDH sample (stage 7).

Geometry follows DeepPrivacy2 (dp2/detection/box_utils.py, structures.py), which built FDH:

1. start from the person box (union of the mask box and the CSE box, set by SelectPersons);
2. grow width and height by ``int(sqrt(h*w) * 0.1)``, capped at the image, shifted inside it when
   possible (`grow_box`);
3. expand the short axis to the aspect ratio H/W = 288/160 = 1.8, centred, shifted inside the image
   when possible, else left overflowing (`expand_to_aspect`);
4. if the person mask covers >= 70 % of that box, scale both sides by
   ``sqrt((mask_px / 0.7) / (h*w))`` (ceil) (`expand_for_background`);
5. drop boxes under 32*32 pixels of area ('too_small');
6. cut the box out of the photo, zero-padding what lies outside it, and resize to 288x160: bilinear
   with antialias (Pillow) for the image; nearest (PyTorch's ``floor(dst * in / out)`` rule, as
   torchvision's NEAREST) for the masks and CSE vertices.

Masks (1 = background, 0 = person): ``maskrcnn_mask`` = NOT(person mask);
``mask`` = NOT(person mask dilated by a disk of radius ``int(sqrt(288*160)*0.02)`` = 4), with the
dilation undone inside the zero-padded area. ``e_mask`` = where the CSE has an embedding;
``vertices`` = CSE vertex ids there, 0 elsewhere. Keypoints go to crop coordinates normalised to
[0, 1] (x/W, y/H) with visibility 1 when the score passes the threshold and the point is inside.

`embeddings_to_vertices` (nearest `embed_map` row per CSE embedding) is used by the annotate stage.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from transforms.records import (CROP_HEIGHT, CROP_WIDTH, METRICS_NAMESPACE, REJECTS_TAG, DecodedImage,
                                FdhSample, Person, sample_key)
from transforms.rejects import reject

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive), integer pixels

STAGE = "crop"
TARGET_ASPECT = CROP_HEIGHT / CROP_WIDTH  # 1.8
AXIS_MIN_EXPANSION = 0.1
MAX_PERSON_FRACTION = 0.7  # DP2's percentage_background = 0.3
MIN_BOX_AREA = 32 * 32
DILATION_RADIUS = int(math.sqrt(CROP_HEIGHT * CROP_WIDTH) * 0.02)  # 4
DEFAULT_CHUNK_ROWS = 1024  # embeddings per distance block: 1024 x 27554 float32 = 113 MB


# --------------------------------------------------------------------------------------------
# CSE embeddings -> mesh vertex ids
# --------------------------------------------------------------------------------------------

def _is_torch(array: Any) -> bool:
    return type(array).__module__.split(".")[0] == "torch"


def embeddings_to_vertices(embeddings: Any, embed_map: Any, mask: Any = None,
                           chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Any:
    """Index of the nearest `embed_map` row (squared L2) for each CSE embedding.

    `embeddings` is either a per-pixel map (C, h, w) -> returns (h, w), or rows (n, C) -> (n,).
    `embed_map` is (V, C) (V = 27,554 for smpl_27554, C = 16). `mask` (h, w) or (n,) bool keeps
    only those positions; the others get vertex 0 (as DensePose/DP2 do outside the CSE mask).
    Works on NumPy arrays (returns int64 NumPy) and on torch tensors (returns int64 tensor on the
    embeddings' device: pass CUDA tensors to run on the GPU). Distances are computed in blocks of
    `chunk_rows` embeddings so memory stays at chunk_rows * V floats.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    torch_mode = _is_torch(embeddings)
    if embeddings.ndim == 3:
        channels, height, width = embeddings.shape
        out_shape: tuple[int, ...] = (height, width)
        rows = embeddings.reshape(channels, -1).T  # (h*w, C) view
    elif embeddings.ndim == 2:
        channels = embeddings.shape[1]
        out_shape = (embeddings.shape[0],)
        rows = embeddings
    else:
        raise ValueError(f"embeddings must be (C, h, w) or (n, C), got shape {tuple(embeddings.shape)}")
    if embed_map.ndim != 2 or embed_map.shape[1] != channels:
        raise ValueError(f"embed_map must be (V, {channels}), got {tuple(embed_map.shape)}")
    if mask is not None and tuple(mask.shape) != out_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {out_shape}")
    if torch_mode:
        return _nearest_rows_torch(rows, embed_map, mask, out_shape, chunk_rows)
    return _nearest_rows_numpy(np.asarray(rows), np.asarray(embed_map), mask, out_shape, chunk_rows)


def _nearest_rows_numpy(rows: np.ndarray, embed_map: np.ndarray, mask: Optional[np.ndarray],
                        out_shape: tuple[int, ...], chunk_rows: int) -> np.ndarray:
    out = np.zeros(int(np.prod(out_shape)), np.int64)
    selected = np.flatnonzero(np.asarray(mask).reshape(-1)) if mask is not None else None
    if selected is not None:
        rows = rows[selected]
    rows = rows.astype(np.float32, copy=False)
    table = embed_map.astype(np.float32, copy=False)
    table_t = np.ascontiguousarray(table.T)
    table_sq = np.einsum("vc,vc->v", table, table)
    found = np.empty(rows.shape[0], np.int64)
    for start in range(0, rows.shape[0], chunk_rows):
        block = rows[start:start + chunk_rows]
        # ||e - m||^2 = ||e||^2 - 2 e.m + ||m||^2; ||e||^2 does not change the argmin.
        dist = block @ table_t
        dist *= -2.0
        dist += table_sq
        found[start:start + block.shape[0]] = dist.argmin(axis=1)
    if selected is None:
        out[:] = found
    else:
        out[selected] = found
    return out.reshape(out_shape)


def _nearest_rows_torch(rows, embed_map, mask, out_shape, chunk_rows):
    import torch

    device = rows.device
    out = torch.zeros(int(np.prod(out_shape)), dtype=torch.int64, device=device)
    selected = None
    if mask is not None:
        selected = torch.as_tensor(mask, device=device).reshape(-1).nonzero().squeeze(1)
        rows = rows[selected]
    rows = rows.float()
    table = torch.as_tensor(embed_map, device=device).float()
    table_t = table.T.contiguous()
    table_sq = (table * table).sum(dim=1)
    found = torch.empty(rows.shape[0], dtype=torch.int64, device=device)
    with torch.no_grad():
        for start in range(0, rows.shape[0], chunk_rows):
            block = rows[start:start + chunk_rows]
            dist = torch.addmm(table_sq, block, table_t, beta=1.0, alpha=-2.0)
            found[start:start + block.shape[0]] = dist.argmin(dim=1)
    if selected is None:
        out[:] = found
    else:
        out[selected] = found
    return out.reshape(out_shape)


# --------------------------------------------------------------------------------------------
# Crop box geometry (DP2 box_utils)
# --------------------------------------------------------------------------------------------

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


def crop_box_for_person(person_box: Sequence[float], image_hw: tuple[int, int],
                        mask_pixels: int) -> Box:
    """The FDH crop box of a person: grow by 10 %, expand to 1.8, then to <= 70 % person."""
    x0, y0, x1, y1 = (int(v) for v in person_box)  # truncation, as DP2's .long()
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty person box {tuple(person_box)}")
    box = grow_box((x0, y0, x1, y1), image_hw)
    box = expand_to_aspect(box, image_hw)
    return expand_for_background(box, image_hw, int(mask_pixels))


def box_area(box: Box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def is_too_small(box: Box, min_area: int = MIN_BOX_AREA) -> bool:
    """DP2 drops expanded boxes under 32*32 pixels of area."""
    return box_area(box) < min_area


# --------------------------------------------------------------------------------------------
# Cut, pad and resize
# --------------------------------------------------------------------------------------------

def _nearest_source(start: int, end: int, size: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Source index of each of `size` output pixels for [start, end) (PyTorch 'nearest':
    floor(dst * in / out)), clipped to [0, limit), and whether it lies inside the image."""
    source = start + np.floor(np.arange(size) * ((end - start) / size)).astype(np.int64)
    inside = (source >= 0) & (source < limit)
    return np.clip(source, 0, limit - 1), inside


def crop_nearest(array: np.ndarray, box: Box, out_hw: tuple[int, int] = (CROP_HEIGHT, CROP_WIDTH)
                 ) -> np.ndarray:
    """Cut `box` out of a (H, W, ...) array, zero outside the array, nearest-resized to out_hw."""
    x0, y0, x1, y1 = box
    rows, rows_in = _nearest_source(y0, y1, out_hw[0], array.shape[0])
    cols, cols_in = _nearest_source(x0, x1, out_hw[1], array.shape[1])
    out = array[rows[:, None], cols[None, :]]
    if not rows_in.all():
        out[~rows_in] = 0
    if not cols_in.all():
        out[:, ~cols_in] = 0
    return out


def cut_and_pad(image: np.ndarray, box: Box) -> np.ndarray:
    """The pixels of `box`, zero where the box leaves the image."""
    x0, y0, x1, y1 = box
    height, width = image.shape[:2]
    if x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height:
        return image[y0:y1, x0:x1]
    out = np.zeros((y1 - y0, x1 - x0) + image.shape[2:], image.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def crop_image(image: np.ndarray, box: Box, out_hw: tuple[int, int] = (CROP_HEIGHT, CROP_WIDTH)
               ) -> np.ndarray:
    """Cut `box` out of an RGB uint8 image (zero padding) and resize it, bilinear with antialias."""
    from PIL import Image

    crop = np.ascontiguousarray(cut_and_pad(image, box))
    if crop.shape[:2] == tuple(out_hw):
        return crop.copy()
    resized = Image.fromarray(crop).resize((out_hw[1], out_hw[0]), Image.BILINEAR)
    return np.asarray(resized)


def disk(radius: int) -> np.ndarray:
    """A bool disk structuring element (x^2 + y^2 <= r^2), as skimage.morphology.disk."""
    grid = np.arange(-radius, radius + 1)
    return (grid[:, None] ** 2 + grid[None, :] ** 2) <= radius ** 2


def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of a 2-D bool mask by `disk(radius)`, zero outside the array (the same
    result as scipy.ndimage.binary_dilation with that structure, ~10x faster): the disk is a
    stack of horizontal runs, so OR row-shifted copies of horizontally dilated masks."""
    height, width = mask.shape
    half_widths = disk(radius).sum(axis=1) // 2  # run half-width of each disk row
    horizontal = {0: mask.copy()}
    for w in range(1, int(half_widths.max()) + 1):
        grown = horizontal[w - 1].copy()
        grown[:, w:] |= mask[:, :width - w]
        grown[:, :width - w] |= mask[:, w:]
        horizontal[w] = grown
    out = np.zeros_like(mask)
    for dy, w in zip(range(-radius, radius + 1), half_widths):
        source = horizontal[int(w)]
        if dy >= 0:
            out[dy:] |= source[:height - dy]
        else:
            out[:height + dy] |= source[-dy:]
    return out


def undo_dilation_in_padding(dilated: np.ndarray, box: Box, image_hw: tuple[int, int]) -> np.ndarray:
    """Clear the dilated person mask inside the zero-padded border (DP2 remove_dilate_in_pad: the
    padding width in crop pixels is floor(pad * out_h / box_h), the height ratio for both axes)."""
    x0, y0, x1, y1 = box
    height, width = image_hw
    ratio = dilated.shape[0] / (y1 - y0)
    pad_top, pad_bottom = (int(math.floor(max(0, -y0) * ratio)),
                           int(math.floor(max(0, y1 - height) * ratio)))
    pad_left, pad_right = (int(math.floor(max(0, -x0) * ratio)),
                           int(math.floor(max(0, x1 - width) * ratio)))
    out = dilated.copy()
    out[:pad_top] = False
    out[:, :pad_left] = False
    out[out.shape[0] - pad_bottom:] = False
    out[:, out.shape[1] - pad_right:] = False
    return out


def crop_masks(person_mask: np.ndarray, box: Box, out_hw: tuple[int, int] = (CROP_HEIGHT, CROP_WIDTH),
               dilation_radius: int = DILATION_RADIUS) -> tuple[np.ndarray, np.ndarray]:
    """(mask, maskrcnn_mask), both 1 = background: NOT(dilated person), NOT(person)."""
    person = crop_nearest(person_mask, box, out_hw)
    dilated = dilate_disk(person, dilation_radius) if dilation_radius > 0 else person
    dilated = undo_dilation_in_padding(dilated, box, person_mask.shape[:2])
    return ~dilated, ~person


def crop_keypoints(keypoints: np.ndarray, box: Box, score_threshold: float) -> np.ndarray:
    """(17, 3) x, y, score in image px -> x/W, y/H in the crop box, visibility 0/1."""
    x0, y0, x1, y1 = box
    out = np.empty((keypoints.shape[0], 3), np.float32)
    out[:, 0] = (keypoints[:, 0] - x0) / (x1 - x0)
    out[:, 1] = (keypoints[:, 1] - y0) / (y1 - y0)
    inside = (out[:, 0] >= 0) & (out[:, 0] <= 1) & (out[:, 1] >= 0) & (out[:, 1] <= 1)
    out[:, 2] = (keypoints[:, 2] >= score_threshold) & inside
    return out


# --------------------------------------------------------------------------------------------
# Person -> FdhSample
# --------------------------------------------------------------------------------------------

def person_crop_box(person: Person, image_hw: tuple[int, int]) -> Box:
    """The crop box SelectPersons stored in `person.extra['crop_box']`, else computed here."""
    box = person.extra.get("crop_box")
    if box is not None:
        return tuple(int(v) for v in box)  # type: ignore[return-value]
    return crop_box_for_person(person.box, image_hw, int(person.mask.sum()))


def make_sample(photo: DecodedImage, person: Person, box: Box, keypoint_score_threshold: float,
                annotator: str = "") -> FdhSample:
    """Crop one person of a photo into an FdhSample (image, masks, CSE vertices, keypoints)."""
    mask, maskrcnn_mask = crop_masks(person.mask, box)
    e_mask = vertices = None
    if person.e_mask is not None and person.vertices is not None:
        e_mask = crop_nearest(person.e_mask, box)
        vertices = np.where(e_mask, crop_nearest(person.vertices, box), 0).astype(np.int16)
    keypoints = np.asarray(person.keypoints, np.float32)
    return FdhSample(
        key=sample_key(photo.record.photo_id, person.index),
        record=photo.record,
        person_index=person.index,
        image=crop_image(photo.image, box),
        mask=mask,
        maskrcnn_mask=maskrcnn_mask,
        keypoints=crop_keypoints(keypoints, box, keypoint_score_threshold),
        crop_box=tuple(int(v) for v in box),  # type: ignore[arg-type]
        source_sha256=photo.sha256,
        detection_score=float(person.score),
        keypoint_scores=keypoints[:, 2].copy(),
        e_mask=e_mask,
        vertices=vertices,
        annotator=annotator,
    )


def person_problem(photo: DecodedImage, person: Person) -> Optional[str]:
    """Why a Person cannot be cropped (inconsistent arrays), or None."""
    image_hw = tuple(photo.image.shape[:2])
    if photo.image.ndim != 3 or photo.image.shape[2] != 3 or photo.image.dtype != np.uint8:
        return f"image must be uint8 (H, W, 3), got {photo.image.dtype} {photo.image.shape}"
    if tuple(person.mask.shape) != image_hw:
        return f"mask shape {person.mask.shape} != image {image_hw}"
    if np.asarray(person.keypoints).shape != (17, 3):
        return f"keypoints shape {np.asarray(person.keypoints).shape} != (17, 3)"
    for name in ("e_mask", "vertices"):
        array = getattr(person, name)
        if array is not None and tuple(array.shape) != image_hw:
            return f"{name} shape {array.shape} != image {image_hw}"
    if not person.mask.any():
        return "empty person mask"
    return None


class _CropPersonsFn(beam.DoFn):
    """(photo, annotator, persons) -> one FdhSample per person, or a 'crop' reject."""

    def __init__(self, keypoint_score_threshold: Optional[float], min_box_area: int):
        self._threshold = keypoint_score_threshold
        self._min_box_area = min_box_area
        self._samples = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.samples")

    def process(self, selected) -> Iterable:
        from transforms.s6_select.rules import score_threshold_for

        photo = selected.photo
        record = photo.record
        image_hw = tuple(photo.image.shape[:2])
        for person in selected.persons:
            key = sample_key(record.photo_id, person.index)
            problem = person_problem(photo, person)
            if problem is not None:
                yield reject(STAGE, "bad_person", key, problem, record.photo_id, record.user_nsid)
                continue
            box = person_crop_box(person, image_hw)
            if is_too_small(box, self._min_box_area):
                yield reject(STAGE, "too_small", key,
                             f"crop box {box} has area {box_area(box)} < {self._min_box_area}",
                             record.photo_id, record.user_nsid)
                continue
            self._samples.inc()
            threshold = score_threshold_for(selected.annotator, self._threshold)
            yield make_sample(photo, person, box, threshold, selected.annotator)


class CropPersons(beam.PTransform):
    """Crop the persons that SelectPersons kept into 288x160 FdhSamples.

    Input: `SelectedPhoto(photo, annotator, persons)` elements (transforms.s6_select).
    Returns {"main": PCollection[FdhSample], "rejects": PCollection[Rejected]}; rejects are
    per person (record_id = sample key): 'too_small' (crop box under 32*32 px), 'bad_person'.
    Keypoint visibility: score >= `keypoint_score_threshold` (None = the annotator's default, as
    SelectPersons) and inside the crop.
    """

    def __init__(self, keypoint_score_threshold: Optional[float] = None,
                 min_box_area: int = MIN_BOX_AREA):
        super().__init__()
        self._keypoint_score_threshold = keypoint_score_threshold
        self._min_box_area = min_box_area

    def expand(self, selected):
        results = selected | "Crop" >> beam.ParDo(
            _CropPersonsFn(self._keypoint_score_threshold, self._min_box_area)).with_outputs(
                REJECTS_TAG, main="main")
        return {"main": results.main, "rejects": results[REJECTS_TAG]}
