"""The FDH annotator as a cascade of RunInference steps, cheapest gate first.

    photo ─► keypoint R-CNN ─► nobody DP2 could keep? ─yes─► AnnotatedPhoto with empty mask/CSE dets
                                     │ no                    (counter fdh/annotate.cascade_skipped)
                                     ▼
                               Mask R-CNN (person) ─► no mask? ─yes─► empty CSE dets
                                     │ no                (fdh/annotate.cascade_skipped_cse)
                                     ▼
                               DensePose CSE (unless no_embeddings) ─► AnnotatedPhoto

Why skipping is safe: the FDH rules keep a person only when >= 4 of its keypoints match the CSE,
and keypoints come only from keypoint R-CNN, so a photo without a keypoint R-CNN person can
never yield a sample; likewise a person needs a Mask R-CNN mask to pair with its CSE detection.
The gate is DP2's own: a keypoint person counts when it scores >= `person_score` (0.3, DP2's
detection threshold) and its box, grown by 10 % and expanded to the 1.8 aspect (the background
step only grows it), has >= `min_box_area` (32*32) pixels, as DP2's crop-box filter. E.g. a
25 px tall, 60 px wide person (crop box 63 x 113 = 7,119 px^2) is annotated, as DP2 keeps it.

The photo being annotated rides through RunInference as the KEY of a KeyedModelHandler; the
model sees only its RGB array. A model failing on one image yields a `ModelError` for it, which
becomes Rejected(stage='annotate', reason='model_error').

`CascadeFn` is the same cascade as one DoFn (same steps, rejects and counters) for the in-process
runner, which materialises expand_fdh's final multi-input Flatten (every AnnotatedPhoto held).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.transforms.window import GlobalWindows

from transforms.crop_geometry import MIN_BOX_AREA, grown_aspect_box, is_too_small
from transforms.records import METRICS_NAMESPACE, REJECTS_TAG, AnnotatedPhoto, DecodedImage, Detections
from transforms.rejects import reject
from transforms.stage import StageDoFn, StageOutput, error_rejects_for_batch
from transforms.s5_annotate import detectron2_models as d2
from transforms.s5_annotate.cse import CSE_MODEL_ASSET, PHI_ASSET, DensePoseCseHandler
from transforms.s5_annotate.handlers import (DEFAULT_MASK_MODEL, KEYPOINT_MODEL, MODELS, ModelError,
                                             TorchvisionDetectionHandler)

DEFAULT_PERSON_SCORE = 0.3  # DP2's detection score threshold (mask R-CNN and CSE)
ANNOTATOR_NAME = "fdh"
STAGE = "annotate"
DENSE_TAG = "dense"


def could_be_kept(box: Sequence[float], image_hw: tuple[int, int], min_box_area: int) -> bool:
    """Whether a detection box can give a crop box DP2 keeps: the box grown by 10 % and expanded
    to 1.8 (the background step only grows it further) has at least `min_box_area` pixels."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        return False
    return not is_too_small(grown_aspect_box((x0, y0, x1, y1), image_hw), min_box_area)


def needs_dense_models(keypoint_dets: Detections, person_score: float, image_hw: tuple[int, int],
                       min_box_area: int = MIN_BOX_AREA) -> bool:
    """True when some keypoint R-CNN person scores >= person_score (DP2's 0.3) and its crop box
    after growth and aspect reaches `min_box_area` (DP2's 32*32): only then can a person survive."""
    if len(keypoint_dets) == 0:
        return False
    return any(float(score) >= person_score and could_be_kept(box, image_hw, min_box_area)
               for box, score in zip(keypoint_dets.boxes, keypoint_dets.scores))


@dataclass(frozen=True)
class FdhSettings:
    """Everything the FDH cascade needs; built by `Annotate` from its arguments."""

    model_dir: Optional[str] = None
    device: str = "CPU"
    max_batch_size: int = 4
    no_embeddings: bool = False
    min_box_area: int = MIN_BOX_AREA
    person_score: float = DEFAULT_PERSON_SCORE
    random_weights: bool = False
    model_options: dict = field(default_factory=dict)  # torchvision handler kwargs; 'mask_model'
    large_model: bool = False
    model_copies: Optional[int] = None
    detector: str = "torchvision"  # or 'detectron2': DP2's own detectors (detectron2_models.py)

    @property
    def mask_model(self) -> str:
        return self.model_options.get("mask_model", DEFAULT_MASK_MODEL)

    def asset_names(self) -> list[str]:
        if self.detector == "detectron2":
            names = [d2.KEYPOINT_MODEL, d2.MASK_MODEL]
        else:
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

    @property
    def annotator_name(self) -> str:
        """'fdh' (torchvision detectors) or 'fdh_detectron2' (its keypoint scores are probabilities)."""
        return "fdh_detectron2" if self.detector == "detectron2" else ANNOTATOR_NAME

    def keypoint_handler(self):
        """The keypoint step: DP2's KeypointMaskRCNN (detectron2) or torchvision's keypoint R-CNN."""
        if self.detector == "detectron2":
            return self.detectron2_handler(d2.KEYPOINT_MODEL)
        return self.torchvision_handler(KEYPOINT_MODEL)

    def mask_handler(self):
        """The mask step: DP2's X101 Mask R-CNN (detectron2) or the torchvision `mask_model`."""
        if self.detector == "detectron2":
            return self.detectron2_handler(d2.MASK_MODEL)
        return self.torchvision_handler(self.mask_model)

    def detectron2_handler(self, model_name: str):
        return d2.Detectron2DetectionHandler(
            model_name, model_dir=self.model_dir, device=self.device, max_batch_size=self.max_batch_size,
            large_model=self.large_model, model_copies=self.model_copies,
            random_weights=self.random_weights)

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

    def __init__(self, annotator: str = ANNOTATOR_NAME):
        self._annotator = annotator

    def process_element(self, photo: DecodedImage) -> Iterator:
        yield AnnotatedPhoto(photo=photo, annotator=self._annotator,
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

    def __init__(self, person_score: float, min_box_area: int, no_embeddings: bool):
        self._person_score = person_score
        self._min_box_area = min_box_area
        self._no_embeddings = no_embeddings
        self._photos = Metrics.counter(METRICS_NAMESPACE, "annotate.photos")
        self._skipped = Metrics.counter(METRICS_NAMESPACE, "annotate.cascade_skipped")

    def attach(self, annotated: AnnotatedPhoto, result: Detections) -> Iterator:
        self._photos.inc()
        annotated = dataclasses.replace(annotated, keypoint_dets=result)
        image = annotated.photo.image
        if needs_dense_models(result, self._person_score, image.shape[:2], self._min_box_area):
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
    started = photos | "StartAnnotation" >> beam.ParDo(StartAnnotationFn(settings.annotator_name)).with_outputs(
        REJECTS_TAG, main="main")
    keypoints = _run_model(started.main, "KeypointRCNN", settings.keypoint_handler())
    after_keypoints = keypoints | "AttachKeypoints" >> beam.ParDo(AttachKeypointsFn(
        settings.person_score, settings.min_box_area, settings.no_embeddings)).with_outputs(
        DENSE_TAG, REJECTS_TAG, main="done")
    masks = _run_model(after_keypoints[DENSE_TAG], "MaskRCNN", settings.mask_handler())
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


@dataclass
class _LoadedModel:
    """A handler and the model it loaded (what RunInference holds per model), with the attach
    step run on each of its results."""

    handler: object
    model: object
    attach: _AttachFn

    def run(self, pending: list[tuple[AnnotatedPhoto, object]]) -> Iterator:
        """Run the model on the pending photos' arrays; yield the attach step's outputs
        (photos routed on keep their DENSE_TAG). A whole-batch failure rejects each photo."""
        try:
            results = list(self.handler.run_inference([image for _, image in pending], self.model))
        except Exception as error:  # the dead-letter policy (transforms.stage): one reject each
            yield from error_rejects_for_batch(STAGE, [annotated for annotated, _ in pending], error)
            return
        for (annotated, _), result in zip(pending, results):
            yield from self.attach.process((annotated, result))


class CascadeFn(StageDoFn):
    """The FDH cascade as ONE step (DecodedImage -> AnnotatedPhoto / tagged rejects), for local
    runs: the in-process runner materialises expand_fdh's multi-input Flatten, holding every
    AnnotatedPhoto (megabytes each) until the whole stage ends; this step holds one batch.

    Photos are buffered up to `batch_size` per bundle (the rest at the end of the bundle); each
    batch runs keypoint R-CNN, then Mask R-CNN on the photos that need it, then CSE, with the
    cascade's own steps (StartAnnotationFn, Attach*Fn): same outputs, rejects and counters.
    `batch_size=1` emits every photo's outputs while processing it (nothing in finish_bundle),
    as the annotation store's one-step lookup needs (it stores what process() yields).
    """

    stage = STAGE

    def __init__(self, settings: FdhSettings, batch_size: Optional[int] = None):
        self._settings = settings
        self._batch_size = batch_size or settings.max_batch_size
        self._start = StartAnnotationFn(settings.annotator_name)
        self._steps: list[_LoadedModel] = []

    def setup(self) -> None:
        settings = self._settings
        handlers = [(settings.keypoint_handler(), AttachKeypointsFn(
                        settings.person_score, settings.min_box_area, settings.no_embeddings)),
                    (settings.mask_handler(), AttachMasksFn(settings.no_embeddings))]
        if not settings.no_embeddings:
            handlers.append((settings.cse_handler(), AttachCseFn()))
        self._steps = [_LoadedModel(handler, handler.load_model(), attach) for handler, attach in handlers]

    def start_bundle(self) -> None:
        self._buffer: list[DecodedImage] = []

    def process_element(self, photo: DecodedImage) -> Iterator:
        self._buffer.append(photo)
        if len(self._buffer) >= self._batch_size:
            yield from self._flush()

    def finish_bundle(self) -> Iterator:
        """The last partial batch's outputs, windowed (finish_bundle has no element window)."""
        for output in self._flush():
            tag = getattr(output, "tag", None)
            if tag is None:
                yield GlobalWindows.windowed_value(output)
            else:
                yield beam.pvalue.TaggedOutput(tag, GlobalWindows.windowed_value(output.value))

    def _flush(self) -> Iterator:
        """The outputs of the buffered photos through the whole cascade; empties the buffer."""
        photos, self._buffer = self._buffer, []
        pending = []
        for photo in photos:
            for output in self._start.process(photo):
                if getattr(output, "tag", None) == REJECTS_TAG:
                    yield output
                else:
                    pending.append(output)
        for step in self._steps:
            batch, pending = pending, []
            if not batch:
                return
            for output in step.run(batch):
                if getattr(output, "tag", None) == DENSE_TAG:
                    pending.append(output.value)
                else:
                    yield output
