"""DensePose CSE post-processing at the adapter boundary, with a detectron2-SHAPED fake.

detectron2 is not installed here: the fake has the structure of DensePose's predictor output
(`pred_boxes.tensor`, `scores`, `pred_densepose.coarse_segm` (N, 2, 112, 112) and
`pred_densepose.embedding` (N, 16, 112, 112)) with hand-built values, so the expected masks and
vertex ids are known exactly. The same fake then stands in for the model in a full cascade
pipeline (keypoint + mask R-CNN with random weights: plumbing only).
"""
from __future__ import annotations

import dataclasses
import hashlib
from types import SimpleNamespace

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.common import make_pipeline, read_counters
from tests.factories import make_record
from transforms.records import DecodedImage
from transforms.s5_annotate.cascade import FdhSettings, expand_fdh
from transforms.s5_annotate.cse import DensePoseCseHandler, cse_instances_to_detections
from transforms.s5_annotate.handlers import TorchvisionDetectionHandler

SIDE = 112  # DensePose's box-frame resolution
LEFT_VERTEX, RIGHT_VERTEX = 7, 42


def _embed_map(vertices: int = 50, dim: int = 16) -> torch.Tensor:
    table = torch.randn(vertices, dim, generator=torch.Generator().manual_seed(0))
    return table / table.norm(dim=1, keepdim=True)


def _fake_instances(boxes, scores, embed_map) -> SimpleNamespace:
    """Each box: person on the left half of the box frame (embedding LEFT_VERTEX's row), background
    on the right half (embedding RIGHT_VERTEX's row, which must NOT show: it is outside the mask)."""
    n = len(boxes)
    segm = torch.zeros(n, 2, SIDE, SIDE)
    segm[:, 0] = 5.0  # background logit
    segm[:, 0, :, : SIDE // 2] = -5.0
    segm[:, 1, :, : SIDE // 2] = 5.0  # person logit on the left half
    embedding = torch.empty(n, embed_map.shape[1], SIDE, SIDE)
    embedding[:, :, :, : SIDE // 2] = embed_map[LEFT_VERTEX][None, :, None, None]
    embedding[:, :, :, SIDE // 2:] = embed_map[RIGHT_VERTEX][None, :, None, None]
    return SimpleNamespace(
        pred_boxes=SimpleNamespace(tensor=torch.tensor(boxes, dtype=torch.float32)),
        scores=torch.tensor(scores, dtype=torch.float32),
        pred_densepose=SimpleNamespace(coarse_segm=segm, embedding=embedding))


def test_box_frame_outputs_are_pasted_into_the_image_frame():
    embed_map = _embed_map()
    # box 0 inside; box 1 crosses the right/bottom border (clipped); box 2 has no width (dropped)
    instances = _fake_instances([[10, 20, 50, 80], [80.4, 60, 140, 130], [30, 30, 30, 60]],
                                [0.9, 0.6, 0.5], embed_map)
    dets = cse_instances_to_detections(instances, (100, 120), embed_map)
    assert len(dets) == 2 and dets.scores.tolist() == pytest.approx([0.9, 0.6])
    np.testing.assert_array_equal(dets.boxes, [[10, 20, 50, 80], [80, 60, 120, 100]])
    assert dets.masks.shape == (2, 100, 120) and dets.masks.dtype == bool
    assert dets.vertices.shape == (2, 100, 120) and dets.vertices.dtype == np.int16
    expected = np.zeros((100, 120), bool)
    expected[20:80, 10:30] = True  # left half of a 40 px wide box
    np.testing.assert_array_equal(dets.masks[0], expected)
    np.testing.assert_array_equal(dets.vertices[0], np.where(expected, LEFT_VERTEX, 0))
    # box 1 was resampled to its UNclipped size (60x70), then clipped: left 30 columns are person.
    assert dets.masks[1, 60:100, 80:110].all() and not dets.masks[1, :, 110:].any()
    assert not dets.masks[1, :60].any() and not dets.masks[1, :, :80].any()
    assert set(np.unique(dets.vertices[1])) == {0, LEFT_VERTEX}


def test_no_boxes_gives_empty_detections_with_image_shaped_arrays():
    embed_map = _embed_map()
    dets = cse_instances_to_detections(_fake_instances(np.zeros((0, 4)), [], embed_map), (30, 40), embed_map)
    assert len(dets) == 0 and dets.masks.shape == (0, 30, 40) and dets.vertices.shape == (0, 30, 40)


def test_numpy_inputs_work_too():
    embed_map = _embed_map()
    instances = _fake_instances([[0, 0, 20, 20]], [0.8], embed_map)
    as_numpy = SimpleNamespace(
        pred_boxes=SimpleNamespace(tensor=instances.pred_boxes.tensor.numpy()),
        scores=instances.scores.numpy(),
        pred_densepose=SimpleNamespace(coarse_segm=instances.pred_densepose.coarse_segm.numpy(),
                                       embedding=instances.pred_densepose.embedding.numpy()))
    dets = cse_instances_to_detections(as_numpy, (20, 20), embed_map.numpy())
    assert dets.masks[0, :, :10].all() and not dets.masks[0, :, 10:].any()


class FakeCsePredictor:
    """Stands in for `cse.CsePredictor`: one detectron2-shaped detection per image (its left half)."""

    def __init__(self):
        self.embed_map = _embed_map()

    def detect(self, images):
        results = []
        for image in images:
            if image.shape[0] == 77:  # a marker size: this image makes the 'model' fail
                raise RuntimeError("CUDA out of memory (simulated)")
            height, width = image.shape[:2]
            instances = _fake_instances([[0, 0, width, height]], [0.95], self.embed_map)
            results.append(cse_instances_to_detections(instances, (height, width), self.embed_map))
        return results


class FakeCseHandler(DensePoseCseHandler):
    def load_model(self):
        return FakeCsePredictor()


class PersonBiasedHandler(TorchvisionDetectionHandler):
    """Random weights with the person class logit pushed up, so that random Mask R-CNN
    detections are 'persons' and reach the CSE step (plumbing only)."""

    def load_model(self):
        model = super().load_model()
        with torch.no_grad():
            model.model.roi_heads.box_predictor.cls_score.bias[1] += 20.0
        return model


@dataclasses.dataclass(frozen=True)
class FakeCseSettings(FdhSettings):
    def torchvision_handler(self, model_name):
        options = {k: v for k, v in self.model_options.items() if k != "mask_model"}
        return PersonBiasedHandler(model_name, random_weights=True, max_batch_size=self.max_batch_size,
                                   **options)

    def cse_handler(self):
        return FakeCseHandler(max_batch_size=self.max_batch_size)


def _photo(photo_id: int, height: int, width: int) -> DecodedImage:
    image = np.random.default_rng(photo_id).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return DecodedImage(record=make_record(photo_id), image=image,
                        sha256=hashlib.sha256(image.tobytes()).hexdigest(), original_size=(width, height))


@pytest.mark.slow
def test_full_cascade_with_fake_cse_in_a_pipeline():
    settings = FakeCseSettings(
        random_weights=True, max_batch_size=2, person_score=0.0, min_person_height=0,
        model_options=dict(min_size=96, max_size=128, box_detections_per_img=2, score_threshold=0.0,
                           mask_model="maskrcnn_resnet50_fpn"))
    photos = [_photo(1, 64, 96), _photo(2, 90, 60), _photo(3, 77, 50)]  # 3: the 'model' fails on it
    pipeline = make_pipeline(PipelineOptions([]))
    outputs = expand_fdh(pipeline | beam.Create(photos), settings)

    def summary(annotated):
        height, width = annotated.photo.image.shape[:2]
        cse = annotated.cse_dets
        assert cse.vertices.shape == (len(cse), height, width)
        left = np.zeros((height, width), bool)
        left[:, : width // 2] = True
        return (annotated.photo.record.photo_id, len(cse),
                bool((cse.masks[0] == left).all()),
                bool((cse.vertices[0] == np.where(left, LEFT_VERTEX, 0)).all()))

    assert_that(outputs["main"] | beam.Map(summary), equal_to([(1, 1, True, True), (2, 1, True, True)]),
                label="main")
    assert_that(outputs["rejects"] | beam.Map(lambda r: (r.record_id, r.reason, "out of memory" in r.detail)),
                equal_to([("3", "model_error", True)]), label="rejects")
    result = pipeline.run()
    result.wait_until_finish()
    assert read_counters(result)["annotate.model_error"] == 1
