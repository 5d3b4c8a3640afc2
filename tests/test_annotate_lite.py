"""The lite (mediapipe) annotator on real photos, directly and through Annotate in a Beam pipeline.

Face boxes below were measured by hand on the photos (x0, y0, x1, y1 in pixels).
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import skimage.data
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from matplotlib.cbook import get_sample_data
from PIL import Image

import apache_beam as beam
from beam_jobs.common import make_pipeline, read_counters
from tests.factories import make_record
from transforms.records import COCO_KEYPOINTS, DecodedImage
from transforms.s5_annotate import Annotate
from transforms.s5_annotate.lite import LiteAnnotator

KP = {name: i for i, name in enumerate(COCO_KEYPOINTS)}
FACE_BOXES = {"astronaut": (175, 60, 275, 190), "grace_hopper": (180, 100, 360, 330)}


def _grace_hopper() -> np.ndarray:
    with get_sample_data("grace_hopper.jpg") as handle:
        return np.asarray(Image.open(handle).convert("RGB"))


PHOTOS = {
    "astronaut": skimage.data.astronaut,
    "grace_hopper": _grace_hopper,
    "coffee": skimage.data.coffee,
    "chelsea": skimage.data.chelsea,
    "rocket": skimage.data.rocket,
}


def _decoded(photo_id: int, image: np.ndarray) -> DecodedImage:
    return DecodedImage(record=make_record(photo_id), image=image,
                        sha256=hashlib.sha256(image.tobytes()).hexdigest(),
                        original_size=(image.shape[1], image.shape[0]))


@pytest.fixture(scope="module")
def annotator():
    lite = LiteAnnotator()
    yield lite
    lite.close()


@pytest.mark.model
@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_one_person_with_keypoints_in_the_right_places(annotator, name):
    image = PHOTOS[name]()
    dets = annotator.detect(image)
    assert len(dets) == 1
    kp = dets.keypoints[0]
    assert kp.shape == (17, 3) and dets.keypoints.dtype == np.float32
    x0, y0, x1, y1 = FACE_BOXES[name]
    nose_x, nose_y, nose_score = kp[KP["nose"]]
    assert x0 <= nose_x <= x1 and y0 <= nose_y <= y1 and nose_score > 0.9
    for eye in ("left_eye", "right_eye"):
        assert x0 <= kp[KP[eye], 0] <= x1 and y0 <= kp[KP[eye], 1] <= y1
        assert kp[KP[eye], 1] < nose_y  # eyes above the nose
    eyes_y = max(kp[KP["left_eye"], 1], kp[KP["right_eye"], 1])
    for shoulder in ("left_shoulder", "right_shoulder"):
        assert kp[KP[shoulder], 1] > eyes_y + 50  # shoulders well below the eyes
    # Both people face the camera: their left side is on the image's right (COCO convention).
    assert kp[KP["left_eye"], 0] > kp[KP["right_eye"], 0]
    assert kp[KP["left_shoulder"], 0] > kp[KP["right_shoulder"], 0]
    mask = dets.masks[0]
    assert mask.shape == image.shape[:2] and mask.dtype == bool
    assert mask[int(nose_y), int(nose_x)]  # the nose is on the person mask
    bx0, by0, bx1, by1 = dets.boxes[0]
    assert bx0 <= nose_x <= bx1 and by0 <= nose_y <= by1
    assert 0.0 < dets.scores[0] <= 1.0


@pytest.mark.model
def test_keypoints_guessed_outside_the_frame_score_zero(annotator):
    """The astronaut's portrait ends at her waist: BlazePose still places knees and ankles below
    the frame. Those guesses must not count as seen keypoints."""
    image = PHOTOS["astronaut"]()
    kp = annotator.detect(image).keypoints[0]
    height, width = image.shape[:2]
    outside = (kp[:, 0] < 0) | (kp[:, 0] >= width) | (kp[:, 1] < 0) | (kp[:, 1] >= height)
    assert outside[[KP["left_ankle"], KP["right_ankle"]]].all()
    assert (kp[outside, 2] == 0).all()
    assert (kp[~outside, 2] > 0).any()


@pytest.mark.model
@pytest.mark.parametrize("name", ["coffee", "chelsea", "rocket"])
def test_no_person_on_photos_without_people(annotator, name):
    dets = annotator.detect(PHOTOS[name]())
    assert len(dets) == 0 and dets.keypoints is None


@pytest.mark.model
def test_greyscale_array_is_refused(annotator):
    with pytest.raises(ValueError, match="RGB uint8"):
        annotator.detect(skimage.data.camera())


@pytest.mark.pipeline
def test_annotate_lite_in_a_beam_pipeline():
    """Annotate(annotator='lite') end to end: people found, empty dets for the cat, a bad array rejected."""
    photos = [_decoded(1, skimage.data.astronaut()), _decoded(2, skimage.data.chelsea()),
              _decoded(3, skimage.data.camera())]  # 3: a 2-D array, not RGB: a model_error reject
    pipeline = make_pipeline(PipelineOptions([]))
    outputs = (pipeline | beam.Create(photos) | Annotate(annotator="lite"))
    summary = outputs.main | beam.Map(
        lambda a: (a.photo.record.photo_id, a.annotator, len(a.keypoint_dets),
                   a.keypoint_dets.masks is not None and len(a.keypoint_dets) > 0,
                   a.mask_dets, a.cse_dets))
    assert_that(summary, equal_to([(1, "lite", 1, True, None, None), (2, "lite", 0, False, None, None)]),
                label="main")
    rejects = outputs.rejects | beam.Map(lambda r: (r.record_id, r.stage, r.reason))
    assert_that(rejects, equal_to([("3", "annotate", "model_error")]), label="rejects")
    result = pipeline.run()
    result.wait_until_finish()
    counters = read_counters(result)
    assert counters["annotate.photos"] == 2
    assert counters["annotate.photos_with_person"] == 1
    assert counters["annotate.model_error"] == 1
