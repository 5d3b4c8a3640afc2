"""CSE into the crop exactly as DeepPrivacy2 does it (issue 12, item 3).

DP2 (dp2/detection/utils.py transform_embedding, structures.py pre_process, models/cse.py) is
restated here from its description, not copied: the crop-space place of the CSE box is
round((v - crop_start) / crop_size * out_size) per side; E and the 112x112 argmax S are resized
there with torchvision's bilinear + antialias; E_mask = resized S > 0; the vertex of each E_mask
pixel is the nearest embed_map row (squared L2) of the resized E, 0 elsewhere. The image-space
mask used for pairing is the argmax nearest-resized to the box (torchvision NEAREST).
Our path (cse_instances_to_detections -> combine -> s7_crop.make_sample) must agree on >= 99 % of
E_mask pixels and of vertex ids.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tvf = pytest.importorskip("torchvision.transforms.functional")

from transforms.crop_geometry import crop_box_for_person  # noqa: E402
from transforms.records import CROP_HEIGHT, CROP_WIDTH, DecodedImage, Person  # noqa: E402
from transforms.s5_annotate.cse import cse_instances_to_detections  # noqa: E402
from transforms.s7_crop import make_sample  # noqa: E402
from tests.factories import make_record  # noqa: E402

SIDE = 112
VERTICES = 1500  # a small mesh keeps the brute-force restatement fast; the rule does not depend on V


def _scene(seed: int, box, image_hw):
    """Smooth random E (16, 112, 112), blob-shaped S logits (2, 112, 112), unit embed_map."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 16, 7, 7, generator=generator)
    embedding = torch.nn.functional.interpolate(coarse, size=(SIDE, SIDE), mode="bicubic", align_corners=False)
    embedding = embedding + 0.05 * torch.randn(embedding.shape, generator=generator)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIDE), torch.linspace(-1, 1, SIDE), indexing="ij")
    radius = 0.7 + 0.15 * torch.sin(3 * torch.atan2(yy, xx) + seed)
    person = (xx / 0.6) ** 2 + (yy / 0.95) ** 2 < radius ** 2
    segm = torch.stack([(~person).float() * 4 - 2, person.float() * 4 - 2])[None]
    table = torch.randn(VERTICES, 16, generator=generator)
    table = table / table.norm(dim=1, keepdim=True)
    instances = SimpleNamespace(
        pred_boxes=SimpleNamespace(tensor=torch.tensor([box], dtype=torch.float32)),
        scores=torch.tensor([0.9]),
        pred_densepose=SimpleNamespace(coarse_segm=segm, embedding=embedding))
    return instances, table


def _dp2_crop(embedding, argmax, crop_box, e_box, out_hw):
    """DP2's transform_embedding + from_E_to_vertex, restated."""
    cx0, cy0, cx1, cy1 = crop_box
    x0 = int(np.round((e_box[0] - cx0) / (cx1 - cx0) * out_hw[1]))
    x1 = int(np.round((e_box[2] - cx0) / (cx1 - cx0) * out_hw[1]))
    y0 = int(np.round((e_box[1] - cy0) / (cy1 - cy0) * out_hw[0]))
    y1 = int(np.round((e_box[3] - cy0) / (cy1 - cy0) * out_hw[0]))
    new_e = torch.zeros((embedding.shape[0], *out_hw))
    new_s = torch.zeros(out_hw, dtype=torch.bool)
    new_e[:, y0:y1, x0:x1] = tvf.resize(embedding, [y1 - y0, x1 - x0], antialias=True,
                                        interpolation=tvf.InterpolationMode.BILINEAR)
    new_s[y0:y1, x0:x1] = tvf.resize(argmax[None].float(), [y1 - y0, x1 - x0], antialias=True,
                                     interpolation=tvf.InterpolationMode.BILINEAR)[0] > 0
    return new_e, new_s


def _dp2_vertices(new_e, new_s, table):
    rows = new_e.reshape(new_e.shape[0], -1).T
    nearest = torch.cdist(rows, table).argmin(dim=1).reshape(new_s.shape)
    return torch.where(new_s, nearest, torch.zeros_like(nearest)).numpy()


def _dp2_image_mask(argmax, box, image_hw):
    x0, y0, x1, y1 = box
    out = np.zeros(image_hw, bool)
    out[y0:y1, x0:x1] = tvf.resize(argmax[None].to(torch.uint8), [y1 - y0, x1 - x0],
                                   interpolation=tvf.InterpolationMode.NEAREST)[0].numpy() > 0
    return out


# (image H, W), CSE box: a downscaled body, an upscaled small one, one whose crop leaves the image
SCENES = [((480, 640), (200.4, 60.2, 330.6, 440.0)), ((300, 400), (180, 120, 214, 175)),
          ((360, 300), (5, 10, 120, 350)), ((500, 500), (240, 100, 300, 230))]


@pytest.mark.parametrize("seed,scene", list(enumerate(SCENES)))
def test_crop_e_mask_and_vertices_match_dp2(seed, scene):
    image_hw, box = scene
    instances, table = _scene(seed, box, image_hw)
    dets = cse_instances_to_detections(instances, image_hw, table)
    e_box = [int(v) for v in dets.embeddings[0].box]
    argmax = instances.pred_densepose.coarse_segm[0].argmax(dim=0) > 0

    # the image-space mask (pairing, union) is DP2's nearest resize of the argmax
    np.testing.assert_array_equal(dets.masks[0], _dp2_image_mask(argmax, e_box, image_hw))

    mask = dets.masks[0]
    crop_box = crop_box_for_person(dets.boxes[0], image_hw, int(mask.sum()))
    person = Person(index=0, box=dets.boxes[0], mask=mask, keypoints=np.zeros((17, 3), np.float32),
                    score=0.9, e_mask=mask, vertices=dets.vertices[0], cse=dets.embeddings[0])
    photo = DecodedImage(record=make_record(1), image=np.zeros((*image_hw, 3), np.uint8), sha256="0",
                         original_size=image_hw[::-1])
    sample = make_sample(photo, person, crop_box, 0.5, "fdh")

    new_e, new_s = _dp2_crop(instances.pred_densepose.embedding[0], argmax, crop_box, e_box,
                             (CROP_HEIGHT, CROP_WIDTH))
    theirs_vertices = _dp2_vertices(new_e, new_s, table)
    theirs_mask = new_s.numpy()
    assert theirs_mask.sum() > 1000  # the person is there: the comparison means something
    assert sample.e_mask.dtype == bool and sample.vertices.dtype == np.int16
    mask_agreement = (sample.e_mask == theirs_mask).mean()
    both = sample.e_mask & theirs_mask
    vertex_agreement = (sample.vertices[both] == theirs_vertices[both]).mean()
    assert mask_agreement >= 0.99, mask_agreement
    assert vertex_agreement >= 0.99, vertex_agreement
    assert not sample.vertices[~sample.e_mask].any()


def test_cse_outside_the_crop_is_cut_off_not_an_error():
    from transforms.cse_vertices import CseEmbedding, cse_to_crop

    table = np.eye(16, dtype=np.float32)
    cse = CseEmbedding(segm=np.ones((SIDE, SIDE), bool), embedding=np.zeros((16, SIDE, SIDE), np.float32),
                       box=np.array([50, 50, 150, 150]), embed_map=table)
    e_mask, vertices = cse_to_crop(cse, (100, 0, 200, 180), (CROP_HEIGHT, CROP_WIDTH))
    # the box starts at crop x = round(-50 / 100 * 160) = -80: its right half lands in [0, 80)
    assert e_mask[:, :80].any() and not e_mask[:, 80:].any()
    assert vertices.shape == (CROP_HEIGHT, CROP_WIDTH)
    e_mask, _ = cse_to_crop(cse, (300, 300, 400, 480), (CROP_HEIGHT, CROP_WIDTH))
    assert not e_mask.any()
