"""Crop geometry (DP2's), masks, vertices and keypoints of FDH samples, and CSE vertex lookup."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.select_scenes import PART_VERTEX, make_photo, paint_figure
from transforms.records import CROP_HEIGHT, CROP_WIDTH, Person
from transforms.crop_geometry import crop_box_for_person, expand_axis, expand_for_background, is_too_small
from transforms.cse_vertices import embeddings_to_vertices
from transforms.s7_crop import DILATION_RADIUS, crop_image, crop_keypoints, crop_masks, crop_nearest, make_sample


def test_dilation_radius_is_four():
    assert DILATION_RADIUS == 4


def test_expand_axis_centres_then_shifts_inside():
    assert expand_axis(40, 60, 30, 100) == (35, 65)
    assert expand_axis(40, 60, 31, 100) == (35, 66)  # odd growth: the extra pixel goes to the end
    assert expand_axis(2, 22, 40, 100) == (0, 40)  # shifted right, inside the image
    assert expand_axis(80, 98, 40, 100) == (60, 100)  # shifted left
    assert expand_axis(10, 90, 120, 100) == (-10, 110)  # longer than the image: stays centred


def test_worked_example():
    # Person box 60 x 180 at (400, 300) in a 1000 x 1000 photo, 5000 person pixels:
    # grow by int(sqrt(180*60)*0.1) = 10 -> 70 x 190 at (395, 295); aspect: w = int(190/1.8) = 105
    # -> x 378..483; person fraction 5000 / (105*190) < 0.7 -> unchanged.
    assert crop_box_for_person((400, 300, 460, 480), (1000, 1000), 5000) == (378, 295, 483, 485)


def test_background_expansion_when_the_person_fills_the_box():
    box = (100, 100, 200, 280)  # 100 x 180
    mask_pixels = int(0.9 * 100 * 180)
    grown = expand_for_background(box, (1000, 1000), mask_pixels)
    scale = math.sqrt((mask_pixels / 0.7) / (100 * 180))
    assert grown[2] - grown[0] == math.ceil(scale * 100) and grown[3] - grown[1] == math.ceil(scale * 180)
    assert expand_for_background(box, (1000, 1000), int(0.69 * 100 * 180)) == box


def test_box_at_the_border_is_shifted_inside_and_partly_outside_person_overflows():
    # A person touching the left border: the grown box is shifted, not cut.
    box = crop_box_for_person((0, 100, 50, 250), (400, 600), 4000)
    assert box[0] == 0 and box[2] <= 600
    # A person as tall as the image: the aspect expansion must leave the image on both sides.
    box = crop_box_for_person((100, 0, 400, 300), (300, 500), 60000)
    assert box[1] < 0 and box[3] > 300


def test_tiny_person_is_too_small():
    box = crop_box_for_person((10, 10, 14, 20), (100, 100), 30)
    assert is_too_small(box)
    assert not is_too_small((0, 0, 32, 32))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_box_invariants(data):
    height = data.draw(st.integers(20, 2000), label="H")
    width = data.draw(st.integers(20, 2000), label="W")
    x0 = data.draw(st.integers(0, width - 2))
    y0 = data.draw(st.integers(0, height - 2))
    x1 = data.draw(st.integers(x0 + 1, width))
    y1 = data.draw(st.integers(y0 + 1, height))
    fill = data.draw(st.floats(0.05, 1.0))
    mask_pixels = max(1, int(fill * (x1 - x0) * (y1 - y0)))
    bx0, by0, bx1, by1 = crop_box_for_person((x0, y0, x1, y1), (height, width), mask_pixels)
    w, h = bx1 - bx0, by1 - by0
    # Aspect 1.8 within integer rounding (truncation in the aspect step, ceil in the last step).
    assert abs(h - 1.8 * w) <= 3.6, (w, h)
    # The crop contains the person box.
    assert bx0 <= x0 and by0 <= y0 and bx1 >= x1 and by1 >= y1
    # The person covers at most 70 % of the crop.
    assert mask_pixels / (w * h) <= 0.7 + 1e-9


def test_crop_inside_the_image_at_target_size_is_exact():
    photo = make_photo((400, 300))
    box = (50, 60, 50 + CROP_WIDTH, 60 + CROP_HEIGHT)
    np.testing.assert_array_equal(crop_image(photo.image, box), photo.image[60:348, 50:210])
    labels = np.arange(400 * 300, dtype=np.int32).reshape(400, 300)
    np.testing.assert_array_equal(crop_nearest(labels, box), labels[60:348, 50:210])


def test_nearest_resize_picks_floor_of_scaled_index():
    labels = np.arange(20 * 10).reshape(20, 10)
    out = crop_nearest(labels, (0, 0, 10, 20), (40, 20))  # 2x upscale: each source pixel twice
    np.testing.assert_array_equal(out, labels.repeat(2, 0).repeat(2, 1))


def test_padding_outside_the_image_is_zero_and_background():
    photo = make_photo((300, 200))
    person = np.zeros((300, 200), bool)
    person[:, :40] = True  # a person cut by the left border
    box = (-80, 0, 80, 288)  # 160 x 288: half the crop lies left of the image
    image = crop_image(photo.image, box)
    assert (image[:, :80] == 0).all() and (image[:, 80:] > 0).all()
    mask, maskrcnn_mask = crop_masks(person, box)
    assert maskrcnn_mask[:, :80].all() and not maskrcnn_mask[:, 80:120].any()
    assert maskrcnn_mask[:, 120:].all()
    # Dilation grows the person by 4 px to the right, and is undone in the left padding.
    assert not mask[:, 80:124].any() and mask[:, 124:].all()
    assert mask[:, :80].all()


def test_resize_is_antialiased_bilinear():
    image = np.zeros((576, 320, 3), np.uint8)
    image[::2] = 255  # one-pixel stripes: a 2x downscale must average them, not alias
    out = crop_image(image, (0, 0, 320, 576))
    assert out.shape == (CROP_HEIGHT, CROP_WIDTH, 3)
    assert abs(int(out[10:-10, 10:-10].mean()) - 127) <= 2


def test_make_sample_from_a_painted_figure():
    photo = make_photo((400, 300))
    mask, vertices = paint_figure((400, 300), 100, 50, scale=2)
    keypoints = np.zeros((17, 3), np.float32)
    keypoints[0] = (160, 80, 5.0)   # nose, inside
    keypoints[1] = (160, 80, -1.0)  # low score
    keypoints[2] = (-500, 80, 5.0)  # outside the crop
    person = Person(index=3, box=np.array([100, 50, 220, 410], np.float32), mask=mask,
                    keypoints=keypoints, score=0.95, e_mask=mask, vertices=vertices)
    box = crop_box_for_person(person.box, (400, 300), int(mask.sum()))
    sample = make_sample(photo, person, box, keypoint_score_threshold=0.0, annotator="fdh")
    assert sample.key == "1000003" and sample.crop_box == box
    assert sample.image.shape == (288, 160, 3) and sample.image.dtype == np.uint8
    assert sample.vertices.dtype == np.int16 and sample.vertices.shape == (288, 160)
    x0, y0, x1, y1 = box
    # The nose pixel maps to the head vertex in the crop.
    cx = int((160 - x0) * 160 / (x1 - x0))
    cy = int((80 - y0) * 288 / (y1 - y0))
    assert sample.vertices[cy, cx] == PART_VERTEX["head"]
    assert set(np.unique(sample.vertices[sample.e_mask])) <= set(PART_VERTEX.values())
    assert (sample.vertices[~sample.e_mask] == 0).all()
    np.testing.assert_array_equal(sample.e_mask, ~sample.maskrcnn_mask)
    assert sample.keypoints[0, 0] == pytest.approx((160 - x0) / (x1 - x0))
    assert sample.keypoints[:3, 2].tolist() == [1.0, 0.0, 0.0]
    np.testing.assert_array_equal(sample.keypoint_scores, keypoints[:, 2])


def test_crop_keypoints_normalise_and_flag_visibility():
    kps = np.array([[10, 20, 0.9], [110, 20, 0.9], [60, 300, 0.9], [60, 100, 0.2]], np.float32)
    out = crop_keypoints(kps, (10, 20, 110, 200), score_threshold=0.5)
    np.testing.assert_allclose(out[:, :2], [[0, 0], [1, 0], [0.5, 280 / 180], [0.5, 80 / 180]])
    assert out[:, 2].tolist() == [1, 1, 0, 0]


def brute_force_nearest(rows, table):
    return ((rows[:, None, :] - table[None]) ** 2).sum(-1).argmin(1)


def test_embeddings_to_vertices_numpy_torch_and_mask_agree_with_brute_force():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(300, 16)).astype(np.float32)
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    # Embeddings near known rows: the answer is those rows.
    truth = rng.integers(0, 300, size=(6, 7))
    emb = (table[truth] + rng.normal(scale=1e-3, size=(6, 7, 16))).astype(np.float32).transpose(2, 0, 1)
    np.testing.assert_array_equal(embeddings_to_vertices(emb, table, chunk_rows=5), truth)
    np.testing.assert_array_equal(
        embeddings_to_vertices(torch.from_numpy(emb), torch.from_numpy(table), chunk_rows=4).numpy(), truth)
    mask = rng.random((6, 7)) > 0.5
    np.testing.assert_array_equal(embeddings_to_vertices(emb, table, mask=mask), np.where(mask, truth, 0))
    np.testing.assert_array_equal(
        embeddings_to_vertices(torch.from_numpy(emb), torch.from_numpy(table),
                               mask=torch.from_numpy(mask)).numpy(), np.where(mask, truth, 0))
    rows = rng.normal(size=(50, 16)).astype(np.float32)
    np.testing.assert_array_equal(embeddings_to_vertices(rows, table, chunk_rows=7),
                                  brute_force_nearest(rows, table))


def test_embeddings_to_vertices_rejects_bad_shapes():
    with pytest.raises(ValueError):
        embeddings_to_vertices(np.zeros((16, 4, 4, 1)), np.zeros((10, 16)))
    with pytest.raises(ValueError):
        embeddings_to_vertices(np.zeros((16, 4, 4)), np.zeros((10, 8)))
    with pytest.raises(ValueError):
        embeddings_to_vertices(np.zeros((16, 4, 4)), np.zeros((10, 16)), mask=np.zeros((3, 3), bool))


@pytest.mark.parametrize("radius", [0, 1, 4, 7])
def test_dilate_disk_equals_scipy_binary_dilation(radius):
    from scipy.ndimage import binary_dilation

    from transforms.s7_crop import dilate_disk, disk

    rng = np.random.default_rng(radius)
    mask = rng.random((60, 40)) > 0.97
    mask[0, 5] = mask[59, 39] = mask[30, 0] = True  # touching every border
    expected = binary_dilation(mask, structure=disk(radius)) if radius else mask
    np.testing.assert_array_equal(dilate_disk(mask, radius), expected)
