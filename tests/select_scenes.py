"""Hand-built scenes for the select/crop tests: a figure whose body parts are known by construction.

The figure is a stack of rectangles (head, neck, torso, arms, hands, legs, feet) facing the camera,
so the person's left side is on the image's right. Each part is painted with one CSE vertex id
(`PART_VERTEX[name]`), and `synthetic_part_table()` gives that vertex exactly that part, so the
right answer of every keypoint test is known without any model.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from tests.factories import make_record
from transforms.records import (COCO_KEYPOINTS, NUM_CSE_VERTICES, AnnotatedPhoto, DecodedImage,
                                Detections)
from transforms.s6_select.parts import PART_BITS

# Vertex id painted on each part (any ids work: the synthetic table labels them).
PART_VERTEX = {name: 1000 + 10 * bit for name, bit in PART_BITS.items()}

# Figure layout in figure units (rows, cols) of a 180 x 60 figure: name -> (r0, r1, c0, c1).
LAYOUT = {
    "head": (0, 30, 20, 40),
    "neck": (30, 36, 25, 35),
    "torso": (36, 100, 15, 45),
    "left_upper_arm": (36, 70, 45, 55), "left_lower_arm": (70, 100, 45, 55),
    "left_hand": (100, 110, 45, 55),
    "right_upper_arm": (36, 70, 5, 15), "right_lower_arm": (70, 100, 5, 15),
    "right_hand": (100, 110, 5, 15),
    "left_upper_leg": (100, 140, 30, 45), "left_lower_leg": (140, 175, 30, 45),
    "left_foot": (175, 180, 30, 45),
    "right_upper_leg": (100, 140, 15, 30), "right_lower_leg": (140, 175, 15, 30),
    "right_foot": (175, 180, 15, 30),
}
FIGURE_HW = (180, 60)

# Keypoints (x, y) in figure units, each inside one of its allowed parts.
KEYPOINTS = {
    "nose": (30, 15), "left_eye": (34, 10), "right_eye": (26, 10),
    "left_ear": (38, 14), "right_ear": (22, 14),
    "left_shoulder": (43, 40), "right_shoulder": (17, 40),
    "left_elbow": (50, 69), "right_elbow": (10, 69),
    "left_wrist": (50, 101), "right_wrist": (10, 101),
    "left_hip": (40, 98), "right_hip": (20, 98),
    "left_knee": (38, 139), "right_knee": (22, 139),
    "left_ankle": (38, 176), "right_ankle": (22, 176),
}


def synthetic_part_table() -> np.ndarray:
    table = np.zeros(NUM_CSE_VERTICES, np.uint32)
    for name, vertex in PART_VERTEX.items():
        table[vertex] = np.uint32(1 << PART_BITS[name])
    return table


def figure_keypoints(x0: float, y0: float, scale: float = 1.0, score: float = 5.0) -> np.ndarray:
    """(17, 3) keypoints of a figure placed at (x0, y0) in the image."""
    out = np.zeros((17, 3), np.float32)
    for k, name in enumerate(COCO_KEYPOINTS):
        fx, fy = KEYPOINTS[name]
        out[k] = (x0 + (fx + 0.5) * scale, y0 + (fy + 0.5) * scale, score)
    return out


def paint_figure(image_hw: tuple[int, int], x0: int, y0: int, scale: int = 1
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(mask, vertices) of a figure at (x0, y0); parts outside the image are clipped."""
    mask = np.zeros(image_hw, bool)
    vertices = np.zeros(image_hw, np.int16)
    for name, (r0, r1, c0, c1) in LAYOUT.items():
        rows = slice(max(0, y0 + r0 * scale), max(0, y0 + r1 * scale))
        cols = slice(max(0, x0 + c0 * scale), max(0, x0 + c1 * scale))
        mask[rows, cols] = True
        vertices[rows, cols] = PART_VERTEX[name]
    return mask, vertices


def figure_box(x0: int, y0: int, scale: int = 1) -> np.ndarray:
    return np.array([x0, y0, x0 + FIGURE_HW[1] * scale, y0 + FIGURE_HW[0] * scale], np.float32)


def gradient_image(image_hw: tuple[int, int]) -> np.ndarray:
    """An RGB image whose pixels say where they are (R = row, G = col, B = 200), all non-zero."""
    height, width = image_hw
    rows = np.linspace(1, 255, height).astype(np.uint8)[:, None].repeat(width, 1)
    cols = np.linspace(1, 255, width).astype(np.uint8)[None, :].repeat(height, 0)
    return np.stack([rows, cols, np.full_like(rows, 200)], axis=2)


def make_photo(image_hw: tuple[int, int] = (400, 300), photo_id: int = 1000) -> DecodedImage:
    image = gradient_image(image_hw)
    return DecodedImage(record=make_record(photo_id), image=image, sha256="ab" * 32,
                        original_size=(image_hw[1], image_hw[0]))


def fdh_scene(photo: DecodedImage, placements: list[tuple[int, int, int]],
              keypoints: Optional[list[np.ndarray]] = None) -> AnnotatedPhoto:
    """An 'fdh' AnnotatedPhoto with one figure per (x0, y0, scale), every model agreeing."""
    image_hw = photo.image.shape[:2]
    masks, verts, boxes = [], [], []
    for x0, y0, scale in placements:
        mask, vertices = paint_figure(image_hw, x0, y0, scale)
        masks.append(mask)
        verts.append(vertices)
        boxes.append(figure_box(x0, y0, scale))
    n = len(placements)
    boxes_arr = np.array(boxes, np.float32).reshape(n, 4)
    masks_arr = np.array(masks, bool).reshape((n,) + image_hw)
    if keypoints is None:
        keypoints = [figure_keypoints(x0, y0, scale) for x0, y0, scale in placements]
    scores = np.linspace(0.99, 0.9, n).astype(np.float32) if n else np.zeros(0, np.float32)
    return AnnotatedPhoto(
        photo=photo, annotator="fdh",
        keypoint_dets=Detections(boxes=boxes_arr.copy(), scores=scores.copy(),
                                 keypoints=np.array(keypoints, np.float32).reshape(n, 17, 3)),
        mask_dets=Detections(boxes=boxes_arr.copy(), scores=scores.copy(), masks=masks_arr.copy()),
        cse_dets=Detections(boxes=boxes_arr.copy(), scores=scores.copy(), masks=masks_arr.copy(),
                            vertices=np.array(verts, np.int16).reshape((n,) + image_hw)),
    )


def lite_scene(photo: DecodedImage, x0: int, y0: int, scale: int = 1,
               keypoints: Optional[np.ndarray] = None) -> AnnotatedPhoto:
    """A 'lite' AnnotatedPhoto: one figure, keypoints and mask, no CSE."""
    mask, _ = paint_figure(photo.image.shape[:2], x0, y0, scale)
    kps = figure_keypoints(x0, y0, scale, score=0.9) if keypoints is None else keypoints
    return AnnotatedPhoto(
        photo=photo, annotator="lite",
        keypoint_dets=Detections(boxes=figure_box(x0, y0, scale)[None], scores=np.array([0.9], np.float32),
                                 keypoints=kps[None].astype(np.float32), masks=mask[None]))
