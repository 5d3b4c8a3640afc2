"""The 'lite' annotator: mediapipe BlazePose on the CPU, offline, for demos and tests.

mediapipe 0.10.21 ships its pose detector, pose landmark model (complexity 1 only: 0 and 2 download
their models at first use, so they are never used here) and a person segmentation head inside the
wheel. It finds at most ONE person per photo. Its output is mapped onto the shapes the FDH
annotator produces: 17 COCO keypoints (x, y, score in image pixels; score = BlazePose visibility)
plus a person mask (segmentation > 0.5) and a box drawn around the mask.

mediapipe's pose detector can fire on non-person photos; `LiteAnnotator` rejects such detections
with three documented thresholds (see `LiteThresholds`), checked on skimage's coffee, chelsea and
rocket (no person) and astronaut, camera and grace_hopper (one person each).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
from apache_beam.metrics import Metrics

from transforms.crop_geometry import mask_box
from transforms.records import METRICS_NAMESPACE, AnnotatedPhoto, DecodedImage, Detections
from transforms.rejects import reject
from transforms.stage import StageDoFn

# BlazePose-33 landmark index of each COCO-17 keypoint, in COCO order (nose, eyes, ears,
# shoulders, elbows, wrists, hips, knees, ankles; left before right, the person's left as in COCO).
BLAZEPOSE_TO_COCO = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)

ANNOTATOR_NAME = "lite"


@dataclass(frozen=True)
class LiteThresholds:
    """When a mediapipe detection counts as a person.

    mask_threshold: segmentation probability above which a pixel is person.
    keypoint_visibility: a keypoint counts as seen when its visibility is >= this.
    min_visible_keypoints: at least this many of the 17 COCO keypoints must be seen. (BlazePose's
        `presence` field is not filled by the legacy `solutions` API: visibility is the signal.)
    min_mask_fraction: the person mask must cover at least this fraction of the photo; a
        detection without a segmented body is a hallucination (or too small to crop anyway).
    """

    mask_threshold: float = 0.5
    keypoint_visibility: float = 0.5
    min_visible_keypoints: int = 4
    min_mask_fraction: float = 0.002


class LiteAnnotator:
    """Pure-Python core: one photo in, its (<= 1 person) keypoint + mask `Detections` out.

    Holds a mediapipe graph: create one per thread (a DoFn does it in `setup()`), call `close()`.
    """

    def __init__(self, thresholds: LiteThresholds = LiteThresholds()):
        import mediapipe as mp  # imported here: only the lite annotator needs it

        self.thresholds = thresholds
        self._pose = mp.solutions.pose.Pose(
            static_image_mode=True, model_complexity=1, enable_segmentation=True)

    def close(self) -> None:
        self._pose.close()

    def detect(self, image: np.ndarray) -> Detections:
        """Detections of the (single) person in an RGB uint8 (H, W, 3) image; empty if nobody."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        result = self._pose.process(np.ascontiguousarray(image))
        if result.pose_landmarks is None or result.segmentation_mask is None:
            return Detections.empty()
        landmarks = result.pose_landmarks.landmark
        keypoints = np.array(
            [[landmarks[i].x * width, landmarks[i].y * height, landmarks[i].visibility]
             for i in BLAZEPOSE_TO_COCO], np.float32)
        # BlazePose extrapolates landmarks beyond the frame (feet below a portrait's edge). Those
        # are guesses, and keypoint R-CNN never predicts outside the image: score them 0.
        outside = ((keypoints[:, 0] < 0) | (keypoints[:, 0] >= width)
                   | (keypoints[:, 1] < 0) | (keypoints[:, 1] >= height))
        keypoints[outside, 2] = 0.0
        mask = np.asarray(result.segmentation_mask) > self.thresholds.mask_threshold
        visible = int((keypoints[:, 2] >= self.thresholds.keypoint_visibility).sum())
        if visible < self.thresholds.min_visible_keypoints or mask.mean() < self.thresholds.min_mask_fraction:
            return Detections.empty()
        score = float(keypoints[:, 2].mean())
        return Detections(
            boxes=np.array([mask_box(mask)], np.float32), scores=np.array([score], np.float32),
            masks=mask[None], keypoints=keypoints[None])

    def annotate(self, photo: DecodedImage) -> AnnotatedPhoto:
        return AnnotatedPhoto(photo=photo, annotator=ANNOTATOR_NAME, keypoint_dets=self.detect(photo.image))


class LiteAnnotateFn(StageDoFn):
    """Beam wrapper of `LiteAnnotator`: the mediapipe graph is built once per DoFn in setup()."""

    stage = "annotate"

    def __init__(self, thresholds: LiteThresholds = LiteThresholds()):
        self._thresholds = thresholds
        self._annotator: Optional[LiteAnnotator] = None
        self._annotated = Metrics.counter(METRICS_NAMESPACE, "annotate.photos")
        self._with_person = Metrics.counter(METRICS_NAMESPACE, "annotate.photos_with_person")

    def setup(self) -> None:
        self._annotator = LiteAnnotator(self._thresholds)

    def teardown(self) -> None:
        if self._annotator is not None:
            self._annotator.close()
            self._annotator = None

    def process_element(self, photo: DecodedImage) -> Iterator:
        try:
            annotated = self._annotator.annotate(photo)
        except Exception as error:  # one bad image must not fail the job
            yield reject("annotate", "model_error", str(photo.record.photo_id),
                         f"lite: {type(error).__name__}: {error}", photo.record.photo_id,
                         photo.record.user_nsid)
            return
        self._annotated.inc()
        if len(annotated.keypoint_dets):
            self._with_person.inc()
        yield annotated


def thresholds_from_dict(overrides: Optional[dict]) -> LiteThresholds:
    """`LiteThresholds` with the given fields overridden (None: the defaults)."""
    return dataclasses.replace(LiteThresholds(), **(overrides or {}))
