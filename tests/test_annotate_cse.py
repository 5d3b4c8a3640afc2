"""DensePose CSE post-processing at the adapter boundary, with a detectron2-SHAPED fake, and
(only where detectron2 + DensePose are installed, e.g. the docker/ worker image) with the REAL
config and model on random weights (see the end of this file).

detectron2 is not on PyPI, so CI runs the fake: it has the structure of DensePose's predictor output
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


@pytest.mark.parametrize("protocol", [2, 4, 5])  # Caffe2-era pickles; detectron2's default; numpy buffers
def test_detectron2_pkl_checkpoints_load_through_the_numpy_only_unpickler(tmp_path, protocol):
    import pickle

    from transforms import assets
    from transforms.s5_annotate.cse import checkpoint_from_pickle

    weights = {"backbone.res2.0.conv1.weight": np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1),
               "roi_heads.embedder.embedder_smpl_27554.embeddings": np.ones((4, 2), np.float32)}
    zoo, caffe2 = tmp_path / "zoo.pkl", tmp_path / "caffe2.pkl"
    zoo.write_bytes(pickle.dumps({"model": weights, "__author__": "Detectron2 Model Zoo"}, protocol))
    caffe2.write_bytes(pickle.dumps({"blobs": {"conv1_w": weights["backbone.res2.0.conv1.weight"],
                                               "conv1_w_momentum": np.zeros(1)}}, protocol))
    checkpoint = checkpoint_from_pickle(assets.safe_unpickle(str(zoo)))
    assert "matching_heuristics" not in checkpoint  # exact names, as detectron2 loads zoo files
    for name, array in weights.items():
        np.testing.assert_array_equal(checkpoint["model"][name], array)
    checkpoint = checkpoint_from_pickle(assets.safe_unpickle(str(caffe2)))
    assert checkpoint["matching_heuristics"] and checkpoint["__author__"] == "Caffe2"
    assert list(checkpoint["model"]) == ["conv1_w"]  # momentum blobs dropped, like detectron2


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


@pytest.mark.pipeline
@pytest.mark.slow
def test_full_cascade_with_fake_cse_in_a_pipeline():
    settings = FakeCseSettings(
        random_weights=True, max_batch_size=2, person_score=0.0, min_box_area=0,
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

    assert_that(outputs.main | beam.Map(summary), equal_to([(1, 1, True, True), (2, 1, True, True)]),
                label="main")
    assert_that(outputs.rejects | beam.Map(lambda r: (r.record_id, r.reason, "out of memory" in r.detail)),
                equal_to([("3", "model_error", True)]), label="rejects")
    result = pipeline.run()
    result.wait_until_finish()
    assert read_counters(result)["annotate.model_error"] == 1


# --- REAL detectron2 + DensePose, random weights (skipped where they are not installed: CI) -------
# The worker image (docker/) has both. These prove that the real config builds, that a detectron2
# model-zoo .pkl loads through the numpy-only unpickler, and that our post-processing turns the real
# predictor's outputs into well-formed Detections. Random weights: plumbing only, never quality.

SMALL_CSE = ("INPUT.MIN_SIZE_TEST", 256, "INPUT.MAX_SIZE_TEST", 384, "TEST.DETECTIONS_PER_IMAGE", 4)
NUM_VERTICES = 27554


def _densepose_config_dir() -> str:
    pytest.importorskip("detectron2")
    pytest.importorskip("densepose")
    from transforms.s5_annotate.cse import find_config_dir

    try:
        return find_config_dir()
    except FileNotFoundError as error:
        pytest.skip(str(error))


def _astronaut() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[::2, ::2])  # a real photo, 256x256 RGB


def _write_model_dir(tmp_path, config_dir):
    """A model_dir with a random-weight CSE checkpoint in detectron2's model-zoo .pkl layout
    ({"model": {name: ndarray}, "__author__": ...}) and a random phi {"features": [27554, 256]}."""
    import pickle

    from detectron2.modeling import build_model

    from transforms import assets
    from transforms.s5_annotate.cse import CSE_MODEL_ASSET, PHI_ASSET, build_cse_config, randomize_for_plumbing

    torch.manual_seed(0)
    model = build_model(build_cse_config(config_dir, overrides=SMALL_CSE))
    randomize_for_plumbing(model)  # random weights that still give detections
    state = {name: tensor.detach().numpy().copy() for name, tensor in model.state_dict().items()}
    features = "roi_heads.embedder.embedder_smpl_27554.features"
    state[features] = np.zeros_like(state[features])  # to be filled from the phi file
    phi = np.random.default_rng(2).standard_normal((NUM_VERTICES, 256)).astype(np.float32)
    for name, payload in ((CSE_MODEL_ASSET, {"model": state, "__author__": "fdh-beam test"}),
                          (PHI_ASSET, {"features": phi})):
        with open(tmp_path / assets.get_asset(name).filename, "wb") as handle:
            pickle.dump(payload, handle)  # default protocol, as detectron2's own tools write them
    return state, phi


def _check_cse_detections(dets, height, width):
    assert dets.masks.dtype == bool and dets.masks.shape == (len(dets), height, width)
    assert dets.vertices.dtype == np.int16 and dets.vertices.shape == (len(dets), height, width)
    assert dets.boxes.dtype == np.float32 and dets.boxes.shape == (len(dets), 4)
    assert (dets.boxes[:, 0] < dets.boxes[:, 2]).all() and (dets.boxes[:, 1] < dets.boxes[:, 3]).all()
    assert (dets.boxes >= 0).all() and (dets.boxes[:, 0::2] <= width).all() and (dets.boxes[:, 1::2] <= height).all()
    assert ((dets.scores >= 0.3) & (dets.scores <= 1)).all()
    assert (dets.vertices >= 0).all() and (dets.vertices < NUM_VERTICES).all()
    assert not dets.vertices[~dets.masks].any()  # vertex 0 outside the CSE mask
    for i, (x0, y0, x1, y1) in enumerate(dets.boxes.astype(int)):
        outside = np.ones((height, width), bool)
        outside[y0:y1, x0:x1] = False
        assert not dets.masks[i][outside].any()  # the mask stays in its box


@pytest.mark.slow
def test_real_densepose_checkpoint_pkl_and_predictor_on_a_photo(tmp_path):
    config_dir = _densepose_config_dir()  # skips without detectron2 + DensePose
    from densepose.modeling.cse.utils import get_closest_vertices_mask_from_ES

    from transforms.s5_annotate.cse import load_cse_predictor

    state, phi = _write_model_dir(tmp_path, config_dir)
    predictor = load_cse_predictor(str(tmp_path), "CPU", config_dir, config_overrides=SMALL_CSE)
    # every tensor of the .pkl landed in the model (restricted unpickler + detectron2's checkpointer)
    loaded = predictor.model.state_dict()
    assert set(state) <= set(loaded)
    features = "roi_heads.embedder.embedder_smpl_27554.features"  # a buffer: in the checkpoint too
    state[features] = phi  # ... but phi_smpl_27554_256 is what fills it
    for name, array in state.items():
        np.testing.assert_array_equal(loaded[name].numpy(), array, err_msg=name)
    embeddings = state["roi_heads.embedder.embedder_smpl_27554.embeddings"]
    expected_map = torch.nn.functional.normalize(torch.from_numpy(phi @ embeddings), dim=1)
    assert predictor.embed_map.shape == (NUM_VERTICES, 16)
    torch.testing.assert_close(predictor.embed_map, expected_map, rtol=1e-4, atol=1e-5)

    image = _astronaut()
    dets = predictor.detect([image])[0]
    assert len(dets) > 0  # random heads score ~0.5 > 0.3: there is something to check
    _check_cse_detections(dets, *image.shape[:2])
    # the same boxes through DensePose's own box-frame -> vertices code give the same answer
    inputs = [{"image": torch.from_numpy(image[:, :, ::-1].copy()).permute(2, 0, 1), "height": 256,
               "width": 256}]
    with torch.inference_mode():
        instances = predictor.model(inputs)[0]["instances"]
    assert instances.pred_densepose.embedding.shape[1:] == (16, 112, 112)
    assert instances.pred_densepose.coarse_segm.shape[1:] == (2, 112, 112)
    ours = cse_instances_to_detections(instances, (256, 256), predictor.embed_map)
    x0, y0, x1, y1 = ours.boxes[0].astype(int)
    theirs_vertices, theirs_mask = get_closest_vertices_mask_from_ES(
        instances.pred_densepose.embedding[[0]], instances.pred_densepose.coarse_segm[[0]],
        int(y1 - y0), int(x1 - x0), predictor.embed_map, torch.device("cpu"))
    # our mask is DP2's nearest resize of the argmax (not DensePose's bilinear-logit argmax); the
    # vertex ids agree wherever both masks hold
    nearest = instances.pred_densepose.coarse_segm[0].argmax(dim=0)[None, None].float()
    nearest = torch.nn.functional.interpolate(nearest, size=(int(y1 - y0), int(x1 - x0)), mode="nearest")
    np.testing.assert_array_equal(ours.masks[0, y0:y1, x0:x1], nearest[0, 0].numpy() > 0)
    both = ours.masks[0, y0:y1, x0:x1] & theirs_mask.numpy()
    np.testing.assert_array_equal(ours.vertices[0, y0:y1, x0:x1][both], theirs_vertices.numpy()[both])


@dataclasses.dataclass(frozen=True)
class RealCseSettings(FdhSettings):
    """The real FdhSettings.cse_handler (DensePose, random weights); person-biased torchvision."""

    def torchvision_handler(self, model_name):
        options = {k: v for k, v in self.model_options.items() if not k.startswith(("mask_model", "densepose"))}
        return PersonBiasedHandler(model_name, random_weights=True, max_batch_size=self.max_batch_size,
                                   **options)


@pytest.mark.pipeline
@pytest.mark.slow
def test_real_densepose_random_weights_through_the_cascade_pipeline():
    from transforms.s5_annotate import Annotate

    config_dir = _densepose_config_dir()
    model_options = dict(min_size=128, max_size=128, box_detections_per_img=2, score_threshold=0.0,
                         mask_model="maskrcnn_resnet50_fpn", densepose_config_dir=config_dir,
                         densepose_overrides=SMALL_CSE)
    # Annotate accepts CSE with random weights (no weight files asked for) ...
    Annotate("fdh", random_weights=True, model_options=model_options)
    # ... and the cascade runs the real DensePose handler it builds.
    settings = RealCseSettings(random_weights=True, max_batch_size=2, person_score=0.0,
                               min_box_area=0, model_options=model_options)
    image = _astronaut()
    photo = DecodedImage(record=make_record(5), image=image,
                         sha256=hashlib.sha256(image.tobytes()).hexdigest(), original_size=(256, 256))
    pipeline = make_pipeline(PipelineOptions([]))
    outputs = expand_fdh(pipeline | beam.Create([photo]), settings)

    def check(annotated):
        _check_cse_detections(annotated.cse_dets, 256, 256)
        return annotated.photo.record.photo_id, len(annotated.cse_dets) > 0

    assert_that(outputs.main | beam.Map(check), equal_to([(5, True)]), label="main")
    assert_that(outputs.rejects, equal_to([]), label="rejects")
    pipeline.run().wait_until_finish()
