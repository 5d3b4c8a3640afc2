#!/usr/bin/env bash
# GPU throughput of the FDH annotator's torchvision models, one prepared script, NO network needed.
#
#   bash bench/gpu_annotate.sh                      # on a GPU machine (H100): --device cuda
#   bash bench/gpu_annotate.sh --device cpu --images 2 --batches 1,2 --size 320   # CPU smoke test
#
# Builds torchvision keypointrcnn_resnet50_fpn and maskrcnn_resnet50_fpn_v2 with RANDOM weights
# (the cost of the real weights is the same; the detections are noise), score threshold 0 and 10
# detections per image so every image does the same head work (about a photo with people), and
# prints images/s at an 800 px shortest edge for batch sizes 1, 4, 8:
#   bare   : model(list of device tensors), outputs left on the device (synchronised)
#   handler: our TorchvisionDetectionHandler.run_inference on NumPy uint8 images (upload,
#            person filtering, masks/keypoints back to NumPy `Detections`): what RunInference runs
# with GPU utilisation sampled by nvidia-smi in a background thread during each phase.
# Uses the repo's .venv if present (copied with the repo), else the python3 on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
exec "$PY" - "$@" <<'PYEOF'
import argparse, os, shutil, subprocess, sys, threading, time
sys.path.insert(0, os.getcwd())
import numpy as np
import torch

from transforms.s5_annotate.handlers import TorchvisionDetectionHandler

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
parser.add_argument("--images", type=int, default=32, help="images per measurement")
parser.add_argument("--batches", default="1,4,8")
parser.add_argument("--size", type=int, default=800, help="shortest edge (the models' min_size)")
parser.add_argument("--models", default="keypointrcnn_resnet50_fpn,maskrcnn_resnet50_fpn_v2")
args = parser.parse_args()
if args.device == "cuda" and not torch.cuda.is_available():
    sys.exit("CUDA is not available: use --device cpu")
device = "GPU" if args.device == "cuda" else "CPU"
print(f"torch {torch.__version__} cuda {torch.version.cuda} device "
      f"{torch.cuda.get_device_name(0) if args.device == 'cuda' else 'cpu'}", flush=True)


class UtilSampler:
    """Polls nvidia-smi every 0.2 s in a thread; mean GPU utilisation and peak memory per phase."""

    def __init__(self):
        self.enabled = args.device == "cuda" and shutil.which("nvidia-smi") is not None
        self.samples = []

    def __enter__(self):
        self.samples, self._stop = [], threading.Event()
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True).stdout.strip()
            try:
                util, mem = (float(v) for v in out.split(","))
                self.samples.append((util, mem))
            except ValueError:
                pass
            self._stop.wait(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled:
            self._thread.join()

    def summary(self):
        if not self.samples:
            return "util n/a"
        util = np.array([s[0] for s in self.samples]); mem = max(s[1] for s in self.samples)
        return f"gpu util mean {util.mean():.0f}% (n={len(util)}), mem peak {mem:.0f} MiB"


def make_images(count, short):
    try:
        import skimage.data
        from PIL import Image
        sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    except Exception:  # no skimage on this machine: noise images of varied aspect ratios
        rng = np.random.default_rng(0)
        sources = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((512, 512), (400, 600), (300, 451), (427, 640))]
        Image = None
    images = []
    for i in range(count):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        scale = short / min(h, w)
        size = (round(w * scale), round(h * scale))
        if Image is not None:
            images.append(np.asarray(Image.fromarray(src).resize(size)))
        else:
            ys = (np.arange(size[1]) / scale).astype(int).clip(0, h - 1)
            xs = (np.arange(size[0]) / scale).astype(int).clip(0, w - 1)
            images.append(np.ascontiguousarray(src[ys][:, xs]))
    return images


def sync():
    if args.device == "cuda":
        torch.cuda.synchronize()


images = make_images(args.images, args.size)
batches = [int(b) for b in args.batches.split(",")]
for model_name in args.models.split(","):
    handler = TorchvisionDetectionHandler(
        model_name, device=device, random_weights=True, score_threshold=0.0,
        box_detections_per_img=10, min_size=args.size, max_size=round(args.size * 1333 / 800))
    detector = handler.load_model()
    model, torch_device = detector.model, detector.device
    for batch in batches:
        chunks = [images[i:i + batch] for i in range(0, len(images), batch)]
        with torch.inference_mode():  # warm-up (cudnn autotune, allocator)
            model([torch.from_numpy(np.array(im)).to(torch_device).permute(2, 0, 1).float() / 255 for im in chunks[0]])
        sync()
        with UtilSampler() as bare_util:
            start = time.perf_counter()
            with torch.inference_mode():
                for chunk in chunks:
                    tensors = [torch.from_numpy(np.array(im)).to(torch_device).permute(2, 0, 1).float() / 255
                               for im in chunk]
                    model(tensors)
            sync()
            bare = len(images) / (time.perf_counter() - start)
        handler.run_inference(chunks[0], detector)
        with UtilSampler() as handler_util:
            start = time.perf_counter()
            for chunk in chunks:
                results = handler.run_inference(chunk, detector)
            sync()
            ours = len(images) / (time.perf_counter() - start)
        print(f"{model_name} {args.size}px batch {batch}: bare {bare:.2f} img/s [{bare_util.summary()}]; "
              f"handler {ours:.2f} img/s [{handler_util.summary()}]; ratio {ours / bare:.2f}", flush=True)
    del model, detector
    if args.device == "cuda":
        torch.cuda.empty_cache()
PYEOF
