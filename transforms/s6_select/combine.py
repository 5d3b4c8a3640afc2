"""Combine one photo's detections into `Person`s.

'fdh' annotator (Mask R-CNN + DensePose CSE + keypoint R-CNN), as DP2's combine_cse_maskrcnn_dets:
  * Mask R-CNN and CSE detections are paired greedily by mask IoU >= 0.4, in detector order (for
    each Mask R-CNN detection in order, the first CSE detection in order that is still free and
    passes the threshold; never sorted by IoU, as DP2). Unpaired detections are dropped (reported
    as 'no_cse_match' / 'no_mask_match'). A pair's person mask is the union of both masks; its box
    is the union of the mask's box and the CSE box; e_mask is the CSE coarse segmentation and
    vertices the CSE vertex ids there (0 elsewhere), both image-space (the FDH rule reads them);
    `cse` carries the detection's box-frame S and E for the crop stage (DP2's mapping into the
    crop). Persons are numbered in pair order.
  * Keypoint detections are assigned to persons one-to-one by IoU, maximising the total IoU
    (Hungarian assignment, scipy), keeping only pairs with IoU >= `min_keypoint_box_iou` (0.5):
    mask IoU (the keypoint detection's own mask vs the person mask) when the keypoint model gives
    masks (DP2's KeypointMaskRCNN, `--detector=detectron2`: mask and keypoints of one detection),
    else box IoU (torchvision). A person left without keypoints is dropped ('no_keypoints').
'fdh' without embeddings (cse_dets None, the --no_embeddings variant): each Mask R-CNN person is
  a person (box = union of its mask box and detector box), keypoints assigned as above, no CSE.
'lite' annotator (mediapipe): keypoint_dets carry keypoints and masks; each detection is a person
  (box = union of its mask box and detector box), with no CSE.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from transforms.crop_geometry import mask_box
from transforms.records import FDH_ANNOTATORS, AnnotatedPhoto, DecodedImage, Detections, Person

IOU_COMBINE_THRESHOLD = 0.4
MIN_KEYPOINT_BOX_IOU = 0.5


@dataclass
class SelectedPhoto:
    """A photo and the persons of it that passed the FDH rules (SelectPersons' main output)."""

    photo: DecodedImage
    annotator: str
    persons: list[Person]


@dataclass
class Dropped:
    """A detection or person that did not make it, with why."""

    reason: str
    detail: str
    person_index: Optional[int] = None  # set when the drop is of a numbered person


@dataclass
class Combined:
    """What `combine_detections` made of one photo."""

    persons: list[Person] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    unassigned_keypoint_dets: int = 0


def union_box(a, b) -> np.ndarray:
    return np.array([min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])], np.float32)


def box_iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of (N, 4) and (M, 4) x0, y0, x1, y1 boxes."""
    a = np.asarray(boxes_a, np.float64)[:, None, :]
    b = np.asarray(boxes_b, np.float64)[None, :, :]
    inter_w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    inter_h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def mask_iou_matrix(masks_a: np.ndarray, masks_b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of bool masks (N, H, W) and (M, H, W); computed inside the pair's joint box."""
    boxes_a = [mask_box(m) for m in masks_a]
    boxes_b = [mask_box(m) for m in masks_b]
    iou = np.zeros((len(masks_a), len(masks_b)))
    for i, box_a in enumerate(boxes_a):
        for j, box_b in enumerate(boxes_b):
            if box_a is None or box_b is None:
                continue
            x0, y0 = min(box_a[0], box_b[0]), min(box_a[1], box_b[1])
            x1, y1 = max(box_a[2], box_b[2]), max(box_a[3], box_b[3])
            a, b = masks_a[i, y0:y1, x0:x1], masks_b[j, y0:y1, x0:x1]
            union = np.count_nonzero(a | b)
            iou[i, j] = np.count_nonzero(a & b) / union if union else 0.0
    return iou


def greedy_pairs(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """DP2's find_best_matches: row-major over (i, j), take a pair when IoU >= threshold and both
    are still free. Detector order decides, not IoU."""
    pairs = []
    taken_a: set[int] = set()
    taken_b: set[int] = set()
    for i, j in zip(*np.nonzero(iou >= threshold)):  # np.nonzero is row-major
        if i in taken_a or j in taken_b:
            continue
        pairs.append((int(i), int(j)))
        taken_a.add(int(i))
        taken_b.add(int(j))
    return pairs


def assign_keypoints(person_boxes: np.ndarray, keypoint_boxes: np.ndarray,
                     min_iou: float = MIN_KEYPOINT_BOX_IOU, iou: Optional[np.ndarray] = None) -> dict[int, int]:
    """person index -> keypoint detection index, one-to-one, maximum total IoU, IoU >= min_iou.

    The IoU is of the boxes, unless `iou` (persons x keypoint detections) is given (mask IoU when
    the keypoint model also gives masks)."""
    from scipy.optimize import linear_sum_assignment

    if len(person_boxes) == 0 or len(keypoint_boxes) == 0:
        return {}
    if iou is None:
        iou = box_iou_matrix(person_boxes, keypoint_boxes)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return {int(r): int(c) for r, c in zip(rows, cols) if iou[r, c] >= min_iou}


def _attach_keypoints(result: Combined, keypoint_dets: Detections, min_iou: float) -> Combined:
    """Give each person its keypoint detection; persons without one move to `dropped`."""
    keypoints = keypoint_dets.keypoints
    person_boxes = np.array([p.box for p in result.persons], np.float32).reshape(-1, 4)
    iou = None
    if keypoint_dets.masks is not None and len(keypoint_dets) and result.persons:
        # the keypoint model's own mask (DP2's KeypointMaskRCNN: same detection) against ours
        iou = mask_iou_matrix(np.stack([p.mask for p in result.persons]), keypoint_dets.masks)
    assignment = assign_keypoints(person_boxes, keypoint_dets.boxes, min_iou, iou)
    kept = []
    for row, person in enumerate(result.persons):
        det = assignment.get(row)
        if det is None:
            result.dropped.append(Dropped(
                "no_keypoints", f"no keypoint detection with box IoU >= {min_iou}", person.index))
            continue
        person.keypoints = np.asarray(keypoints[det], np.float32)
        person.extra["keypoint_det"] = det
        person.extra["keypoint_score"] = float(keypoint_dets.scores[det])
        kept.append(person)
    result.unassigned_keypoint_dets = len(keypoint_dets) - len(assignment)
    result.persons = kept
    return result


def combine_masks_only(annotated: AnnotatedPhoto,
                       min_keypoint_box_iou: float = MIN_KEYPOINT_BOX_IOU) -> Combined:
    """Persons of an 'fdh' photo annotated without embeddings (cse_dets None): each Mask R-CNN
    person is a person (box = mask box U detector box), with its keypoints; no CSE."""
    result = Combined()
    dets = annotated.mask_dets
    for i in range(0 if dets is None else len(dets)):
        mask = np.asarray(dets.masks[i], bool)
        box = mask_box(mask)
        if box is None:
            result.dropped.append(Dropped("empty_mask", f"mask detection {i} is empty", i))
            continue
        result.persons.append(Person(
            index=i, box=union_box(box, dets.boxes[i]), mask=mask,
            keypoints=np.zeros((17, 3), np.float32), score=float(dets.scores[i]),
            extra={"mask_det": i}))
    return _attach_keypoints(result, annotated.keypoint_dets, min_keypoint_box_iou)


def combine_fdh(annotated: AnnotatedPhoto, iou_threshold: float = IOU_COMBINE_THRESHOLD,
                min_keypoint_box_iou: float = MIN_KEYPOINT_BOX_IOU) -> Combined:
    """Persons of an 'fdh' photo: Mask R-CNN x CSE pairs with their keypoints."""
    mask_dets, cse_dets = annotated.mask_dets, annotated.cse_dets
    result = Combined()
    if mask_dets is None or cse_dets is None or len(mask_dets) == 0 or len(cse_dets) == 0:
        n_mask = 0 if mask_dets is None else len(mask_dets)
        n_cse = 0 if cse_dets is None else len(cse_dets)
        for i in range(n_mask):
            result.dropped.append(Dropped("no_cse_match", f"mask detection {i}: no CSE detections"))
        for j in range(n_cse):
            result.dropped.append(Dropped("no_mask_match", f"CSE detection {j}: no mask detections"))
        return result
    iou = mask_iou_matrix(mask_dets.masks, cse_dets.masks)
    pairs = greedy_pairs(iou, iou_threshold)
    paired_mask = {i for i, _ in pairs}
    paired_cse = {j for _, j in pairs}
    for i in range(len(mask_dets)):
        if i not in paired_mask:
            result.dropped.append(Dropped(
                "no_cse_match", f"mask detection {i}: best CSE mask IoU {iou[i].max():.2f} "
                                f"< {iou_threshold} or taken"))
    for j in range(len(cse_dets)):
        if j not in paired_cse:
            result.dropped.append(Dropped(
                "no_mask_match", f"CSE detection {j}: best mask IoU {iou[:, j].max():.2f} "
                                 f"< {iou_threshold} or taken"))
    for index, (i, j) in enumerate(pairs):
        e_mask = np.asarray(cse_dets.masks[j], bool)
        mask = np.asarray(mask_dets.masks[i], bool) | e_mask
        vertices = np.where(e_mask, cse_dets.vertices[j], 0).astype(np.int16)
        result.persons.append(Person(
            index=index,
            box=union_box(mask_box(mask), cse_dets.boxes[j]),
            mask=mask,
            keypoints=np.zeros((17, 3), np.float32),
            score=float(mask_dets.scores[i]),
            e_mask=e_mask,
            vertices=vertices,
            cse=None if cse_dets.embeddings is None else cse_dets.embeddings[j],
            extra={"mask_det": i, "cse_det": j, "mask_cse_iou": float(iou[i, j]),
                   "cse_score": float(cse_dets.scores[j])},
        ))
    return _attach_keypoints(result, annotated.keypoint_dets, min_keypoint_box_iou)


def combine_lite(annotated: AnnotatedPhoto) -> Combined:
    """Persons of a 'lite' photo: each keypoint detection with its own mask, no CSE."""
    dets = annotated.keypoint_dets
    result = Combined()
    for index in range(len(dets)):
        mask = np.asarray(dets.masks[index], bool)
        box = mask_box(mask)
        if box is None:
            result.dropped.append(Dropped("empty_mask", "person mask is empty", index))
            continue
        result.persons.append(Person(
            index=index, box=union_box(box, dets.boxes[index]), mask=mask,
            keypoints=np.asarray(dets.keypoints[index], np.float32),
            score=float(dets.scores[index])))
    return result


def annotation_problem(annotated: AnnotatedPhoto) -> Optional[str]:
    """Why an AnnotatedPhoto's arrays do not fit together, or None."""
    image_hw = tuple(annotated.photo.image.shape[:2])

    def check(dets: Optional[Detections], name: str, need: tuple[str, ...],
              optional: bool = False) -> Optional[str]:
        if dets is None:
            return None if optional else f"{name} missing"
        n = len(dets)
        if dets.boxes.ndim != 2 or dets.boxes.shape[1] != 4:
            return f"{name}: boxes shape {dets.boxes.shape} != (N, 4)"
        if dets.scores.shape != (n,):
            return f"{name}: scores shape {dets.scores.shape} != ({n},)"
        if n == 0:
            return None  # an empty Detections may leave its arrays unset
        for attr in need:
            array = getattr(dets, attr)
            if array is None:
                return f"{name}: {attr} missing"
            expected = (n, 17, 3) if attr == "keypoints" else (n,) + image_hw
            if tuple(array.shape) != expected:
                return f"{name}: {attr} shape {tuple(array.shape)} != {expected}"
        return None

    if annotated.annotator == "lite":
        return check(annotated.keypoint_dets, "keypoint_dets", ("keypoints", "masks"))
    if annotated.annotator in FDH_ANNOTATORS:
        cse = annotated.cse_dets
        if cse is not None and cse.embeddings is not None and len(cse.embeddings) != len(cse):
            return f"cse_dets: {len(cse.embeddings)} embeddings for {len(cse)} detections"
        return (check(annotated.keypoint_dets, "keypoint_dets", ("keypoints",))
                or check(annotated.mask_dets, "mask_dets", ("masks",), optional=True)
                or check(annotated.cse_dets, "cse_dets", ("masks", "vertices"), optional=True))
    return f"unknown annotator {annotated.annotator!r}"


def combine_detections(annotated: AnnotatedPhoto, iou_threshold: float = IOU_COMBINE_THRESHOLD,
                       min_keypoint_box_iou: float = MIN_KEYPOINT_BOX_IOU) -> Combined:
    """Persons of one photo, whichever annotator produced it (check `annotation_problem` first)."""
    if annotated.annotator == "lite":
        return combine_lite(annotated)
    if annotated.cse_dets is None:
        return combine_masks_only(annotated, min_keypoint_box_iou)
    return combine_fdh(annotated, iou_threshold, min_keypoint_box_iou)
