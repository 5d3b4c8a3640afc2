"""Stage 5, Annotate: find people on every decoded photo with the models FDH was built with.

`Annotate(annotator="fdh")` runs, as Beam `RunInference` steps (one model copy per worker,
batched, variable image sizes):

    keypoint R-CNN ──cascade──► Mask R-CNN (person masks) ──► DensePose CSE (unless no_embeddings)
                       └──► photos with no person tall enough skip the two heavy models
                            (counter fdh/annotate.cascade_skipped) and carry empty detections.

Local runs (`one_step=True`) run the same cascade as ONE DoFn (`cascade.CascadeFn`): the
in-process runner materialises a multi-input Flatten, which would hold every AnnotatedPhoto.

`Annotate(annotator="lite")` runs mediapipe BlazePose on the CPU (<= 1 person per photo), offline.

Output: StageOutput(main=PCollection[AnnotatedPhoto], rejects=PCollection[Rejected]). A photo a
model fails on becomes Rejected(stage='annotate', reason='model_error'), any other unexpected
error on one photo 'annotate.error' (transforms.stage); the job never crashes for one image.
The GPU workers' resource hint sits on the composite around this stage (transforms.gpu_stage),
not here. Configuration errors (GPU asked for but absent, detectron2 missing, weights missing) raise
at pipeline construction, before any worker starts.
"""
from __future__ import annotations

import logging
from typing import Optional

import apache_beam as beam

from transforms.records import REJECTS_TAG
from transforms.s5_annotate.cascade import (DEFAULT_PERSON_SCORE, MIN_BOX_AREA, CascadeFn,
                                            FdhSettings, expand_fdh)
from transforms.s5_annotate.cse import require_detectron2
from transforms.s5_annotate.detectron2_models import DETECTORS
from transforms.s5_annotate.handlers import check_device, check_weights_present
from transforms.s5_annotate.lite import LiteAnnotateFn, thresholds_from_dict
from transforms.stage import StageOutput, stage_output

ANNOTATORS = ("fdh", "lite")
DEVICES = ("CPU", "GPU")


class Annotate(beam.PTransform):
    """DecodedImage -> StageOutput(main=AnnotatedPhoto, rejects=Rejected).

    Args:
      annotator: 'fdh' (torchvision keypoint + mask R-CNN, DensePose CSE) or 'lite' (mediapipe).
      model_dir: local dir or gs:// prefix holding the weights (`python -m beam_jobs.assets
        fetch --model_dir=DIR`); None: the local cache (~/.cache/fdh-beam/models or $FDH_BEAM_CACHE).
      device: 'CPU' or 'GPU'. GPU fails loudly when CUDA is missing (never falls back to CPU).
      max_batch_size: images per model call.
      no_embeddings: skip DensePose CSE (no detectron2 needed; FDH's no-embeddings variant).
      detector: 'torchvision' (default; NOT FDH-faithful: other models, keypoint scores are
        heatmap logits) or 'detectron2' (DP2's X101 Mask R-CNN and KeypointMaskRCNN, needs
        detectron2: transforms.s5_annotate.detectron2_models).
      min_box_area / person_score: cascade gate: the heavy models only run on photos with a
        keypoint-R-CNN person scoring >= person_score (DP2's 0.3) whose box grown by 10 % and
        expanded to 1.8 has >= min_box_area (DP2's 32*32) pixels.
      random_weights: build every model (torchvision and DensePose CSE) with random weights and
        no weight files (tests and benches ONLY: proves the plumbing, never the detections).
      model_options: extra options for the model handlers: min_size, max_size, score_threshold,
        box_detections_per_img, mask_threshold; "mask_model" (maskrcnn_resnet50_fpn[_v2]);
        "densepose_config_dir"; "densepose_overrides" (detectron2 merge_from_list pairs).
      lite_thresholds: overrides of `lite.LiteThresholds` fields.
      large_model / model_copies: how RunInference shares a model between a worker's processes;
        default: one shared copy on GPU, one per process on CPU.
      require_detectron2_here: check at construction that detectron2 + DensePose import here.
        Set False only when launching a remote job from a machine without detectron2 whose
        worker container (docker/) has it.
      check_here: check at construction that the device and the weights are present here (the
        job passes whether it runs in this process: `beam_jobs.common.is_local(options)`).
      one_step: run the fdh cascade as one DoFn (`cascade.CascadeFn`) instead of a RunInference
        step per model joined by a Flatten. For the in-process runner only (the job passes
        `is_local(options)`): it materialises every multi-input Flatten, i.e. holds all the
        AnnotatedPhotos until the stage ends; on Dataflow the RunInference cascade is kept.
    """

    def __init__(self, annotator: str = "fdh", model_dir: Optional[str] = None, device: str = "CPU",
                 max_batch_size: int = 4, no_embeddings: bool = False,
                 min_box_area: int = MIN_BOX_AREA,
                 person_score: float = DEFAULT_PERSON_SCORE,
                 random_weights: bool = False, model_options: Optional[dict] = None,
                 lite_thresholds: Optional[dict] = None, large_model: Optional[bool] = None,
                 model_copies: Optional[int] = None, require_detectron2_here: bool = True,
                 check_here: bool = True, detector: str = "torchvision", one_step: bool = False):
        super().__init__()
        if detector not in DETECTORS:
            raise ValueError(f"--detector must be one of {DETECTORS}, got {detector!r}")
        self._detector = detector
        if annotator not in ANNOTATORS:
            raise ValueError(f"--annotator must be one of {ANNOTATORS}, got {annotator!r}")
        device = device.upper()
        if device not in DEVICES:
            raise ValueError(f"--device must be one of {DEVICES}, got {device!r}")
        if device == "GPU" and annotator == "lite":
            raise ValueError("--device=GPU does nothing with --annotator=lite (MediaPipe runs "
                             "on the CPU): drop --device, or use --annotator=fdh for the GPU")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._annotator = annotator
        self._model_dir = model_dir
        self._device = device
        self._max_batch_size = max_batch_size
        self._no_embeddings = no_embeddings
        self._min_box_area = min_box_area
        self._person_score = person_score
        self._random_weights = random_weights
        self._model_options = dict(model_options or {})
        self._lite_thresholds = thresholds_from_dict(lite_thresholds)
        self._large_model = (device == "GPU") if large_model is None else large_model
        self._model_copies = model_copies
        self._check_here = check_here
        self._one_step = one_step
        needs_detectron2 = not no_embeddings or detector == "detectron2"
        if annotator == "fdh" and needs_detectron2 and require_detectron2_here:
            require_detectron2()

    def single_dofn(self) -> Optional[beam.DoFn]:
        """The one DoFn this stage is (photo -> AnnotatedPhoto / tagged rejects), for callers that
        run it inside a step of their own (the annotation store); None when it is a composite
        (the fdh cascade unless `one_step`). A caller must pass on what its finish_bundle
        yields (the fdh one batches up to max_batch_size photos per bundle)."""
        if self._annotator == "lite":
            return LiteAnnotateFn(self._lite_thresholds)
        if not self._one_step:
            return None
        self._check_configuration_here()
        return CascadeFn(self._fdh_settings())

    def expand(self, photos: beam.PCollection) -> StageOutput:
        if self._annotator == "lite":
            if self._device == "GPU":
                logging.warning("the lite annotator (mediapipe) runs on the CPU; --device=GPU ignored")
            return stage_output(photos | "LiteAnnotate" >> beam.ParDo(
                self.single_dofn()).with_outputs(REJECTS_TAG, main="main"))
        if photos.pipeline.options is not None:
            self._check_configuration_here()
        if self._one_step:
            return stage_output(photos | "FdhCascade" >> beam.ParDo(
                CascadeFn(self._fdh_settings())).with_outputs(REJECTS_TAG, main="main"))
        return expand_fdh(photos, self._fdh_settings())

    def _fdh_settings(self) -> FdhSettings:
        return FdhSettings(
            model_dir=self._model_dir, device=self._device, max_batch_size=self._max_batch_size,
            no_embeddings=self._no_embeddings, min_box_area=self._min_box_area,
            person_score=self._person_score,
            random_weights=self._random_weights, model_options=self._model_options,
            large_model=self._large_model, model_copies=self._model_copies, detector=self._detector)

    def _check_configuration_here(self) -> None:
        """Fail at construction, not on a worker: GPU missing, weights missing (local runs)."""
        if not self._check_here:
            return
        check_device(self._device)
        if not self._random_weights:
            check_weights_present(self._fdh_settings().asset_names(), self._model_dir)
