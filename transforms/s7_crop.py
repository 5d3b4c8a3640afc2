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
dilation undone inside the zero-padded area. ``e_mask`` and ``vertices`` as DP2 (transform_embedding):
the CSE detection's box-frame E and argmax S resized bilinear with antialias straight into the
crop, e_mask = S > 0, vertices = the nearest embed_map row per e_mask pixel, 0 elsewhere
(`crop_cse`). Keypoints go to crop coordinates normalised to
[0, 1] (x/W, y/H) with visibility 1 when the score passes the threshold and the point is inside.

Steps 1-5 (the box) live in `transforms.crop_geometry`, shared with the select stage.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from transforms.records import (CROP_HEIGHT, CROP_WIDTH, METRICS_NAMESPACE, REJECTS_TAG, DecodedImage,
                                FdhSample, Person, sample_key, score_threshold_for)
from transforms.crop_geometry import MIN_BOX_AREA, Box, box_area, crop_box_for_person, is_too_small
from transforms.cse_vertices import cse_to_crop
from transforms.rejects import reject
from transforms.stage import StageDoFn, StageOutput, stage_output

STAGE = "crop"
DILATION_RADIUS = int(math.sqrt(CROP_HEIGHT * CROP_WIDTH) * 0.02)  # 4


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


def crop_cse(person: Person, box: Box, out_hw: tuple[int, int] = (CROP_HEIGHT, CROP_WIDTH)
             ) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(e_mask bool, vertices int16) of a person in the crop, or (None, None) without CSE.

    With the detection's box-frame S and E (`person.cse`, the 'fdh' annotator) this is DP2's
    mapping (`transforms.cse_vertices.cse_to_crop`); a person carrying only image-space e_mask and
    vertices (hand-made records, older pickles) gets them nearest-sampled into the crop."""
    if person.cse is not None:
        e_mask, vertices = cse_to_crop(person.cse, box, out_hw)
        return e_mask, vertices.astype(np.int16)
    if person.e_mask is None or person.vertices is None:
        return None, None
    e_mask = crop_nearest(person.e_mask, box, out_hw)
    return e_mask, np.where(e_mask, crop_nearest(person.vertices, box, out_hw), 0).astype(np.int16)


def make_sample(photo: DecodedImage, person: Person, box: Box, keypoint_score_threshold: float,
                annotator: str = "") -> FdhSample:
    """Crop one person of a photo into an FdhSample (image, masks, CSE vertices, keypoints)."""
    mask, maskrcnn_mask = crop_masks(person.mask, box)
    e_mask, vertices = crop_cse(person, box)
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


class _CropPersonsFn(StageDoFn):
    """(photo, annotator, persons) -> one FdhSample per person, or a 'crop' reject."""

    stage = STAGE

    def __init__(self, keypoint_score_threshold: Optional[float], min_box_area: int):
        self._threshold = keypoint_score_threshold
        self._min_box_area = min_box_area
        self._samples = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.samples")

    def process_element(self, selected) -> Iterable:
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
    Returns StageOutput(main=PCollection[FdhSample], rejects=PCollection[Rejected]); rejects are
    per person (record_id = sample key): 'too_small' (crop box under 32*32 px), 'bad_person';
    per photo 'error' (an unexpected exception, transforms.stage).
    Keypoint visibility: score >= `keypoint_score_threshold` (None = the annotator's default, as
    SelectPersons) and inside the crop.
    """

    def __init__(self, keypoint_score_threshold: Optional[float] = None,
                 min_box_area: int = MIN_BOX_AREA):
        super().__init__()
        self._keypoint_score_threshold = keypoint_score_threshold
        self._min_box_area = min_box_area

    def expand(self, selected: beam.PCollection) -> StageOutput:
        return stage_output(selected | "Crop" >> beam.ParDo(
            _CropPersonsFn(self._keypoint_score_threshold, self._min_box_area)).with_outputs(
                REJECTS_TAG, main="main"))
