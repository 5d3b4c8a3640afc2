"""The FDH annotator's plumbing: torchvision handlers in real RunInference pipelines, the cascade,
weights loading and the configuration errors.

All torchvision models here have RANDOM weights at tiny input sizes: these tests prove the
plumbing (shapes, dtypes, batching of variable sizes, routing, rejects, counters), never that
the detections are right.
"""
from __future__ import annotations

import dataclasses
import hashlib

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.common import make_pipeline, read_counters
from tests.factories import make_record
from transforms import assets
from transforms.records import REJECTS_TAG, AnnotatedPhoto, DecodedImage, Detections
from transforms.s5_annotate import Annotate
from transforms.s5_annotate import cascade
from transforms.s5_annotate.cascade import DENSE_TAG, AttachKeypointsFn, needs_dense_models
from transforms.s5_annotate.cse import Detectron2MissingError
from beam_jobs.cli import run_main
from transforms.s5_annotate.handlers import (DeviceUnavailableError, ModelError,
                                             TorchvisionDetectionHandler, check_device,
                                             to_detections)

TINY = dict(min_size=96, max_size=128, box_detections_per_img=3, score_threshold=0.0)
HAS_CUDA = torch.cuda.is_available()


def _photo(photo_id: int, height: int, width: int, seed: int = 0) -> DecodedImage:
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return DecodedImage(record=make_record(photo_id), image=image,
                        sha256=hashlib.sha256(image.tobytes()).hexdigest(), original_size=(width, height))


@pytest.fixture(scope="module")
def keypoint_handler():
    torch.manual_seed(0)
    handler = TorchvisionDetectionHandler("keypointrcnn_resnet50_fpn", random_weights=True, **TINY)
    return handler, handler.load_model()


@pytest.mark.model
def test_handler_batches_variable_sizes_and_isolates_a_bad_image(keypoint_handler):
    handler, model = keypoint_handler
    images = [_photo(1, 60, 90).image, _photo(2, 120, 70).image,
              np.zeros((50, 50), np.uint8),  # not RGB: fails alone, not its batch-mates
              _photo(3, 80, 80).image]
    results = list(handler.run_inference(images, model))
    assert len(results) == 4
    assert isinstance(results[2], ModelError) and "RGB" in results[2].detail
    for image, dets in zip([images[0], images[1], images[3]], [results[0], results[1], results[3]]):
        assert isinstance(dets, Detections)
        assert dets.boxes.dtype == np.float32 and dets.boxes.shape == (len(dets), 4)
        assert dets.keypoints.shape == (len(dets), 17, 3) and dets.keypoints.dtype == np.float32
        if len(dets):  # boxes lie in the image frame of THIS image, not the resized batch
            assert dets.boxes[:, 2].max() <= image.shape[1] + 1e-3
            assert dets.boxes[:, 3].max() <= image.shape[0] + 1e-3
    assert handler.batch_elements_kwargs()["max_batch_size"] == 4


def test_to_detections_keeps_people_and_uses_keypoint_scores():
    output = {
        "boxes": torch.tensor([[0., 0., 10., 20.], [5., 5., 9., 9.]]),
        "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 3]),
        "masks": torch.stack([torch.full((1, 30, 40), 0.7), torch.full((1, 30, 40), 0.2)]),
        "keypoints": torch.ones(2, 17, 3), "keypoints_scores": torch.full((2, 17), 4.5),
    }
    dets = to_detections(output, keep_label=1)
    assert len(dets) == 1 and dets.scores.tolist() == pytest.approx([0.9])
    assert dets.masks.shape == (1, 30, 40) and dets.masks.dtype == bool and dets.masks.all()
    assert (dets.keypoints[0, :, 2] == 4.5).all()


def test_cascade_rule():
    def dets(box, score):
        return Detections(boxes=np.array([box], np.float32), scores=np.array([score], np.float32))
    image_hw = (480, 640)
    assert needs_dense_models(dets([0, 0, 10, 50], 0.9), 0.3, image_hw)
    assert not needs_dense_models(dets([0, 0, 10, 20], 0.9), 0.3, image_hw)  # crop box 11x21: too small
    assert not needs_dense_models(dets([0, 0, 10, 50], 0.29), 0.3, image_hw)  # under DP2's 0.3
    assert needs_dense_models(dets([0, 0, 10, 50], 0.3), 0.3, image_hw)  # DP2 keeps 0.3
    assert not needs_dense_models(dets([5, 5, 5, 50], 0.9), 0.3, image_hw)  # empty box
    assert not needs_dense_models(Detections.empty(), 0.0, image_hw)


def test_cascade_annotates_a_short_wide_person_that_dp2_keeps():
    """Issue 12: a 25 px tall, 60 px wide person. The old gate (>= 32 px tall, score >= 0.5) skipped
    the photo; DP2 keeps the person (crop box 63 x 113 = 7,119 px^2 >= 32*32 after growth and aspect)."""
    from transforms.crop_geometry import box_area, crop_box_for_person, is_too_small

    box = [200, 300, 260, 325]  # x0, y0, x1, y1: 60 wide, 25 tall
    crop_box = crop_box_for_person(box, (480, 640), mask_pixels=60 * 25 // 2)
    assert box_area(crop_box) == 7119 and not is_too_small(crop_box)  # what select will keep
    dets = Detections(boxes=np.array([box], np.float32), scores=np.array([0.35], np.float32))
    assert needs_dense_models(dets, cascade.DEFAULT_PERSON_SCORE, (480, 640))
    photo = _photo(9, 480, 640)
    start = AnnotatedPhoto(photo=photo, annotator="fdh", keypoint_dets=Detections.empty())
    fn = AttachKeypointsFn(person_score=cascade.DEFAULT_PERSON_SCORE, min_box_area=cascade.MIN_BOX_AREA,
                           no_embeddings=False)
    (routed,) = list(fn.process((start, dets)))
    assert routed.tag == DENSE_TAG


def test_attach_keypoints_routes_skips_and_rejects():
    photo = _photo(7, 40, 30)
    start = AnnotatedPhoto(photo=photo, annotator="fdh", keypoint_dets=Detections.empty())
    fn = AttachKeypointsFn(person_score=0.5, min_box_area=32 * 32, no_embeddings=False)
    small = Detections(boxes=np.array([[0, 0, 10, 20]], np.float32), scores=np.array([0.9], np.float32))
    (skipped,) = list(fn.process((start, small)))
    assert skipped.keypoint_dets is small
    assert skipped.mask_dets.masks.shape == (0, 40, 30) and skipped.cse_dets.vertices.shape == (0, 40, 30)
    tall = Detections(boxes=np.array([[0, 0, 25, 39]], np.float32), scores=np.array([0.9], np.float32))
    (routed,) = list(fn.process((start, tall)))
    assert routed.tag == DENSE_TAG and routed.value[0].keypoint_dets is tall
    (rejected,) = list(fn.process((start, ModelError("boom"))))
    assert rejected.tag == REJECTS_TAG and rejected.value.reason == "model_error"
    assert rejected.value.detail == "boom" and rejected.value.photo_id == 7


@pytest.mark.pipeline
@pytest.mark.slow
def test_annotate_fdh_pipeline_random_weights():
    """Keypoint R-CNN -> cascade -> Mask R-CNN through RunInference; a bad image is rejected."""
    photos = [_photo(1, 64, 96, 1), _photo(2, 120, 80, 2), _photo(3, 100, 100, 3)]
    bad = dataclasses.replace(_photo(4, 50, 50), image=np.zeros((50, 50), np.uint8))
    pipeline = make_pipeline(PipelineOptions([]))
    outputs = pipeline | beam.Create(photos + [bad]) | Annotate(
        annotator="fdh", no_embeddings=True, random_weights=True, max_batch_size=2,
        person_score=0.0, min_box_area=0, model_options=dict(TINY, mask_model="maskrcnn_resnet50_fpn"))

    def check(annotated: AnnotatedPhoto):
        height, width = annotated.photo.image.shape[:2]
        kp, masks = annotated.keypoint_dets, annotated.mask_dets
        assert kp.keypoints.shape == (len(kp), 17, 3)
        assert masks.masks.shape == (len(masks), height, width) and masks.masks.dtype == bool
        dense = needs_dense_models(kp, 0.0, (height, width), 0)
        return annotated.photo.record.photo_id, annotated.annotator, annotated.cse_dets, dense

    # Thresholds 0 and a score threshold of 0 make every photo with any detection go dense.
    assert_that(outputs.main | beam.Map(check),
                equal_to([(1, "fdh", None, True), (2, "fdh", None, True), (3, "fdh", None, True)]),
                label="main")
    assert_that(outputs.rejects | beam.Map(lambda r: (r.record_id, r.reason)),
                equal_to([("4", "model_error")]), label="rejects")
    result = pipeline.run()
    result.wait_until_finish()
    counters = read_counters(result)
    assert counters["annotate.photos"] == 3
    assert counters["annotate.model_error"] == 1
    assert counters.get("annotate.cascade_skipped", 0) == 0


@pytest.mark.model
def test_weights_load_verified_with_weights_only(monkeypatch, tmp_path, keypoint_handler):
    handler, model = keypoint_handler
    weights = tmp_path / "keypointrcnn_resnet50_fpn_coco-fc266e95.pth"
    torch.save(model.model.state_dict(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    real = assets.get_asset("keypointrcnn_resnet50_fpn_coco")
    # the file is ours, not torchvision's: pin its real digest in place of the published prefix
    monkeypatch.setattr(assets, "ASSETS", [dataclasses.replace(real, sha256_prefix=None, sha256=digest)])
    loader = TorchvisionDetectionHandler("keypointrcnn_resnet50_fpn", model_dir=str(tmp_path), **TINY)
    loaded = loader.load_model()
    image = [_photo(5, 70, 90).image]
    expected, got = handler.run_inference(image, model)[0], loader.run_inference(image, loaded)[0]
    np.testing.assert_allclose(got.boxes, expected.boxes, rtol=1e-4, atol=1e-3)
    monkeypatch.setattr(assets, "ASSETS", [dataclasses.replace(real, sha256_prefix=None, sha256="0" * 64)])
    with pytest.raises(assets.ChecksumMismatchError):
        loader.load_model()


@pytest.mark.pipeline
def test_missing_weights_fail_at_construction(tmp_path):
    with pytest.raises(assets.AssetMissingError) as error:
        with make_pipeline(PipelineOptions([])) as pipeline:
            _ = pipeline | beam.Create([_photo(1, 40, 40)]) | Annotate(
                annotator="fdh", no_embeddings=True, model_dir=str(tmp_path))
    assert "keypointrcnn_resnet50_fpn_coco-fc266e95.pth" in str(error.value)
    assert "beam_jobs.assets fetch" in str(error.value)


@pytest.mark.pipeline
@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_gpu_without_cuda_fails_loudly():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        check_device("GPU")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        with make_pipeline(PipelineOptions([])) as pipeline:
            _ = pipeline | beam.Create([_photo(1, 40, 40)]) | Annotate(
                annotator="fdh", device="GPU", no_embeddings=True, random_weights=True)
    handler = TorchvisionDetectionHandler("keypointrcnn_resnet50_fpn", device="GPU", random_weights=True)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        handler.load_model()  # what a worker without a GPU does


def test_detectron2_missing_is_a_clear_construction_error():
    try:
        import detectron2  # noqa: F401
        pytest.skip("detectron2 is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError) as error:
        Annotate(annotator="fdh")
    assert isinstance(error.value, Detectron2MissingError)
    assert "--no_embeddings" in str(error.value) and "docker/" in str(error.value)
    Annotate(annotator="fdh", no_embeddings=True)  # fine without detectron2
    Annotate(annotator="fdh", require_detectron2_here=False)  # remote launch: workers have it


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="annotator"):
        Annotate(annotator="yolo")
    with pytest.raises(ValueError, match="device"):
        Annotate(annotator="lite", device="TPU")
    with pytest.raises(ValueError, match="max_batch_size"):
        Annotate(annotator="lite", max_batch_size=0)


@pytest.mark.parametrize("error", [
    DeviceUnavailableError("--device=GPU but CUDA is not available on this machine"),
    Detectron2MissingError("detectron2 / DensePose are not installed"),
])
def test_missing_gpu_or_detectron2_is_a_one_line_user_error(error, capsys):
    """Issue 10, finding 13: `--device=GPU` without CUDA printed a traceback."""
    def launch(argv):
        raise error

    with pytest.raises(SystemExit) as exited:
        run_main(launch, [])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {error}"]
