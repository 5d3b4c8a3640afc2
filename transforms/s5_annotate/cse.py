"""DensePose CSE (continuous surface embeddings) through detectron2, as FDH was annotated.

Model: `densepose_rcnn_R_101_FPN_DL_soft_s1x` (mesh smpl_27554, 16-dim embeddings), score
threshold 0.3, NMS 0.5, input shortest edge 800 / longest 1333 (the config's test sizes).
Per detected box the predictor returns a coarse segmentation S (2, 112, 112: background / person
logits) and an embedding E (16, 112, 112). `cse_instances_to_detections` makes, as DP2's
CSEDetector / cse_det_to_global: the image-space mask (pairing, union) = the 112x112 argmax of S
nearest-resized to the rounded box; the image-space vertex ids (read by the FDH rule only) = the
nearest `embed_map` row of E resampled bilinear to the box, inside that mask; and it keeps S's
argmax and E per detection (`Detections.embeddings`, `transforms.cse_vertices.CseEmbedding`) so
that the crop stage maps them straight into crop coordinates as DP2 does (`cse_to_crop`).

`embed_map` = row-normalised phi_smpl_27554_256 [27554, 256] @ the checkpoint's [256, 16]
`roi_heads.embedder.embedder_smpl_27554.embeddings`: the model's own embedder computes it once the
checkpoint and phi are loaded.

detectron2 is optional and imported lazily: it is not on PyPI, so it comes from source (docker/).
Without it `require_detectron2()` raises a `Detectron2MissingError` that says what to do.
Weights (.pkl) and phi are pickles: they are read with the numpy-only restricted unpickler of
`transforms.assets`, never plain pickle.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from transforms import assets
from transforms.cse_vertices import CseEmbedding, embeddings_to_vertices, segm_to_image_mask
from transforms.records import Detections
from transforms.s5_annotate.handlers import infer_with_fallback, torch_device

CSE_MODEL_ASSET = "densepose_rcnn_R_101_FPN_DL_soft_s1x"
PHI_ASSET = "phi_smpl_27554_256"
CSE_CONFIG = "cse/densepose_rcnn_R_101_FPN_DL_soft_s1x.yaml"
MESH_NAME = "smpl_27554"
# Where the docker/ image checks out detectron2; override with $DENSEPOSE_CONFIGS.
DEFAULT_CONFIG_DIR = "/opt/detectron2/projects/DensePose/configs"
CONFIG_ENV = "DENSEPOSE_CONFIGS"

INSTALL_HINT = (
    "DensePose CSE needs detectron2 and its DensePose project, which are not on PyPI. Either run "
    "with --no_embeddings (FDH's no-embeddings variant: keypoints + masks only), or build the "
    "worker image in docker/ (see docker/README.md), or install from source: "
    "`pip install 'git+https://github.com/facebookresearch/detectron2.git' && pip install "
    "'git+https://github.com/facebookresearch/detectron2.git#subdirectory=projects/DensePose'`.")


class Detectron2MissingError(ImportError, ValueError):
    """detectron2 / DensePose cannot be imported but CSE embeddings were asked for."""


def require_detectron2() -> None:
    """Raise Detectron2MissingError (an ImportError) unless detectron2 and densepose import."""
    try:
        import densepose  # noqa: F401
        import detectron2  # noqa: F401
    except ImportError as error:
        raise Detectron2MissingError(f"{INSTALL_HINT} (import failed: {error})") from error


def _as_tensor(value):
    import torch

    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def cse_instances_to_detections(instances: Any, image_hw: tuple[int, int], embed_map,
                                chunk_rows: int = 4096) -> Detections:
    """DensePose CSE predictor output for one image -> `Detections` in the image frame.

    `instances` needs the detectron2 `Instances` structure: `pred_boxes.tensor` (N, 4) XYXY in
    image pixels, `scores` (N,), `pred_densepose.coarse_segm` (N, 2, h, w) and
    `pred_densepose.embedding` (N, D, h, w) (box frame, h = w = 112 for the FDH model).
    The argmax of S is nearest-resized (DP2) and E bilinear-resampled to the rounded box, then the
    part inside the image is pasted. Returns boxes (rounded, clipped), scores, masks (N, H, W) bool
    (CSE person pixels), vertices (N, H, W) int16 (nearest embed_map row; 0 outside the mask) and
    embeddings (one CseEmbedding per detection, for the crop stage). Empty boxes are dropped.
    """
    import torch
    import torch.nn.functional as F

    height, width = image_hw
    boxes = _as_tensor(instances.pred_boxes.tensor).float()
    scores = _as_tensor(instances.scores).float()
    if len(boxes) == 0:
        return Detections.empty_for_image(height, width, vertices=True)
    segm = _as_tensor(instances.pred_densepose.coarse_segm).float()
    embedding = _as_tensor(instances.pred_densepose.embedding).float()
    embed_map = _as_tensor(embed_map).float().to(embedding.device)
    rounded = boxes.round().long()
    clipped = rounded.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
    keep = [i for i in range(len(rounded)) if clipped[i, 2] > clipped[i, 0] and clipped[i, 3] > clipped[i, 1]]
    masks = np.zeros((len(keep), height, width), bool)
    vertices = np.zeros((len(keep), height, width), np.int16)
    embeddings = []
    table = embed_map.detach().cpu().numpy().astype(np.float32)
    for out, i in enumerate(keep):
        # S and E describe the box as the model reported it (rounded, as DP2): the mask is DP2's
        # nearest resize of the argmax; E is resampled bilinear for the image-space vertex ids
        # that the FDH rule reads. The crop stage maps S and E again, straight into the crop.
        box = [int(v) for v in rounded[i]]
        x0, y0, x1, y1 = box
        cx0, cy0, cx1, cy1 = (int(v) for v in clipped[i])
        inside = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
        argmax = (segm[i].argmax(dim=0) > 0).cpu().numpy()
        masks[out] = segm_to_image_mask(argmax, box, image_hw)
        box_mask = torch.as_tensor(masks[out, cy0:cy1, cx0:cx1], device=embedding.device)
        box_embedding = F.interpolate(embedding[i:i + 1], size=(y1 - y0, x1 - x0), mode="bilinear",
                                      align_corners=False)[0][:, inside[0], inside[1]]
        box_vertices = embeddings_to_vertices(box_embedding, embed_map, mask=box_mask,
                                              chunk_rows=chunk_rows)
        vertices[out, cy0:cy1, cx0:cx1] = box_vertices.cpu().numpy().astype(np.int16)
        embeddings.append(CseEmbedding(segm=argmax, embedding=embedding[i].cpu().numpy().astype(np.float32),
                                       box=np.asarray(box, np.int64), embed_map=table))
    index = torch.as_tensor(keep, dtype=torch.long)
    return Detections(boxes=clipped[index].float().cpu().numpy().astype(np.float32),
                      scores=scores[index].cpu().numpy().astype(np.float32),
                      masks=masks, vertices=vertices, embeddings=embeddings)


def detectron2_inputs(images: Sequence[np.ndarray], input_format: str, min_size: int, max_size: int,
                      device) -> list[dict]:
    """RGB uint8 images -> detectron2 model inputs as DP2 prepares them: channel order of the
    model's INPUT.FORMAT, shortest edge resized to `min_size` (longest <= `max_size`) with
    torchvision bilinear + antialias, original height/width kept for the outputs."""
    import torch
    from detectron2.data.transforms import ResizeShortestEdge
    from torchvision.transforms.functional import InterpolationMode, resize

    inputs = []
    for image in images:
        height, width = image.shape[:2]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)
        if input_format == "BGR":
            tensor = tensor.flip(0)
        new_h, new_w = ResizeShortestEdge.get_output_shape(height, width, min_size, max_size)
        tensor = resize(tensor, [new_h, new_w], InterpolationMode.BILINEAR, antialias=True)
        inputs.append({"image": tensor, "height": height, "width": width})
    return inputs


class CsePredictor:
    """A loaded detectron2 DensePose CSE model plus its embed_map; `detect(RGB uint8 images)`.

    All device work happens inside `detect()` (NumPy in, `Detections` out), so the object can be
    shared across a worker's processes (large_model) through Beam's proxy."""

    def __init__(self, model, cfg, embed_map):
        self.model = model
        self.cfg = cfg
        self.embed_map = embed_map

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        import torch

        inputs = detectron2_inputs(images, self.cfg.INPUT.FORMAT, self.cfg.INPUT.MIN_SIZE_TEST,
                                   self.cfg.INPUT.MAX_SIZE_TEST, self.embed_map.device)
        with torch.inference_mode():
            outputs = self.model(inputs)
        return [cse_instances_to_detections(output["instances"], image.shape[:2], self.embed_map)
                for output, image in zip(outputs, images)]


def find_config_dir(config_dir: Optional[str] = None) -> str:
    """The directory holding DensePose's configs: `config_dir`, $DENSEPOSE_CONFIGS, the docker/
    image's checkout, or (an editable / source install) the `configs/` next to the densepose
    package. Raises FileNotFoundError naming every place looked at."""
    candidates = [config_dir, os.environ.get(CONFIG_ENV), DEFAULT_CONFIG_DIR]
    if not config_dir:
        try:
            import densepose

            candidates.append(os.path.join(os.path.dirname(os.path.dirname(densepose.__file__)), "configs"))
        except ImportError:
            pass
    looked = []
    for candidate in candidates:
        if not candidate:
            continue
        looked.append(candidate)
        if os.path.exists(os.path.join(candidate, CSE_CONFIG)):
            return candidate
        if candidate == config_dir:
            break  # an explicit directory is not second-guessed
    raise FileNotFoundError(
        f"DensePose config {CSE_CONFIG} not found in {looked}: set ${CONFIG_ENV} to detectron2's "
        f"projects/DensePose/configs (the docker/ image has it at {DEFAULT_CONFIG_DIR})")


def build_cse_config(config_dir: Optional[str] = None, device: str = "cpu",
                     score_threshold: float = 0.3, nms_threshold: float = 0.5,
                     overrides: Sequence[str] = ()):
    """detectron2 config of the FDH CSE model, frozen; nothing is downloaded when the model is built.

    `overrides`: detectron2 `merge_from_list` pairs, e.g. ("TEST.DETECTIONS_PER_IMAGE", "5").
    """
    require_detectron2()
    from densepose import add_densepose_config
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_densepose_config(cfg)
    cfg.merge_from_file(os.path.join(find_config_dir(config_dir), CSE_CONFIG))
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_threshold
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = nms_threshold
    cfg.merge_from_list(list(overrides))
    cfg.MODEL.DEVICE = str(device)
    # The config names URLs (ImageNet backbone weights, phi) that detectron2 would fetch and
    # plain-pickle.load while building the model: we load verified files safely instead.
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_DENSEPOSE_HEAD.CSE.EMBEDDERS[MESH_NAME].INIT_FILE = ""
    cfg.freeze()
    return cfg


def checkpoint_from_pickle(data: dict) -> dict:
    """A detectron2 .pkl checkpoint (already safely unpickled) -> what DetectionCheckpointer's
    `_load_file` returns for it (same rules as detectron2's own loader)."""
    if "model" in data and "__author__" in data:
        return data  # detectron2 model zoo format: exact parameter names, numpy arrays
    if "blobs" in data:  # Caffe2 / Detectron1 detection models
        data = data["blobs"]
    model = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return {"model": model, "__author__": "Caffe2", "matching_heuristics": True}


def _load_weights(model, weights_path: str) -> None:
    """Load a detectron2 .pkl checkpoint into `model` with the numpy-only unpickler."""
    from detectron2.checkpoint import DetectionCheckpointer

    class SafeCheckpointer(DetectionCheckpointer):
        def _load_file(self, filename):
            return checkpoint_from_pickle(assets.safe_unpickle(filename))

    SafeCheckpointer(model).load(weights_path)


def randomize_for_plumbing(model, seed: int = 0) -> None:
    """Make a randomly initialised CSE model produce detections (tests and benches ONLY).

    Untrained, the ResNet's activations explode (~1e6), so the random RPN and box regressors move
    every box out of the image and nothing reaches the DensePose head. With those regressors and
    the class logits zeroed, the anchors themselves become detections (score 0.5). phi and the
    vertex embeddings (zeros in detectron2: every vertex would tie) get seeded random values.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (model.proposal_generator.rpn_head.anchor_deltas,
                      model.roi_heads.box_predictor.bbox_pred, model.roi_heads.box_predictor.cls_score):
            layer.weight.zero_()
            layer.bias.zero_()
        mesh_embedder = getattr(model.roi_heads.embedder, f"embedder_{MESH_NAME}")
        for tensor in (mesh_embedder.features, mesh_embedder.embeddings):
            tensor.copy_(torch.randn(tensor.shape, generator=generator))


def load_cse_predictor(model_dir: Optional[str], device: str, config_dir: Optional[str] = None,
                       score_threshold: float = 0.3, nms_threshold: float = 0.5,
                       random_weights: bool = False, config_overrides: Sequence[str] = ()) -> CsePredictor:
    """Build the DensePose CSE model from its config, load the verified weights and phi.

    `random_weights=True`: no files at all, random network AND random phi/embeddings (tests and
    benches ONLY: proves the plumbing, the output is noise).
    """
    require_detectron2()
    import torch
    from detectron2.modeling import build_model

    torch_dev = torch_device(device)
    cfg = build_cse_config(config_dir, str(torch_dev), score_threshold, nms_threshold, config_overrides)
    model = build_model(cfg).eval()
    mesh_embedder = getattr(model.roi_heads.embedder, f"embedder_{MESH_NAME}")
    if random_weights:
        logging.warning("DensePose CSE: RANDOM weights and random phi (tests/benches only): "
                        "detections, masks and vertices are noise")
        randomize_for_plumbing(model)
    else:
        _load_weights(model, assets.resolve(CSE_MODEL_ASSET, model_dir))
        phi = assets.safe_unpickle(assets.resolve(PHI_ASSET, model_dir))
        if not isinstance(phi, dict) or "features" not in phi:
            raise ValueError(f"{PHI_ASSET}: expected a dict with 'features' (as DensePose's "
                             f"VertexFeatureEmbedder.load reads it), got {type(phi).__name__}")
        features = torch.as_tensor(np.asarray(phi["features"])).float()
        if tuple(features.shape) != tuple(mesh_embedder.features.shape):
            raise ValueError(f"{PHI_ASSET}: features {tuple(features.shape)}, the model expects "
                             f"{tuple(mesh_embedder.features.shape)}")
        with torch.no_grad():
            mesh_embedder.features.copy_(features)
    embed_map = model.roi_heads.embedder(MESH_NAME).detach().to(torch_dev)
    logging.info("DensePose CSE loaded: embed_map %s on %s", tuple(embed_map.shape), torch_dev)
    return CsePredictor(model, cfg, embed_map)


class DensePoseCseHandler(ModelHandler[np.ndarray, Any, CsePredictor]):
    """RunInference handler: RGB uint8 images of any size -> CSE `Detections` (or ModelError).

    `random_weights=True` needs no weight files (tests and benches ONLY); `config_overrides` are
    detectron2 `merge_from_list` pairs (e.g. smaller INPUT.MIN_SIZE_TEST for a bench)."""

    def __init__(self, *, model_dir: Optional[str] = None, device: str = "CPU",
                 config_dir: Optional[str] = None, score_threshold: float = 0.3,
                 nms_threshold: float = 0.5, max_batch_size: int = 4, large_model: bool = False,
                 model_copies: Optional[int] = None, random_weights: bool = False,
                 config_overrides: Sequence[str] = ()):
        super().__init__(min_batch_size=1, max_batch_size=max_batch_size, large_model=large_model,
                         model_copies=model_copies)
        self._model_dir = model_dir
        self._device = device.upper()
        self._config_dir = config_dir
        self._score_threshold = score_threshold
        self._nms_threshold = nms_threshold
        self._random_weights = random_weights  # tests/benches ONLY
        self._config_overrides = tuple(config_overrides)

    def load_model(self) -> CsePredictor:
        return load_cse_predictor(self._model_dir, self._device, self._config_dir,
                                  self._score_threshold, self._nms_threshold,
                                  random_weights=self._random_weights,
                                  config_overrides=self._config_overrides)

    def run_inference(self, batch: Sequence[np.ndarray], model: CsePredictor,
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[Any]:
        return infer_with_fallback(model.detect, batch, "densepose_cse")

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(int(getattr(image, "nbytes", 0)) for image in batch)

    def get_metrics_namespace(self) -> str:
        return "fdh_annotate_densepose_cse"
