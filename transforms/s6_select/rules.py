"""The FDH person rule: do a person's keypoints agree with its DensePose CSE surface?

FDH's dataset card: ">= 4 keypoints must match the CSE; >= 2 head keypoints must match a `head` or
`neck` CSE vertex; a keypoint outside the crop counts as matching". The original matching code is
unpublished; this is ours:

* Each COCO keypoint has a set of allowed parts (`ALLOWED_PARTS`). COCO's left/right is the
  person's own side, like DensePose's chart names and SMPL's, so left keypoints go to left parts.
  Head keypoints (nose, eyes, ears) -> head or neck. A limb keypoint sits on the joint between two
  parts, so both neighbours are allowed: shoulder -> torso, neck, upper arm; elbow -> upper arm,
  lower arm; wrist -> lower arm, hand; hip -> torso, upper leg; knee -> upper leg, lower leg;
  ankle -> lower leg, foot.
* A keypoint whose score is below `keypoint_score_threshold` is *ignored*: it neither matches nor
  mismatches (so it cannot help reach the 4, and a head keypoint it cannot help reach the 2).
* A confident keypoint *matches* when it lies outside the crop box, or when the pixel under it
  (floor of x, y) is in the CSE mask and the CSE vertex there lies on an allowed part. A confident
  keypoint inside the crop but off the image, or on a pixel without an embedding, mismatches.
* Keep the person when matches >= `min_keypoint_matches` (4) and head matches >=
  `min_head_matches` (2).
* No-embeddings form (the 'lite' annotator, no CSE): "on the person mask" stands in for "on an
  allowed part" for every keypoint, head keypoints included; same thresholds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from transforms.records import COCO_KEYPOINTS, HEAD_KEYPOINTS, score_threshold_for  # noqa: F401 (re-export)
from transforms.s6_select.parts import part_mask

HEAD_OR_NECK = ("head", "neck")
ALLOWED_PARTS: dict[str, tuple[str, ...]] = {
    "nose": HEAD_OR_NECK, "left_eye": HEAD_OR_NECK, "right_eye": HEAD_OR_NECK,
    "left_ear": HEAD_OR_NECK, "right_ear": HEAD_OR_NECK,
    "left_shoulder": ("torso", "neck", "left_upper_arm"),
    "right_shoulder": ("torso", "neck", "right_upper_arm"),
    "left_elbow": ("left_upper_arm", "left_lower_arm"),
    "right_elbow": ("right_upper_arm", "right_lower_arm"),
    "left_wrist": ("left_lower_arm", "left_hand"),
    "right_wrist": ("right_lower_arm", "right_hand"),
    "left_hip": ("torso", "left_upper_leg"),
    "right_hip": ("torso", "right_upper_leg"),
    "left_knee": ("left_upper_leg", "left_lower_leg"),
    "right_knee": ("right_upper_leg", "right_lower_leg"),
    "left_ankle": ("left_lower_leg", "left_foot"),
    "right_ankle": ("right_lower_leg", "right_foot"),
}
# (17,) uint32 bitmask of the allowed parts of each COCO keypoint, in COCO order.
ALLOWED_BITS = np.array([part_mask(*ALLOWED_PARTS[name]) for name in COCO_KEYPOINTS], np.uint32)

# Status of each keypoint in a `RuleResult`.
IGNORED, MATCH, MISMATCH = 0, 1, 2

REASON_TOO_FEW_MATCHES = "too_few_keypoint_matches"
REASON_HEAD_RULE = "head_rule"


@dataclass(frozen=True)
class FdhRule:
    """Thresholds of the FDH rule."""

    min_keypoint_matches: int = 4
    min_head_matches: int = 2
    keypoint_score_threshold: Optional[float] = None  # None: per annotator (DEFAULT_SCORE_THRESHOLDS)


@dataclass
class RuleResult:
    """Outcome of the rule for one person."""

    status: np.ndarray  # (17,) uint8: IGNORED / MATCH / MISMATCH
    matches: int
    head_matches: int
    reason: Optional[str]  # None when kept

    @property
    def kept(self) -> bool:
        return self.reason is None

    def detail(self) -> str:
        return (f"{self.matches} keypoint matches, {self.head_matches} head matches; "
                f"status {''.join('.+x'[s] for s in self.status)}")


def keypoint_status(keypoints: np.ndarray, crop_box: Sequence[int], person_mask: np.ndarray,
                    e_mask: Optional[np.ndarray] = None, vertices: Optional[np.ndarray] = None,
                    part_table: Optional[np.ndarray] = None, score_threshold: float = 0.0) -> np.ndarray:
    """IGNORED / MATCH / MISMATCH for each of the 17 keypoints (see the module docstring).

    With `e_mask`, `vertices` and `part_table` the CSE form runs; without them the mask form.
    """
    keypoints = np.asarray(keypoints, np.float64)
    height, width = person_mask.shape
    x0, y0, x1, y1 = crop_box
    x, y, score = keypoints[:, 0], keypoints[:, 1], keypoints[:, 2]
    confident = score >= score_threshold
    outside_crop = (x < x0) | (x >= x1) | (y < y0) | (y >= y1)
    col = np.floor(x).astype(np.int64)
    row = np.floor(y).astype(np.int64)
    on_image = (col >= 0) & (col < width) & (row >= 0) & (row < height)
    col_c, row_c = np.clip(col, 0, width - 1), np.clip(row, 0, height - 1)
    if e_mask is None:
        on_allowed = on_image & person_mask[row_c, col_c]
    else:
        if vertices is None or part_table is None:
            raise ValueError("the CSE form needs vertices and a part table")
        vertex = vertices[row_c, col_c].astype(np.int64)
        parts = part_table[np.clip(vertex, 0, part_table.shape[0] - 1)]
        on_allowed = on_image & e_mask[row_c, col_c] & ((parts & ALLOWED_BITS) != 0)
    status = np.where(outside_crop | on_allowed, MATCH, MISMATCH).astype(np.uint8)
    status[~confident] = IGNORED
    return status


def apply_rule(status: np.ndarray, rule: FdhRule) -> RuleResult:
    """Keep or drop a person from its keypoints' statuses."""
    matched = status == MATCH
    matches = int(matched.sum())
    head_matches = int(matched[list(HEAD_KEYPOINTS)].sum())
    reason = None
    if matches < rule.min_keypoint_matches:
        reason = REASON_TOO_FEW_MATCHES
    elif head_matches < rule.min_head_matches:
        reason = REASON_HEAD_RULE
    return RuleResult(status=status, matches=matches, head_matches=head_matches, reason=reason)
