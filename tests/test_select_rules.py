"""The FDH rule on hand-built figures whose body parts are known by construction."""
import pytest

from tests.select_scenes import (PART_VERTEX, figure_keypoints, fdh_scene, lite_scene, make_photo,
                                 paint_figure, synthetic_part_table)
from transforms.records import COCO_KEYPOINTS, HEAD_KEYPOINTS
from transforms.s6_select import select_persons
from transforms.s6_select.parts import part_mask
from transforms.s6_select.rules import (ALLOWED_BITS, IGNORED, MATCH, MISMATCH, FdhRule, apply_rule,
                                        keypoint_status)

TABLE = synthetic_part_table()
RULE = FdhRule(min_keypoint_matches=4, min_head_matches=2, keypoint_score_threshold=0.5)
KP = {name: k for k, name in enumerate(COCO_KEYPOINTS)}


def status_for(keypoints, box=(0, 0, 300, 400), hw=(400, 300), x0=100, y0=50):
    mask, vertices = paint_figure(hw, x0, y0)
    return keypoint_status(keypoints, box, mask, e_mask=mask, vertices=vertices, part_table=TABLE,
                           score_threshold=0.5)


def test_allowed_parts_follow_the_persons_own_side():
    assert ALLOWED_BITS[KP["left_elbow"]] == part_mask("left_upper_arm", "left_lower_arm")
    assert ALLOWED_BITS[KP["right_wrist"]] == part_mask("right_lower_arm", "right_hand")
    assert ALLOWED_BITS[KP["left_ankle"]] == part_mask("left_lower_leg", "left_foot")
    assert ALLOWED_BITS[KP["right_shoulder"]] == part_mask("torso", "neck", "right_upper_arm")
    for k in HEAD_KEYPOINTS:
        assert ALLOWED_BITS[k] == part_mask("head", "neck")


def test_every_keypoint_on_its_part_matches():
    status = status_for(figure_keypoints(100, 50))
    assert (status == MATCH).all()
    result = apply_rule(status, RULE)
    assert result.kept and result.matches == 17 and result.head_matches == 5


def test_mirrored_labels_mismatch_on_the_limbs():
    kps = figure_keypoints(100, 50)
    mirrored = kps.copy()
    for name in COCO_KEYPOINTS:
        if name.startswith("left_"):
            other = name.replace("left_", "right_")
            mirrored[KP[name]], mirrored[KP[other]] = kps[KP[other]], kps[KP[name]]
    status = status_for(mirrored)
    limb_joints = ["elbow", "wrist", "knee", "ankle"]
    for joint in limb_joints:
        assert status[KP[f"left_{joint}"]] == MISMATCH
        assert status[KP[f"right_{joint}"]] == MISMATCH
    # Head keypoints allow head or neck on both sides; shoulders and hips sit on the torso.
    assert (status[list(HEAD_KEYPOINTS)] == MATCH).all()
    assert status[KP["left_shoulder"]] == MATCH and status[KP["left_hip"]] == MATCH


def test_keypoints_off_the_embedding_are_too_few():
    kps = figure_keypoints(100, 50)
    kps[:, 0] = 5  # a column left of the figure: no CSE there, still inside the crop box
    result = apply_rule(status_for(kps), RULE)
    assert result.matches == 0 and result.reason == "too_few_keypoint_matches"


def test_head_keypoints_on_the_torso_fail_the_head_rule():
    kps = figure_keypoints(100, 50)
    kps[list(HEAD_KEYPOINTS), :2] = (100 + 30, 50 + 60)  # middle of the torso
    result = apply_rule(status_for(kps), RULE)
    assert result.matches == 12 and result.head_matches == 0 and result.reason == "head_rule"


def test_a_head_keypoint_on_the_neck_counts_for_the_head_rule():
    kps = figure_keypoints(100, 50)
    kps[list(HEAD_KEYPOINTS)[:3], :2] = (100 + 30.5, 50 + 32.5)  # neck band
    kps[list(HEAD_KEYPOINTS)[3:], 2] = 0.0  # ignored
    result = apply_rule(status_for(kps), RULE)
    assert result.head_matches == 3 and result.kept


def test_keypoints_outside_the_crop_box_match():
    kps = figure_keypoints(100, 50)
    kps[list(HEAD_KEYPOINTS), 1] = -40.0  # above the image and above the box
    status = status_for(kps, box=(80, 0, 240, 288))
    assert (status[list(HEAD_KEYPOINTS)] == MATCH).all()
    # The same points inside a box that reaches up there (zero padding) mismatch: no embedding.
    status = status_for(kps, box=(80, -60, 240, 288))
    assert (status[list(HEAD_KEYPOINTS)] == MISMATCH).all()


def test_low_score_keypoints_are_ignored_not_mismatched():
    kps = figure_keypoints(100, 50)
    kps[5:, 2] = 0.1  # every limb keypoint below the threshold
    status = status_for(kps)
    assert (status[5:] == IGNORED).all()
    assert apply_rule(status, RULE).kept  # 5 head matches reach the 4
    kps[:3, 2] = 0.1
    result = apply_rule(status_for(kps), RULE)
    assert result.matches == 2 and result.reason == "too_few_keypoint_matches"


def test_configurable_thresholds():
    kps = figure_keypoints(100, 50)
    status = status_for(kps)
    assert apply_rule(status, FdhRule(min_keypoint_matches=17, min_head_matches=5)).kept
    assert apply_rule(status, FdhRule(min_keypoint_matches=18)).reason == "too_few_keypoint_matches"
    assert apply_rule(status, FdhRule(min_head_matches=6)).reason == "head_rule"


@pytest.mark.parametrize("move_head_off_mask,expected", [(False, None), (True, "head_rule")])
def test_lite_form_uses_the_person_mask(move_head_off_mask, expected):
    photo = make_photo()
    kps = figure_keypoints(100, 50, score=0.9)
    if move_head_off_mask:
        kps[list(HEAD_KEYPOINTS), :2] = (100 + 5, 50 + 5)  # beside the head, off the mask
    annotated = lite_scene(photo, 100, 50, keypoints=kps)
    selection = select_persons(annotated, None, RULE)
    if expected is None:
        assert len(selection.kept) == 1 and selection.kept[0].extra["keypoint_matches"] == 17
    else:
        assert not selection.kept and selection.dropped[0].reason == expected


def test_select_persons_fdh_scene_keeps_the_good_figure_and_says_why_the_other_went():
    photo = make_photo((400, 500))
    good = figure_keypoints(40, 60)
    bad = figure_keypoints(300, 60)
    bad[list(HEAD_KEYPOINTS), :2] = (300 + 30, 60 + 60)  # head keypoints on the torso
    annotated = fdh_scene(photo, [(40, 60, 1), (300, 60, 1)], keypoints=[good, bad])
    selection = select_persons(annotated, TABLE, RULE)
    assert [p.index for p in selection.kept] == [0]
    assert [(d.reason, d.person_index) for d in selection.dropped] == [("head_rule", 1)]
    kept = selection.kept[0]
    assert kept.extra["keypoint_matches"] == 17
    assert kept.vertices[60 + 15, 40 + 30] == PART_VERTEX["head"]


def test_fdh_without_embeddings_uses_mask_persons_and_the_mask_form():
    photo = make_photo((400, 500))
    good = figure_keypoints(40, 60)
    bad = figure_keypoints(300, 60)
    bad[:, :2] = (302, 62)  # every keypoint in a corner of the figure box, off its mask
    annotated = fdh_scene(photo, [(40, 60, 1), (300, 60, 1)], keypoints=[good, bad])
    annotated.cse_dets = None  # the --no_embeddings variant
    selection = select_persons(annotated, None, FdhRule())
    assert [p.index for p in selection.kept] == [0]
    assert selection.kept[0].e_mask is None and selection.kept[0].extra["keypoint_matches"] == 17
    assert [(d.reason, d.person_index) for d in selection.dropped] == [("too_few_keypoint_matches", 1)]


def test_default_score_threshold_depends_on_the_annotator():
    from transforms.records import score_threshold_for

    assert score_threshold_for("fdh", None) == 0.0
    assert score_threshold_for("lite", None) == 0.5
    assert score_threshold_for("lite", 0.2) == 0.2
    photo = make_photo()
    kps = figure_keypoints(100, 50, score=0.3)  # below BlazePose's 0.5: ignored by default
    selection = select_persons(lite_scene(photo, 100, 50, keypoints=kps), None, FdhRule())
    assert not selection.kept and selection.dropped[0].reason == "too_few_keypoint_matches"
