"""Annotate-stage throughput through Beam vs the bare model loop, same device, same images, same run.

    .venv/bin/python bench/bench_annotate.py [--images 16] [--size 128] [--batch 4] [--skip_lite]

1. torchvision keypoint R-CNN (RANDOM weights: the cost is real, the detections are noise) on the
   CPU at a small size: the bare loop (handler.run_inference over batches) vs
   `Annotate(annotator='fdh', no_embeddings=True)` restricted to the keypoint model (cascade
   thresholds set so nothing goes on to the mask model) through RunInference.
2. The lite annotator (mediapipe): the bare `LiteAnnotator.detect` loop vs `Annotate('lite')`.
Prints images/s of each and the ratio Beam / bare (1.0 = no overhead): whole runs (pipeline
start-up and model loading inside the Beam time), then without the start-up of a pass-through
pipeline, then also without the model load measured once here (the steady state of a worker).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from beam_jobs.common import make_pipeline  # noqa: E402
from tests.factories import make_record  # noqa: E402
from transforms.records import DecodedImage  # noqa: E402
from transforms.s5_annotate import Annotate  # noqa: E402


def _photos(count: int, size: int) -> list[DecodedImage]:
    """Real photos (skimage) resized so the short edge is `size`, cycled with varied aspect ratios."""
    import skimage.data
    from PIL import Image

    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    photos = []
    for i in range(count):
        image = Image.fromarray(sources[i % len(sources)])
        scale = size / min(image.size)
        image = np.asarray(image.resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))))
        photos.append(DecodedImage(record=make_record(i + 1), image=image,
                                   sha256=hashlib.sha256(image.tobytes()).hexdigest(),
                                   original_size=(image.shape[1], image.shape[0])))
    return photos


def _beam_seconds(photos: list[DecodedImage], transform: beam.PTransform) -> float:
    pipeline = make_pipeline(PipelineOptions([]))
    _ = pipeline | beam.Create(photos, reshuffle=False) | transform
    start = time.perf_counter()
    pipeline.run().wait_until_finish()
    return time.perf_counter() - start


def _beam_rates(photos: list[DecodedImage], transform: beam.PTransform,
                load_seconds: float) -> tuple[float, float, float]:
    """(images/s through Beam; once the cost of a pass-through pipeline on the same elements
    (runner start-up, Create, coders) is taken off; once the model's one-off load is taken off
    too: the steady-state rate a long-running worker sees)."""
    total = _beam_seconds(photos, transform)
    passthrough = _beam_seconds(photos, beam.Map(lambda photo: photo))
    return (len(photos) / total, len(photos) / max(total - passthrough, 1e-9),
            len(photos) / max(total - passthrough - load_seconds, 1e-9))


def bench_fdh_keypoints(photos: list[DecodedImage], size: int, batch: int) -> tuple[float, ...]:
    import torch

    from transforms.s5_annotate.handlers import TorchvisionDetectionHandler

    options = dict(min_size=size, max_size=size * 2, box_detections_per_img=3)
    handler = TorchvisionDetectionHandler("keypointrcnn_resnet50_fpn", random_weights=True,
                                          max_batch_size=batch, **options)
    start = time.perf_counter()
    model = handler.load_model()
    load_seconds = time.perf_counter() - start
    images = [photo.image for photo in photos]
    handler.run_inference(images[:1], model)  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        handler.run_inference(images[i:i + batch], model)
    bare = len(images) / (time.perf_counter() - start)
    del model
    torch.manual_seed(0)
    return (bare,) + _beam_rates(photos, Annotate(
        annotator="fdh", no_embeddings=True, random_weights=True, max_batch_size=batch,
        person_score=2.0,  # no score reaches 2: the cascade stops after the keypoint model
        model_options=options), load_seconds)


def bench_lite(photos: list[DecodedImage]) -> tuple[float, ...]:
    from transforms.s5_annotate.lite import LiteAnnotator

    start = time.perf_counter()
    lite = LiteAnnotator()
    load_seconds = time.perf_counter() - start
    lite.detect(photos[0].image)  # warm-up
    start = time.perf_counter()
    for photo in photos:
        lite.detect(photo.image)
    bare = len(photos) / (time.perf_counter() - start)
    lite.close()
    return (bare,) + _beam_rates(photos, Annotate(annotator="lite"), load_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="fdh bench images")
    parser.add_argument("--lite_images", type=int, default=64)
    parser.add_argument("--size", type=int, default=128, help="short edge of the fdh bench images")
    parser.add_argument("--lite_size", type=int, default=512, help="short edge of the lite bench images")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--skip_lite", action="store_true")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    results = [(f"fdh keypoint R-CNN (random weights) {args.size}px batch {args.batch}",
                bench_fdh_keypoints(_photos(args.images, args.size), args.size, args.batch))]
    if not args.skip_lite:
        results.append((f"lite mediapipe {args.lite_size}px, {args.lite_images} images",
                        bench_lite(_photos(args.lite_images, args.lite_size))))
    for name, (bare, through_beam, net, steady) in results:
        print(f"{name}: bare loop {bare:.2f} img/s; Beam Annotate {through_beam:.2f} img/s "
              f"(ratio {through_beam / bare:.2f}); without pipeline start-up {net:.2f} img/s "
              f"(ratio {net / bare:.2f}); without start-up and model load {steady:.2f} img/s "
              f"(ratio {steady / bare:.2f})")


if __name__ == "__main__":
    main()
