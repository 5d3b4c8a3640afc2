"""RunInference ModelHandlers for the torchvision detectors (keypoint R-CNN, Mask R-CNN).

`TorchvisionDetectionHandler` takes RGB uint8 (H, W, 3) images of ANY size (RunInference's default
`torch.stack` would need equal sizes: the detection models take a list of tensors, so the batch is
passed as a list) and returns one `Detections` per image, person class only, in image pixels.
Wrap it in `KeyedModelHandler` to carry the photo being annotated as the key.

Weights come from the asset registry (`transforms.assets`): resolved under `model_dir` (local or
gs://, copied to a local cache), verified, loaded with `torch.load(weights_only=True)`.
`random_weights=True` builds the architecture with random weights: for tests and benches ONLY (the
plumbing is real, the detections are noise). `device='GPU'` raises when CUDA is missing, in
`load_model()` on the worker and, for local runs, at pipeline construction (`check_device`).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from transforms import assets
from transforms.records import Detections

# torchvision builder name -> (asset name, number of classes of the COCO checkpoint)
MODELS = {
    "keypointrcnn_resnet50_fpn": ("keypointrcnn_resnet50_fpn_coco", 2),
    "maskrcnn_resnet50_fpn": ("maskrcnn_resnet50_fpn_coco", 91),
    "maskrcnn_resnet50_fpn_v2": ("maskrcnn_resnet50_fpn_v2_coco", 91),
}
KEYPOINT_MODEL = "keypointrcnn_resnet50_fpn"
DEFAULT_MASK_MODEL = "maskrcnn_resnet50_fpn_v2"
COCO_PERSON_LABEL = 1


@dataclass(frozen=True)
class ModelError:
    """Returned in place of `Detections` for an image the model failed on (becomes a reject)."""

    detail: str


class DeviceUnavailableError(RuntimeError, ValueError):
    """--device=GPU where CUDA is not usable: a launch-time user error (one line, exit 2)."""


def check_device(device: str) -> None:
    """Raise when `device` is 'GPU' and CUDA is not usable here (never fall back silently)."""
    if device.upper() != "GPU":
        return
    import torch

    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            "--device=GPU but CUDA is not available on this machine (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda}): use --device=CPU, or run "
            "on a GPU worker (Dataflow: --gpu_type and the docker/ image).")


def check_weights_present(asset_names: Iterable[str], model_dir: Optional[str]) -> None:
    """Raise AssetMissingError at construction when a weights file is not where workers look.

    With model_dir=None an absent file may still be downloaded into the cache by `resolve()`; we
    only fail early for an explicit model_dir.
    """
    from apache_beam.io.filesystems import FileSystems

    if model_dir is None:
        return
    for name in asset_names:
        if not FileSystems.exists(assets.locate(name, model_dir)):
            raise assets.AssetMissingError(assets.missing_message(name, model_dir))


def torch_device(device: str):
    import torch

    check_device(device)
    return torch.device("cuda" if device.upper() == "GPU" else "cpu")


def to_detections(output: dict, keep_label: Optional[int] = COCO_PERSON_LABEL,
                  mask_threshold: float = 0.5) -> Detections:
    """One torchvision detection output dict -> `Detections` (person class, NumPy, image pixels).

    keypoints: (N, 17, 3) x, y and the keypoint score (torchvision's 3rd column is a constant 1).
    masks: (N, H, W) bool, the soft mask thresholded at `mask_threshold`.
    """
    keep = slice(None)
    if keep_label is not None and "labels" in output:
        keep = (output["labels"] == keep_label).nonzero().flatten()
    boxes = output["boxes"][keep].float().cpu().numpy().reshape(-1, 4)
    detections = Detections(boxes=boxes.astype(np.float32),
                            scores=output["scores"][keep].float().cpu().numpy().astype(np.float32))
    if "keypoints" in output:
        keypoints = output["keypoints"][keep].float().clone()
        if "keypoints_scores" in output:
            keypoints[..., 2] = output["keypoints_scores"][keep].float()
        detections.keypoints = keypoints.cpu().numpy().reshape(-1, 17, 3).astype(np.float32)
    if "masks" in output:
        masks = output["masks"][keep]  # (N, 1, H, W) float in [0, 1]
        detections.masks = (masks[:, 0] > mask_threshold).cpu().numpy()
    return detections


def infer_with_fallback(infer: Callable[[Sequence[np.ndarray]], list], batch: Sequence[np.ndarray],
                        model_name: str) -> list:
    """`infer(batch)`; if the batch fails, image by image, with a `ModelError` for each bad image.

    One corrupt or pathological image must not sink its batch-mates (nor the job).
    """
    try:
        return list(infer(batch))
    except Exception as error:
        logging.warning("%s: batch of %d failed (%s: %s); retrying image by image",
                        model_name, len(batch), type(error).__name__, error)
    results: list = []
    for image in batch:
        try:
            results.extend(infer([image]))
        except Exception as error:
            results.append(ModelError(f"{model_name}: {type(error).__name__}: {error}"))
    return results


class Detector:
    """A loaded torchvision detector on its device: NumPy images in, `Detections` out.

    Everything device-side happens inside `detect()`, so with `large_model=True` (one copy shared
    by a worker's processes through Beam's multi_process_shared proxy) only NumPy arrays cross
    the process boundary.
    """

    def __init__(self, model, device, keep_label: Optional[int], mask_threshold: float, name: str):
        self.model = model
        self.device = device
        self.keep_label = keep_label
        self.mask_threshold = mask_threshold
        self.name = name

    def to_tensor(self, image: np.ndarray):
        """RGB uint8 (H, W, 3) -> float (3, H, W) in [0, 1] on the device."""
        import torch

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")
        if not image.flags.writeable or not image.flags.c_contiguous:
            image = np.array(image, order="C")  # torch wants a writable, contiguous buffer
        # uint8 crosses to the device (4x fewer bytes than float), converted there.
        tensor = torch.from_numpy(image).to(self.device, non_blocking=True)
        return tensor.permute(2, 0, 1).float().div_(255.0)

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        import torch

        with torch.inference_mode():
            outputs = self.model([self.to_tensor(image) for image in images])
        return [to_detections(output, self.keep_label, self.mask_threshold) for output in outputs]


class TorchvisionDetectionHandler(ModelHandler[np.ndarray, Any, "Detector"]):
    """RGB uint8 (H, W, 3) images of any size -> `Detections` (or `ModelError`) per image."""

    def __init__(self, model_name: str, *, model_dir: Optional[str] = None, device: str = "CPU",
                 random_weights: bool = False, score_threshold: float = 0.3,
                 mask_threshold: float = 0.5, min_size: int = 800, max_size: int = 1333,
                 box_detections_per_img: int = 100, max_batch_size: int = 4,
                 large_model: bool = False, model_copies: Optional[int] = None):
        if model_name not in MODELS:
            raise ValueError(f"unknown model {model_name!r}; known: {sorted(MODELS)}")
        super().__init__(min_batch_size=1, max_batch_size=max_batch_size, large_model=large_model,
                         model_copies=model_copies)
        self.model_name = model_name
        self.asset_name, self._num_classes = MODELS[model_name]
        self._model_dir = model_dir
        self._device = device.upper()
        self._random_weights = random_weights
        self._score_threshold = score_threshold
        self._mask_threshold = mask_threshold
        self._builder_kwargs = dict(min_size=min_size, max_size=max_size,
                                    box_detections_per_img=box_detections_per_img,
                                    box_score_thresh=score_threshold)

    def build_model(self):
        """The torchvision architecture with random weights (no download)."""
        import torchvision

        builder = getattr(torchvision.models.detection, self.model_name)
        return builder(weights=None, weights_backbone=None, num_classes=self._num_classes,
                       **self._builder_kwargs)

    def build_random_model(self):
        """`build_model()` with weights drawn from a seed fixed per model name (global RNG left
        untouched): the same noise whichever step, process or order loads it, so random-weight
        runs of different pipeline shapes can be compared byte for byte."""
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(hashlib.sha256(self.model_name.encode()).hexdigest()[:8], 16))
            return self.build_model()

    def load_model(self) -> "Detector":
        device = torch_device(self._device)  # raises on a worker without CUDA for GPU
        if self._random_weights:
            model = self.build_random_model()
            logging.warning("%s: RANDOM weights (tests/benches only): detections are noise",
                            self.model_name)
        else:
            model = self.build_model()
            path = assets.resolve(self.asset_name, self._model_dir)
            model.load_state_dict(assets.load_torch_state_dict(path))
        keep = COCO_PERSON_LABEL if self._num_classes > 2 else None
        return Detector(model.eval().to(device), device, keep, self._mask_threshold, self.model_name)

    def run_inference(self, batch: Sequence[np.ndarray], model: "Detector",
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[Any]:
        return infer_with_fallback(model.detect, batch, self.model_name)

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(int(getattr(image, "nbytes", 0)) for image in batch)

    def get_metrics_namespace(self) -> str:
        return "fdh_annotate_" + self.model_name
