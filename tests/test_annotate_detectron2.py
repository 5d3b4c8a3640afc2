"""`--detector=detectron2`: DP2's own detectors (issue 12, items 1-2).

The adapters are checked on detectron2-shaped outputs without detectron2; the configs and the
models themselves need detectron2 (built from source) and skip when it is absent.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tests.factories import make_record
from transforms.records import DEFAULT_SCORE_THRESHOLDS, AnnotatedPhoto, DecodedImage, Detections
from transforms.s5_annotate import Annotate
from transforms.s5_annotate import detectron2_models as d2
from transforms.s5_annotate.cascade import FdhSettings
from transforms.s6_select.combine import combine_masks_only

torch = pytest.importorskip("torch")


def _instances(boxes, scores, classes, masks=None, keypoints=None):
    return SimpleNamespace(
        pred_boxes=SimpleNamespace(tensor=torch.tensor(boxes, dtype=torch.float32)),
        scores=torch.tensor(scores), pred_classes=torch.tensor(classes),
        pred_masks=None if masks is None else torch.as_tensor(masks),
        pred_keypoints=None if keypoints is None else torch.as_tensor(keypoints, dtype=torch.float32))


def test_person_class_kept_and_mask_and_keypoints_stay_on_their_detection():
    masks = np.zeros((3, 20, 30), bool)
    masks[0, :5], masks[1, 5:10], masks[2, 10:] = True, True, True
    keypoints = np.stack([np.full((17, 3), i, np.float32) for i in range(3)])
    dets = d2.instances_to_detections(_instances(
        [[0, 0, 10, 5], [0, 5, 10, 10], [0, 10, 10, 20]], [0.9, 0.8, 0.35], [0, 2, 0], masks, keypoints))
    assert len(dets) == 2 and dets.scores.tolist() == pytest.approx([0.9, 0.35])
    np.testing.assert_array_equal(dets.masks, masks[[0, 2]])
    np.testing.assert_array_equal(dets.keypoints[:, 0, 0], [0, 2])  # row i = detection i
    assert dets.masks.dtype == bool and dets.keypoints.dtype == np.float32
    only_boxes = d2.instances_to_detections(_instances([[0, 0, 1, 1]], [0.5], [0]), keep_class=None)
    assert only_boxes.masks is None and only_boxes.keypoints is None


def test_settings_pick_dp2_models_assets_and_threshold():
    faithful = FdhSettings(detector="detectron2", no_embeddings=True)
    assert faithful.asset_names() == [d2.KEYPOINT_MODEL, d2.MASK_MODEL]
    assert faithful.keypoint_handler()._model_name == d2.KEYPOINT_MODEL
    assert faithful.mask_handler()._model_name == d2.MASK_MODEL
    assert faithful.annotator_name == "fdh_detectron2"
    assert DEFAULT_SCORE_THRESHOLDS[faithful.annotator_name] == d2.KEYPOINT_VISIBILITY == 0.5
    assert FdhSettings().annotator_name == "fdh"  # torchvision: heatmap logits, threshold 0
    with pytest.raises(ValueError, match="--detector"):
        Annotate(annotator="fdh", detector="yolo", no_embeddings=True)
    with pytest.raises(ValueError, match="unknown detectron2 model"):
        d2.Detectron2DetectionHandler("resnet")


def test_keypoints_go_to_the_person_whose_mask_their_detection_shares():
    """Mask IoU, not box IoU: two persons with the same box, different masks."""
    height, width = 40, 40
    left, right = np.zeros((height, width), bool), np.zeros((height, width), bool)
    left[:, :20], right[:, 20:] = True, True
    boxes = np.array([[0, 0, 40, 40], [0, 0, 40, 40]], np.float32)
    mask_dets = Detections(boxes=boxes, scores=np.array([0.9, 0.8], np.float32), masks=np.stack([left, right]))
    keypoints = np.stack([np.full((17, 3), 7, np.float32), np.full((17, 3), 9, np.float32)])
    # the keypoint model saw them in the other order: its detection 0 is the right-hand person
    keypoint_dets = Detections(boxes=boxes, scores=np.array([0.9, 0.9], np.float32),
                               masks=np.stack([right, left]), keypoints=keypoints)
    photo = DecodedImage(record=make_record(5), image=np.zeros((height, width, 3), np.uint8), sha256="0",
                         original_size=(width, height))
    annotated = AnnotatedPhoto(photo=photo, annotator="fdh_detectron2", keypoint_dets=keypoint_dets,
                               mask_dets=mask_dets)
    persons = combine_masks_only(annotated).persons
    assert [p.extra["keypoint_det"] for p in persons] == [1, 0]
    assert persons[0].keypoints[0, 0] == 9 and persons[1].keypoints[0, 0] == 7


def test_dp2_configs_build_with_detectron2():
    pytest.importorskip("detectron2")
    cfg = d2.build_mask_rcnn_config()
    assert cfg.MODEL.RESNETS.DEPTH == 101 and cfg.MODEL.RESNETS.NUM_GROUPS == 32
    assert cfg.MODEL.RESNETS.WIDTH_PER_GROUP == 8 and cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.3
    assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.MASK_ON
    lazy = d2.keypoint_mask_rcnn_lazy_config()
    assert lazy.roi_heads.num_classes == 1 and lazy.roi_heads.keypoint_head.num_keypoints == 17
    assert list(lazy.roi_heads.keypoint_head.conv_dims) == [512] * 8


@pytest.mark.slow
def test_dp2_detectors_run_with_random_weights():
    pytest.importorskip("detectron2")
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    for load in (d2.load_mask_rcnn, d2.load_keypoint_mask_rcnn):
        predictor = load(None, "CPU", score_threshold=0.0, random_weights=True)
        (dets,) = predictor.detect([image])
        assert dets.boxes.shape == (len(dets), 4) and dets.scores.shape == (len(dets),)
        if len(dets):
            assert dets.masks.shape == (len(dets), 96, 128)
        if load is d2.load_keypoint_mask_rcnn and len(dets):
            assert dets.keypoints.shape == (len(dets), 17, 3)
