"""Time per person of select + crop (masks, vertices, keypoints) against a bare resize of the same
crop, in the same run.

    .venv/bin/python bench/bench_crop.py [--photos 60] [--size 640x480]

Each photo holds two painted figures (tests/select_scenes.py) with a full-size CSE vertex map, as
the 'fdh' annotator hands them over. "bare" = cut the crop box out of the photo (zero padding)
and resize it to 288x160 with Pillow bilinear: the least any cropper must do.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.select_scenes import fdh_scene, make_photo, synthetic_part_table  # noqa: E402
from transforms.s6_select import FdhRule, select_persons  # noqa: E402
from transforms.s7_crop import crop_image, make_sample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", type=int, default=60)
    parser.add_argument("--size", default="640x480", help="WxH of each photo")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    scale = max(1, height // 240)
    table = synthetic_part_table()
    rule = FdhRule(keypoint_score_threshold=0.5)
    scenes = [fdh_scene(make_photo((height, width), i), [(20, 10, scale), (width // 2, 20, scale)])
              for i in range(args.photos)]
    persons = sum(len(s.mask_dets) for s in scenes)

    def run_full() -> int:
        n = 0
        for scene in scenes:
            selection = select_persons(scene, table, rule)
            for person in selection.kept:
                make_sample(scene.photo, person, person.extra["crop_box"], 0.5, "fdh")
                n += 1
        return n

    boxes = [(scene.photo.image, p.extra["crop_box"])
             for scene in scenes for p in select_persons(scene, table, rule).kept]

    def run_bare() -> int:
        for image, box in boxes:
            crop_image(image, box)
        return len(boxes)

    best = {}
    for name, fn in (("bare_resize", run_bare), ("select_crop", run_full)):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            n = fn()
            times.append(time.perf_counter() - start)
        best[name] = min(times) / n * 1000
        print(f"{name:12s}: {best[name]:.2f} ms/person ({n} persons of {persons}, "
              f"{args.photos} photos {width}x{height}, best of {args.repeats})")
    print(f"ratio select_crop / bare_resize = {best['select_crop'] / best['bare_resize']:.2f}x")


if __name__ == "__main__":
    main()
