"""The one registry of downloadable assets (model weights, embeddings, label tables).

Every file the job downloads is an `Asset` in `ASSETS`: where it comes from, what checksum it must
have, its licence. `fetch()` downloads with retries into a model dir (local or gs://) and verifies;
`resolve()` finds an asset for a worker (copying it from gs:// to a local cache) and verifies again
before anything is loaded. Copies between filesystems (gs:// <-> local) stream through
`copy_file`: Beam's `FileSystems.copy` only copies within one filesystem. Loading is always `torch.load(path, weights_only=True)` or a restricted
unpickler (`safe_unpickle`): never plain pickle on downloaded bytes.

Checksums, honestly:
  * torchvision weights carry the first 8+ hex digits of their sha256 in the file name
    (`...-fc266e95.pth`): verified as a prefix (`sha256_prefix`).
  * Assets whose full sha256 is recorded in the registry (`sha256`) are verified exactly.
  * The others (DensePose / detectron2 `.pkl`, whose names carry a hash of unknown kind) are
    trust-on-first-use: the sha256 of the first download is written to `assets.lock.json` next to
    the files, and every later fetch/resolve must match it. The lock file, not this registry, is
    then what pins them: check it into your run config.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import tempfile
from dataclasses import dataclass
from typing import Iterable, Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

LOCK_FILE = "assets.lock.json"
CACHE_ENV = "FDH_BEAM_CACHE"
FETCH_HINT = "python -m beam_jobs.assets fetch --model_dir={model_dir}"
CHUNK_BYTES = 1 << 20
# Model files are opaque bytes: never let FileSystems guess a compression from the file name.
_RAW = CompressionTypes.UNCOMPRESSED


@dataclass(frozen=True)
class Asset:
    """One downloadable file and how to check it."""

    name: str  # registry key, e.g. 'keypointrcnn_resnet50_fpn_coco'
    url: str
    filename: str  # file name inside a model dir
    sha256: Optional[str] = None  # full hex digest, when known
    sha256_prefix: Optional[str] = None  # hex prefix published in the file name (torchvision)
    license: str = ""
    description: str = ""

    def check_kind(self) -> str:
        if self.sha256:
            return "sha256"
        if self.sha256_prefix:
            return "sha256-prefix"
        return "lock-file (trust on first use)"


_TV = "https://download.pytorch.org/models/"
_DP = "https://dl.fbaipublicfiles.com/densepose/"

ASSETS: list[Asset] = [
    Asset("keypointrcnn_resnet50_fpn_coco", _TV + "keypointrcnn_resnet50_fpn_coco-fc266e95.pth",
          "keypointrcnn_resnet50_fpn_coco-fc266e95.pth", sha256_prefix="fc266e95",
          license="BSD-3-Clause (torchvision); trained on COCO",
          description="torchvision keypoint R-CNN, 17 COCO keypoints"),
    Asset("maskrcnn_resnet50_fpn_coco", _TV + "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
          "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth", sha256_prefix="bf2d0c1e",
          license="BSD-3-Clause (torchvision); trained on COCO",
          description="torchvision Mask R-CNN v1 (person class used)"),
    Asset("maskrcnn_resnet50_fpn_v2_coco", _TV + "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth",
          "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth", sha256_prefix="73cbd019",
          license="BSD-3-Clause (torchvision); trained on COCO",
          description="torchvision Mask R-CNN v2 (person class used; the default mask model)"),
    Asset("densepose_rcnn_R_101_FPN_DL_soft_s1x",
          _DP + "cse/densepose_rcnn_R_101_FPN_DL_soft_s1x/250713061/model_final_1d3314.pkl",
          "densepose_rcnn_R_101_FPN_DL_soft_s1x_model_final_1d3314.pkl",
          license="Apache-2.0 (detectron2 model zoo)",
          description="DensePose CSE, the model FDH was annotated with (detectron2 pickle)"),
    Asset("phi_smpl_27554_256", _DP + "data/cse/lbo/phi_smpl_27554_256.pkl",
          "phi_smpl_27554_256.pkl", license="Apache-2.0 (detectron2 DensePose data)",
          description="Laplace-Beltrami basis [27554, 256] of the smpl_27554 mesh (CSE embed_map)"),
    Asset("mask_rcnn_X_101_32x8d_FPN_3x",
          "https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/"
          "mask_rcnn_X_101_32x8d_FPN_3x/139653917/model_final_2d9806.pkl",
          "mask_rcnn_X_101_32x8d_FPN_3x_model_final_2d9806.pkl",
          license="Apache-2.0 (detectron2 model zoo)",
          description="detectron2 Mask R-CNN X101 (FDH's mask model; optional, needs detectron2)"),
    Asset("dp2_keypoint_maskrcnn_rn50_fpn",
          "https://api.loke.aws.unit.no/dlr-gui-backend-resources-content/v2/contents/links/"
          "532a57f3-594b-4ec9-a6db-ef2e328ad60ae337668e-a83c-4222-9fa0-cec6f91adf4841b9a42e-"
          "a28e-403e-8b96-d55ac443b8c6",
          "dp2_keypoint_maskrcnn_rn50_fpn.pkl",
          license="unstated (hosted by DeepPrivacy2's author; DP2 code is Apache-2.0)",
          description="DP2's KeypointMaskRCNN R50-FPN (person masks + 17 keypoints; FDH's keypoint "
                      "model per notes/faithfulness.md; optional, needs detectron2)"),
    Asset("smpl_subdiv", _DP + "data/SMPL_subdiv.mat", "SMPL_subdiv.mat",
          license="unstated (DensePose evaluation data, derived from SMPL: SMPL terms may apply)",
          description="subdivided SMPL mesh with the 24 DensePose charts per vertex (part table input)"),
    Asset("smpl_subdiv_transform", _DP + "data/SMPL_SUBDIV_TRANSFORM.mat", "SMPL_SUBDIV_TRANSFORM.mat",
          license="unstated (DensePose evaluation data)",
          description="SMPL_subdiv vertex -> smpl_27554 id, 1-based (part table input)"),
]


def registry() -> dict[str, Asset]:
    """name -> Asset for every registered asset (a fresh dict: callers may not mutate ASSETS)."""
    return {asset.name: asset for asset in ASSETS}


def get_asset(name: str) -> Asset:
    assets = registry()
    if name not in assets:
        raise KeyError(f"unknown asset {name!r}; registered: {sorted(assets)}")
    return assets[name]


class AssetError(RuntimeError):
    """An asset is missing or does not match its checksum."""


class AssetMissingError(AssetError, FileNotFoundError):
    """An asset file is not where the job looks for it."""


class ChecksumMismatchError(AssetError):
    """A file's sha256 differs from the registry or the lock file."""


def default_cache_dir() -> str:
    """Local dir for downloaded / copied assets: $FDH_BEAM_CACHE or ~/.cache/fdh-beam/models."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fdh-beam", "models")


def sha256_file(path: str) -> str:
    """Hex sha256 of a file on any filesystem Beam knows (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with FileSystems.open(path, compression_type=_RAW) as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def copy_file(source: str, destination: str, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Stream `source` to `destination` on any filesystems (local, gs://, either way); returns the
    hex sha256 of the bytes copied, so the copy is checked without reading it again.

    `FileSystems.copy` cannot copy between two filesystems (it raises BeamIOError for gs:// ->
    local), and a worker's model load and `assets fetch --model_dir=gs://...` both need that.
    """
    digest = hashlib.sha256()
    with FileSystems.open(source, compression_type=_RAW) as reader, \
            FileSystems.create(destination, compression_type=_RAW) as writer:
        for chunk in iter(lambda: reader.read(chunk_bytes), b""):
            digest.update(chunk)
            writer.write(chunk)
    return digest.hexdigest()


def _join(directory: str, name: str) -> str:
    return FileSystems.join(directory, name) if "://" in directory else os.path.join(directory, name)


def read_lock(directory: str) -> dict[str, str]:
    """{asset name: sha256} recorded in DIRECTORY/assets.lock.json ({} when there is none)."""
    path = _join(directory, LOCK_FILE)
    if not FileSystems.exists(path):
        return {}
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def write_lock(directory: str, lock: dict[str, str]) -> None:
    with FileSystems.create(_join(directory, LOCK_FILE)) as handle:
        handle.write(json.dumps(dict(sorted(lock.items())), indent=2).encode("utf-8") + b"\n")


def check_digest(asset: Asset, digest: str, lock: dict[str, str]) -> bool:
    """Raise ChecksumMismatchError unless `digest` is the asset's; True when the lock must record it."""
    if asset.sha256:
        expected, ok = asset.sha256, digest == asset.sha256.lower()
    elif asset.sha256_prefix:
        expected, ok = asset.sha256_prefix + "...", digest.startswith(asset.sha256_prefix.lower())
    elif asset.name in lock:
        expected, ok = lock[asset.name] + " (lock file)", digest == lock[asset.name]
    else:
        return True
    if not ok:
        raise ChecksumMismatchError(
            f"{asset.filename}: sha256 {digest} does not match the expected {expected}")
    return False


def verify(asset: Asset, path: str, lock: dict[str, str]) -> tuple[str, bool]:
    """sha256 of `path` checked against the asset; returns (digest, needs_lock_entry)."""
    digest = sha256_file(path)
    return digest, check_digest(asset, digest, lock)


def _download(url: str, destination: str, timeout_s: float, retries: int = 4) -> None:
    """Stream `url` into the local file `destination` (retries with backoff on 429/5xx/resets)."""
    import urllib3

    retry = urllib3.Retry(total=retries, backoff_factor=1.0, status_forcelist=(429, 500, 502, 503, 504),
                            respect_retry_after_header=True)
    http = urllib3.PoolManager(retries=retry, timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s))
    response = http.request("GET", url, preload_content=False)
    try:
        if response.status != 200:
            raise AssetError(f"GET {url}: HTTP {response.status}")
        with open(destination, "wb") as handle:
            for chunk in response.stream(1 << 20):
                handle.write(chunk)
    finally:
        response.release_conn()


def _checked_copy(source: str, destination: str, digest: str) -> None:
    """copy_file, then fail (AssetError) when the bytes written are not the verified ones."""
    copied = copy_file(source, destination)
    if copied != digest:
        FileSystems.delete([destination])
        raise AssetError(f"copying {source} to {destination}: sha256 {copied}, expected {digest}")


def fetch(names: Optional[Iterable[str]] = None, model_dir: Optional[str] = None,
          timeout_s: float = 60.0, retries: int = 4) -> dict[str, str]:
    """Download and verify assets into `model_dir` (local or gs://); skip verified ones.

    A file failing its checksum is removed and ChecksumMismatchError raised. New trust-on-first-use
    digests go into the model dir's lock file. Returns {name: path}.
    """
    model_dir = model_dir or default_cache_dir()
    if "://" not in model_dir:
        os.makedirs(model_dir, exist_ok=True)
    lock = read_lock(model_dir)
    paths: dict[str, str] = {}
    for name in (list(names) if names is not None else [asset.name for asset in ASSETS]):
        asset = get_asset(name)
        target = _join(model_dir, asset.filename)
        if FileSystems.exists(target):
            digest, record = verify(asset, target, lock)
            if record:
                lock[asset.name] = digest
            paths[name] = target
            continue
        with tempfile.TemporaryDirectory(prefix="fdh-asset-") as tmp:
            local = os.path.join(tmp, asset.filename)
            logging.info("downloading %s from %s", asset.filename, asset.url)
            _download(asset.url, local, timeout_s, retries)
            digest, record = verify(asset, local, lock)  # the temp dir (and file) go on failure
            if "://" in model_dir:
                _checked_copy(local, target, digest)
            else:
                os.replace(local, target)
        if record:
            logging.warning("%s has no published sha256: recorded %s in %s (trust on first use)",
                            asset.filename, digest, LOCK_FILE)
            lock[asset.name] = digest
        paths[name] = target
    write_lock(model_dir, lock)
    return paths


def locate(name: str, model_dir: Optional[str] = None) -> str:
    """Where `name` is expected (no download, no verification): model_dir or the local cache."""
    return _join(model_dir or default_cache_dir(), get_asset(name).filename)


def missing_message(name: str, model_dir: Optional[str]) -> str:
    asset = get_asset(name)
    where = model_dir or default_cache_dir()
    return (f"model asset {asset.filename!r} ({asset.description}) is not in {where}. Download it "
            f"with `{FETCH_HINT.format(model_dir=where)}` (from {asset.url}), then pass "
            f"--model_dir={where}")


def resolve(name: str, model_dir: Optional[str] = None, download: bool = True,
            timeout_s: float = 60.0, retries: int = 4) -> str:
    """A verified LOCAL path of asset `name`, ready to load.

    model_dir local: the file there. model_dir remote (gs://...): copied once into the local cache.
    model_dir None: the local cache, downloading the asset when `download` (offline: a clear
    AssetMissingError naming the file and the `beam_jobs.assets fetch` command).
    """
    asset = get_asset(name)
    if model_dir is None:
        cache = default_cache_dir()
        path = _join(cache, asset.filename)
        if not os.path.exists(path):
            if not download:
                raise AssetMissingError(missing_message(name, None))
            try:
                fetch([name], cache, timeout_s=timeout_s, retries=retries)
            except ChecksumMismatchError:
                raise
            except Exception as error:
                raise AssetMissingError(f"{missing_message(name, None)} (download failed: {error})") from error
        digest, record = verify(asset, path, read_lock(cache))
        if record:
            lock = read_lock(cache)
            lock[name] = digest
            write_lock(cache, lock)
        return path
    source = _join(model_dir, asset.filename)
    if not FileSystems.exists(source):
        raise AssetMissingError(missing_message(name, model_dir))
    lock = read_lock(model_dir)
    if "://" not in model_dir:
        verify(asset, source, lock)
        return source
    local_dir = os.path.join(default_cache_dir(), "remote", hashlib.sha256(model_dir.encode()).hexdigest()[:16])
    os.makedirs(local_dir, exist_ok=True)
    local = os.path.join(local_dir, asset.filename)
    if not os.path.exists(local):
        partial = local + f".part{os.getpid()}"
        try:
            check_digest(asset, copy_file(source, partial), lock)
        except BaseException:
            if os.path.exists(partial):
                os.remove(partial)
            raise
        os.replace(partial, local)
        return local
    verify(asset, local, lock)
    return local


# --- loading without executing downloaded code -------------------------------------------------

_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("_codecs", "encode"),
    # pickle protocol 5 rebuilds arrays from an out-of-band-capable buffer:
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays "
                                         "and plain containers are allowed in model files")
        return super().find_class(module, name)


def safe_unpickle(path: str):
    """Load a pickle that may only hold numpy arrays, numbers, strings and containers.

    detectron2 / DensePose publish weights and mesh data as pickles; this loads them without
    running arbitrary code (anything else raises pickle.UnpicklingError).
    """
    with FileSystems.open(path) as handle:
        data = handle.read()
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def load_torch_state_dict(path: str):
    """`torch.load(path, weights_only=True)` on CPU: tensors only, no code."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
