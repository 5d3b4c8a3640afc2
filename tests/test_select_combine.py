"""Pairing Mask R-CNN with CSE detections, and keypoint detections with persons."""
import numpy as np

from tests.select_scenes import fdh_scene, figure_keypoints, make_photo
from transforms.crop_geometry import mask_box
from transforms.records import AnnotatedPhoto, Detections
from transforms.s6_select.combine import (annotation_problem, assign_keypoints, combine_fdh,
                                          greedy_pairs, mask_iou_matrix)


def rect_mask(hw, x0, y0, x1, y1):
    mask = np.zeros(hw, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_mask_box_is_tight_and_exclusive():
    assert mask_box(rect_mask((50, 60), 5, 7, 20, 30)) == (5, 7, 20, 30)
    assert mask_box(np.zeros((5, 5), bool)) is None


def test_greedy_pairs_follow_detector_order_not_iou():
    # Mask 0 overlaps CSE 0 (IoU 0.5) and CSE 1 (IoU 0.9): DP2 takes (0, 0), then (1, 1) is free.
    iou = np.array([[0.5, 0.9], [0.1, 0.6]])
    assert greedy_pairs(iou, 0.4) == [(0, 0), (1, 1)]
    # When mask 1 only matches CSE 0, it is left unpaired because mask 0 took it first.
    iou = np.array([[0.5, 0.9], [0.8, 0.1]])
    assert greedy_pairs(iou, 0.4) == [(0, 0)]


def test_two_overlapping_people_pair_in_detector_order_and_unions_masks():
    hw = (100, 120)
    a = rect_mask(hw, 10, 10, 60, 90)       # 50 x 80
    b = rect_mask(hw, 35, 10, 85, 90)       # overlaps a by half
    cse_b = rect_mask(hw, 36, 12, 85, 90)   # IoU(a, cse_b) ~ 0.33, IoU(b, cse_b) ~ 0.95
    cse_a = rect_mask(hw, 12, 10, 60, 88)
    masks = np.stack([a, b])
    cses = np.stack([cse_b, cse_a])
    iou = mask_iou_matrix(masks, cses)
    assert iou[0, 1] > 0.9 and iou[1, 0] > 0.9 and iou[0, 0] < 0.4
    photo = make_photo(hw)
    boxes = np.array([[10, 10, 60, 90], [35, 10, 85, 90]], np.float32)
    cse_boxes = np.array([[36, 12, 85, 90], [12, 10, 62, 88]], np.float32)
    kps = np.stack([figure_keypoints(10, 10, 0.25), figure_keypoints(35, 10, 0.25)])

    annotated = AnnotatedPhoto(
        photo=photo, annotator="fdh",
        keypoint_dets=Detections(boxes=boxes[::-1].copy(), scores=np.ones(2, np.float32),
                                 keypoints=kps[::-1].copy()),
        mask_dets=Detections(boxes=boxes, scores=np.array([0.9, 0.8], np.float32), masks=masks),
        cse_dets=Detections(boxes=cse_boxes, scores=np.ones(2, np.float32), masks=cses,
                            vertices=np.ones((2,) + hw, np.int16)))
    combined = combine_fdh(annotated)
    assert [(p.extra["mask_det"], p.extra["cse_det"]) for p in combined.persons] == [(0, 1), (1, 0)]
    first = combined.persons[0]
    np.testing.assert_array_equal(first.mask, a | cse_a)
    np.testing.assert_array_equal(first.e_mask, cse_a)
    np.testing.assert_array_equal(first.box, [10, 10, 62, 90])  # union of mask box and CSE box
    # Keypoint detections came in reverse order: each person still gets its own.
    assert [p.extra["keypoint_det"] for p in combined.persons] == [1, 0]
    np.testing.assert_array_equal(first.keypoints, kps[0])
    assert combined.dropped == []


def test_unpaired_detections_are_dropped_with_reasons():
    photo = make_photo((300, 300))
    annotated = fdh_scene(photo, [(20, 20, 1), (200, 20, 1)])
    # Move the second CSE detection away from every mask.
    cse = annotated.cse_dets
    cse.masks[1] = False
    cse.masks[1, 250:280, 250:280] = True
    combined = combine_fdh(annotated)
    assert [p.index for p in combined.persons] == [0]
    assert sorted(d.reason for d in combined.dropped) == ["no_cse_match", "no_mask_match"]
    assert combined.unassigned_keypoint_dets == 1


def test_person_without_a_keypoint_detection_is_dropped():
    photo = make_photo((300, 300))
    annotated = fdh_scene(photo, [(20, 20, 1), (200, 20, 1)])
    kd = annotated.keypoint_dets
    annotated.keypoint_dets = Detections(boxes=kd.boxes[:1], scores=kd.scores[:1],
                                         keypoints=kd.keypoints[:1])
    combined = combine_fdh(annotated)
    assert [p.index for p in combined.persons] == [0]
    assert [(d.reason, d.person_index) for d in combined.dropped] == [("no_keypoints", 1)]


def test_assign_keypoints_is_one_to_one_with_min_iou():
    persons = np.array([[0, 0, 10, 20], [8, 0, 18, 20], [100, 100, 110, 120]], np.float32)
    dets = np.array([[8, 0, 18, 21], [0, 0, 10, 19]], np.float32)
    assert assign_keypoints(persons, dets) == {0: 1, 1: 0}
    assert assign_keypoints(persons, np.zeros((0, 4), np.float32)) == {}


def test_annotation_problems_are_named():
    photo = make_photo((100, 80))
    annotated = fdh_scene(photo, [(5, 5, 0)])
    assert annotation_problem(annotated) is None
    annotated.cse_dets.vertices = np.zeros((1, 10, 10), np.int16)
    assert "vertices shape" in annotation_problem(annotated)
    annotated.annotator = "other"
    assert "unknown annotator" in annotation_problem(annotated)
    empty = fdh_scene(photo, [])
    empty.mask_dets = None
    empty.keypoint_dets = Detections.empty()
    assert annotation_problem(empty) is None
