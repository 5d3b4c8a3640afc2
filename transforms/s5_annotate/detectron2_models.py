"""DP2's own detectors through detectron2 (`--detector=detectron2`, the FDH-faithful choice).

* Mask model: detectron2 model zoo `COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x`,
  COCO class 0 (person) kept, score threshold 0.3 (DP2 models/mask_rcnn.py, FB_cse.py).
* Keypoint model: DP2's `KeypointMaskRCNN` (models/keypoint_maskrcnn.py `rn50_fpn_maskrcnn`): a
  one-class (person) R50-FPN Mask R-CNN with a keypoint head (8 x 512 convs, ROIAlignV2 14x14 on
  p2-p5, 1500/1000 post-NMS proposals), on weights DP2 hosts. Its keypoint scores are detectron2's
  probabilities; a keypoint is visible at >= 0.5 (DP2 compute_oks.py: "Same as used for
  annotating FDH"). Mask and keypoints come from the same detection. Why this model and not the
  COCO-Keypoints zoo: notes/faithfulness.md.
* Inputs as DP2: shortest edge to the config's test size with torchvision bilinear + antialias
  (`cse.detectron2_inputs`).

detectron2 is optional and imported lazily (`cse.require_detectron2`). Weights are .pkl files
read with the numpy-only unpickler (`cse._load_weights`); they are assets with checksums.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from transforms import assets
from transforms.records import Detections
from transforms.s5_annotate.cse import _as_tensor, _load_weights, detectron2_inputs, require_detectron2
from transforms.s5_annotate.handlers import infer_with_fallback, torch_device

MASK_MODEL = "mask_rcnn_X_101_32x8d_FPN_3x"
MASK_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml"
KEYPOINT_MODEL = "dp2_keypoint_maskrcnn_rn50_fpn"
DETECTRON2_PERSON_CLASS = 0  # COCO contiguous id of 'person' in detectron2
SCORE_THRESHOLD = 0.3  # DP2's detection threshold (FB_cse.py, person_detector.py)
KEYPOINT_VISIBILITY = 0.5  # DP2 compute_oks.py: "Same as used for annotating FDH"
DETECTORS = ("torchvision", "detectron2")


def instances_to_detections(instances: Any, keep_class: Optional[int] = DETECTRON2_PERSON_CLASS
                            ) -> Detections:
    """detectron2 `Instances` of one image (already in image pixels) -> `Detections`.

    Reads `pred_boxes.tensor` (N, 4), `scores`, `pred_classes` (when `keep_class` is set), and
    when present `pred_masks` (N, H, W) and `pred_keypoints` (N, 17, 3: x, y, probability), so mask
    and keypoints of a row belong to the same detection."""
    boxes = _as_tensor(instances.pred_boxes.tensor).float().cpu().numpy()
    scores = _as_tensor(instances.scores).float().cpu().numpy()
    keep = np.ones(len(scores), bool)
    if keep_class is not None and hasattr(instances, "pred_classes"):
        keep = _as_tensor(instances.pred_classes).cpu().numpy() == keep_class
    masks = keypoints = None
    if getattr(instances, "pred_masks", None) is not None:
        masks = _as_tensor(instances.pred_masks).cpu().numpy().astype(bool)[keep]
    if getattr(instances, "pred_keypoints", None) is not None:
        keypoints = _as_tensor(instances.pred_keypoints).float().cpu().numpy().astype(np.float32)[keep]
    return Detections(boxes=boxes[keep].astype(np.float32), scores=scores[keep].astype(np.float32),
                      masks=masks, keypoints=keypoints)


def build_mask_rcnn_config(device: str = "cpu", score_threshold: float = SCORE_THRESHOLD):
    """The detectron2 config of DP2's mask model, frozen; MODEL.WEIGHTS empty (loaded safely)."""
    require_detectron2()
    from detectron2 import model_zoo

    cfg = model_zoo.get_config(MASK_CONFIG)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_threshold
    cfg.MODEL.DEVICE = str(device)
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return cfg


def keypoint_mask_rcnn_lazy_config():
    """The LazyConfig of DP2's KeypointMaskRCNN (restated from its description, see module doc)."""
    require_detectron2()
    from detectron2 import model_zoo
    from detectron2.config import LazyCall as L
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.poolers import ROIPooler
    from detectron2.modeling.roi_heads import KRCNNConvDeconvUpsampleHead

    model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    model.roi_heads.update(
        num_classes=1,
        keypoint_in_features=["p2", "p3", "p4", "p5"],
        keypoint_pooler=L(ROIPooler)(output_size=14, scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
                                     sampling_ratio=0, pooler_type="ROIAlignV2"),
        keypoint_head=L(KRCNNConvDeconvUpsampleHead)(
            input_shape=ShapeSpec(channels=256, width=14, height=14), num_keypoints=17,
            conv_dims=[512] * 8, loss_normalizer="visible"))
    model.proposal_generator.post_nms_topk = (1500, 1000)
    model.roi_heads.box_predictor.smooth_l1_beta = 0.5
    return model


class Detectron2Predictor:
    """A loaded detectron2 detector: RGB uint8 images in, `Detections` out (all device work in
    `detect`, so Beam can share it between processes)."""

    def __init__(self, model, input_format: str, min_size: int, max_size: int,
                 keep_class: Optional[int], device):
        self.model = model
        self.input_format = input_format
        self.min_size = min_size
        self.max_size = max_size
        self.keep_class = keep_class
        self.device = device

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        import torch

        inputs = detectron2_inputs(images, self.input_format, self.min_size, self.max_size, self.device)
        with torch.inference_mode():
            outputs = self.model(inputs)
        return [instances_to_detections(output["instances"], self.keep_class) for output in outputs]


def load_mask_rcnn(model_dir: Optional[str], device: str, score_threshold: float = SCORE_THRESHOLD,
                   random_weights: bool = False) -> Detectron2Predictor:
    """DP2's X101 Mask R-CNN with verified weights (random ones: tests and benches only)."""
    from detectron2.modeling import build_model

    torch_dev = torch_device(device)
    cfg = build_mask_rcnn_config(str(torch_dev), score_threshold)
    model = build_model(cfg).eval()
    if random_weights:
        logging.warning("detectron2 Mask R-CNN: RANDOM weights (tests/benches only)")
    else:
        _load_weights(model, assets.resolve(MASK_MODEL, model_dir))
    return Detectron2Predictor(model, cfg.INPUT.FORMAT, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST,
                               DETECTRON2_PERSON_CLASS, torch_dev)


def load_keypoint_mask_rcnn(model_dir: Optional[str], device: str,
                            score_threshold: float = SCORE_THRESHOLD,
                            random_weights: bool = False) -> Detectron2Predictor:
    """DP2's KeypointMaskRCNN (one class: person) with verified weights."""
    from detectron2 import model_zoo
    from detectron2.config import instantiate

    torch_dev = torch_device(device)
    model = instantiate(keypoint_mask_rcnn_lazy_config()).to(torch_dev).eval()
    model.roi_heads.box_predictor.test_score_thresh = score_threshold
    if random_weights:
        logging.warning("DP2 keypoint Mask R-CNN: RANDOM weights (tests/benches only)")
    else:
        _load_weights(model, assets.resolve(KEYPOINT_MODEL, model_dir))
    test = model_zoo.get_config("common/data/coco_keypoint.py").dataloader.test.mapper.augmentations[0]
    return Detectron2Predictor(model, model.input_format, int(test.short_edge_length), int(test.max_size),
                               None, torch_dev)


LOADERS = {MASK_MODEL: load_mask_rcnn, KEYPOINT_MODEL: load_keypoint_mask_rcnn}


class Detectron2DetectionHandler(ModelHandler[np.ndarray, Any, Detectron2Predictor]):
    """RunInference handler for DP2's detectron2 detectors (`model_name` in LOADERS)."""

    def __init__(self, model_name: str, *, model_dir: Optional[str] = None, device: str = "CPU",
                 score_threshold: float = SCORE_THRESHOLD, max_batch_size: int = 4,
                 large_model: bool = False, model_copies: Optional[int] = None,
                 random_weights: bool = False):
        if model_name not in LOADERS:
            raise ValueError(f"unknown detectron2 model {model_name!r}; known: {sorted(LOADERS)}")
        super().__init__(min_batch_size=1, max_batch_size=max_batch_size, large_model=large_model,
                         model_copies=model_copies)
        self._model_name = model_name
        self._model_dir = model_dir
        self._device = device.upper()
        self._score_threshold = score_threshold
        self._random_weights = random_weights  # tests/benches ONLY

    def load_model(self) -> Detectron2Predictor:
        return LOADERS[self._model_name](self._model_dir, self._device, self._score_threshold,
                                         random_weights=self._random_weights)

    def run_inference(self, batch: Sequence[np.ndarray], model: Detectron2Predictor,
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[Any]:
        return infer_with_fallback(model.detect, batch, self._model_name)

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(int(getattr(image, "nbytes", 0)) for image in batch)

    def get_metrics_namespace(self) -> str:
        return f"fdh_annotate_{self._model_name}"
