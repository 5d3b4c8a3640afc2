"""The FDH annotator as a cascade of RunInference steps, cheapest gate first.

    photo ─► keypoint R-CNN ─► nobody tall enough? ──yes──► AnnotatedPhoto with empty mask/CSE dets
                                     │ no                    (counter fdh/annotate.cascade_skipped)
                                     ▼
                               Mask R-CNN (person) ─► no mask? ─yes─► empty CSE dets
                                     │ no                (fdh/annotate.cascade_skipped_cse)
                                     ▼
                               DensePose CSE (unless no_embeddings) ─► AnnotatedPhoto

Why skipping is safe: the FDH rules keep a person only when >= 4 of its keypoints match the CSE,
and keypoints come only from keypoint R-CNN, so a photo without a keypoint R-CNN person can
never yield a sample; likewise a person needs a Mask R-CNN mask to pair with its CSE detection.
`min_person_height` (default 32 px, the side of FDH's 32x32 minimum crop area) and
`person_score` only drop photos no later rule would keep, as long as they stay at or below the
select stage's own thresholds.

The photo being annotated rides through RunInference as the KEY of a KeyedModelHandler; the
model sees only its RGB array. A model failing on one image yields a `ModelError` for it, which
becomes Rejected(stage='annotate', reason='model_error').
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from transforms.records import METRICS_NAMESPACE, REJECTS_TAG, AnnotatedPhoto, DecodedImage, Detections
from transforms.rejects import reject
from transforms.stage import StageDoFn, StageOutput
from transforms.s5_annotate.cse import CSE_MODEL_ASSET, PHI_ASSET, DensePoseCseHandler
from transforms.s5_annotate.handlers import (DEFAULT_MASK_MODEL, KEYPOINT_MODEL, MODELS, ModelError,
                                             TorchvisionDetectionHandler)

DEFAULT_MIN_PERSON_HEIGHT = 32
DEFAULT_PERSON_SCORE = 0.5
ANNOTATOR_NAME = "fdh"
STAGE = "annotate"
DENSE_TAG = "dense"


def needs_dense_models(keypoint_dets: Detections, person_score: float, min_person_height: float) -> bool:
    """True when some keypoint R-CNN person scores >= person_score and is >= min_person_height tall."""
    if len(keypoint_dets) == 0:
        return False
    heights = keypoint_dets.boxes[:, 3] - keypoint_dets.boxes[:, 1]
    return bool(((keypoint_dets.scores >= person_score) & (heights >= min_person_height)).any())


@dataclass(frozen=True)
class FdhSettings:
    """Everything the FDH cascade needs; built by `Annotate` from its arguments."""

    model_dir: Optional[str] = None
    device: str = "CPU"
    max_batch_size: int = 4
    no_embeddings: bool = False
    min_person_height: float = DEFAULT_MIN_PERSON_HEIGHT
    person_score: float = DEFAULT_PERSON_SCORE
    random_weights: bool = False
    model_options: dict = field(default_factory=dict)  # torchvision handler kwargs; 'mask_model'
    large_model: bool = False
    model_copies: Optional[int] = None

    @property
    def mask_model(self) -> str:
        return self.model_options.get("mask_model", DEFAULT_MASK_MODEL)

    def asset_names(self) -> list[str]:
        names = [MODELS[KEYPOINT_MODEL][0], MODELS[self.mask_model][0]]
        if not self.no_embeddings:
            names += [CSE_MODEL_ASSET, PHI_ASSET]
        return names

    def torchvision_handler(self, model_name: str):
        options = {k: v for k, v in self.model_options.items()
                   if k not in ("mask_model", "densepose_config_dir", "densepose_overrides")}
        return TorchvisionDetectionHandler(
            model_name, model_dir=self.model_dir, device=self.device,
            random_weights=self.random_weights, max_batch_size=self.max_batch_size,
            large_model=self.large_model, model_copies=self.model_copies, **options)

    def cse_handler(self):
        return DensePoseCseHandler(
            model_dir=self.model_dir, device=self.device, max_batch_size=self.max_batch_size,
            large_model=self.large_model, model_copies=self.model_copies,
            config_dir=self.model_options.get("densepose_config_dir"),
            random_weights=self.random_weights,
            config_overrides=tuple(self.model_options.get("densepose_overrides", ())))


def _reject_model_error(photo: DecodedImage, error) -> beam.pvalue.TaggedOutput:
    return reject(STAGE, "model_error", str(photo.record.photo_id), error.detail,
                  photo.record.photo_id, photo.record.user_nsid)


class StartAnnotationFn(StageDoFn):
    """DecodedImage -> (AnnotatedPhoto being built, its RGB array) for a keyed RunInference."""

    stage = STAGE

    def process_element(self, photo: DecodedImage) -> Iterator:
        yield AnnotatedPhoto(photo=photo, annotator=ANNOTATOR_NAME,
                             keypoint_dets=Detections.empty()), photo.image


class _AttachFn(StageDoFn):
    """Base of the steps after each RunInference: a model error becomes a reject, a result is
    handed to `attach(annotated, result)`, which yields the photo on (DENSE_TAG) or finished."""

    stage = STAGE

    def process_element(self, element) -> Iterator:
        annotated, result = element
        if isinstance(result, ModelError):
            yield _reject_model_error(annotated.photo, result)
            return
        yield from self.attach(annotated, result)

    def attach(self, annotated: AnnotatedPhoto, result: Detections) -> Iterator:
        raise NotImplementedError


class AttachKeypointsFn(_AttachFn):
    """Attach keypoint R-CNN detections; route the photo on (DENSE_TAG) or finish it (cascade)."""

    def __init__(self, person_score: float, min_person_height: float, no_embeddings: bool):
        self._person_score = person_score
        self._min_person_height = min_person_height
        self._no_embeddings = no_embeddings
        self._photos = Metrics.counter(METRICS_NAMESPACE, "annotate.photos")
        self._skipped = Metrics.counter(METRICS_NAMESPACE, "annotate.cascade_skipped")

    def attach(self, annotated: AnnotatedPhoto, result: Detections) -> Iterator:
        self._photos.inc()
        annotated = dataclasses.replace(annotated, keypoint_dets=result)
        image = annotated.photo.image
        if needs_dense_models(result, self._person_score, self._min_person_height):
            yield beam.pvalue.TaggedOutput(DENSE_TAG, (annotated, image))
            return
        self._skipped.inc()
        height, width = image.shape[:2]
        yield dataclasses.replace(
            annotated, mask_dets=Detections.empty_for_image(height, width),
            cse_dets=None if self._no_embeddings else Detections.empty_for_image(height, width, vertices=True))


class AttachMasksFn(_AttachFn):
    """Attach Mask R-CNN detections; photos with a mask go on to CSE (DENSE_TAG) unless disabled."""

    def __init__(self, no_embeddings: bool):
        self._no_embeddings = no_embeddings
        self._skipped = Metrics.counter(METRICS_NAMESPACE, "annotate.cascade_skipped_cse")

    def attach(self, annotated: AnnotatedPhoto, result: Detections) -> Iterator:
        annotated = dataclasses.replace(annotated, mask_dets=result)
        image = annotated.photo.image
        if self._no_embeddings:
            yield annotated
        elif len(result) == 0:
            self._skipped.inc()
            height, width = image.shape[:2]
            yield dataclasses.replace(annotated, cse_dets=Detections.empty_for_image(height, width, vertices=True))
        else:
            yield beam.pvalue.TaggedOutput(DENSE_TAG, (annotated, image))


class AttachCseFn(_AttachFn):
    """Attach DensePose CSE detections: the photo is fully annotated."""

    def attach(self, annotated: AnnotatedPhoto, result: Detections) -> Iterator:
        yield dataclasses.replace(annotated, cse_dets=result)


def _run_model(pcoll, label: str, handler):
    return pcoll | label >> RunInference(KeyedModelHandler(handler))


def expand_fdh(photos: beam.PCollection, settings: FdhSettings) -> StageOutput:
    """Compose the cascade on a PCollection[DecodedImage]."""
    started = photos | "StartAnnotation" >> beam.ParDo(StartAnnotationFn()).with_outputs(
        REJECTS_TAG, main="main")
    keypoints = _run_model(started.main, "KeypointRCNN", settings.torchvision_handler(KEYPOINT_MODEL))
    after_keypoints = keypoints | "AttachKeypoints" >> beam.ParDo(AttachKeypointsFn(
        settings.person_score, settings.min_person_height, settings.no_embeddings)).with_outputs(
        DENSE_TAG, REJECTS_TAG, main="done")
    masks = _run_model(after_keypoints[DENSE_TAG], "MaskRCNN",
                       settings.torchvision_handler(settings.mask_model))
    after_masks = masks | "AttachMasks" >> beam.ParDo(AttachMasksFn(settings.no_embeddings)).with_outputs(
        DENSE_TAG, REJECTS_TAG, main="done")
    done = [after_keypoints.done, after_masks.done]
    rejects = [started[REJECTS_TAG], after_keypoints[REJECTS_TAG], after_masks[REJECTS_TAG]]
    if not settings.no_embeddings:
        cse = _run_model(after_masks[DENSE_TAG], "DensePoseCSE", settings.cse_handler())
        after_cse = cse | "AttachCse" >> beam.ParDo(AttachCseFn()).with_outputs(REJECTS_TAG, main="done")
        done.append(after_cse.done)
        rejects.append(after_cse[REJECTS_TAG])
    return StageOutput(main=done | "FlattenAnnotated" >> beam.Flatten(),
                       rejects=rejects | "FlattenRejects" >> beam.Flatten())
