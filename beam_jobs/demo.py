"""Offline end-to-end demo: build a tiny YFCC100M sample from photos that ship in packages, rebuild
FDH from it with the CPU (`lite`) annotator, verify the output, chart its statistics and draw a
contact sheet.

    python -m beam_jobs.demo --output=demo_out        (what `make demo` runs)

The sample: people (skimage astronaut and camera, matplotlib's Grace Hopper) and non-people
(skimage coffee, chelsea, rocket), served from a local mirror in the YFCC hash layout, described by
YFCC lines that mix licences and include a NoDerivs licence, a video, a `no_cv` tag, a photo missing
from the mirror and a malformed line, so that every kind of reject shows up in the summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import os
import shlex
import subprocess
import sys
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from dataset.manifest import load_manifest
from dataset.shards import read_tar_shard
from transforms import mirror_layout
from transforms.records import CROP_HEIGHT, CROP_WIDTH, LICENSES, YfccRecord
from transforms.yfcc_format import format_line, photo_hash


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        return getattr(data, name)()

    return load


def _grace_hopper() -> np.ndarray:
    from matplotlib.cbook import get_sample_data

    with get_sample_data("grace_hopper.jpg") as handle:
        return np.asarray(Image.open(handle).convert("RGB"))


@dataclasses.dataclass(frozen=True)
class SamplePhoto:
    """One photo of the built-in sample and the YFCC fields that make its line interesting."""

    photo_id: int
    load: Optional[Callable[[], np.ndarray]]  # None: missing from the mirror
    license_name: str
    user_nsid: str
    title: str
    tags: tuple[str, ...] = ()
    marker: int = 0


SAMPLE_PHOTOS = (
    SamplePhoto(9000001, _skimage("astronaut"), "Attribution License", "10000001@N01",
                "Astronaut Eileen Collins"),
    SamplePhoto(9000002, _grace_hopper, "Attribution-ShareAlike License", "10000002@N02",
                "Grace Hopper"),
    SamplePhoto(9000003, _skimage("camera"), "Attribution-NonCommercial License", "10000003@N03",
                "Cameraman"),
    SamplePhoto(9000004, _skimage("coffee"), "Attribution-NonCommercial-ShareAlike License",
                "10000004@N04", "Coffee"),
    SamplePhoto(9000005, _skimage("chelsea"), "Attribution License", "10000005@N05", "Chelsea"),
    SamplePhoto(9000006, _skimage("rocket"), "Attribution-NoDerivs License", "10000006@N06",
                "Rocket (NoDerivs: never used)"),
    SamplePhoto(9000007, _skimage("astronaut"), "Attribution License", "10000007@N07",
                "A video", marker=1),
    SamplePhoto(9000008, _skimage("astronaut"), "Attribution License", "10000008@N08",
                "Opted out by tag", tags=("space", "No_CV")),
    SamplePhoto(9000009, None, "Attribution License", "10000009@N09", "Missing from the mirror"),
)
MALFORMED_LINE = "this line\tis not\ta YFCC record"


def sample_record(photo: SamplePhoto, line_idx: int) -> YfccRecord:
    """The YFCC record of a sample photo (25-column fields, with its mirror hash)."""
    download_url = f"http://farm9.staticflickr.com/9999/{photo.photo_id}_5ec7e7a1b2.jpg"
    slug, license_url = LICENSES[photo.license_name]
    return YfccRecord(
        photo_id=photo.photo_id, photo_hash=photo_hash(download_url), user_nsid=photo.user_nsid,
        user_nickname=f"demo user {photo.user_nsid[:8]}", date_taken="2013-08-21 13:21:46.0",
        date_uploaded=1377635391, capture_device="", title=photo.title,
        description="Built-in <b>demo</b> photo", user_tags=photo.tags, machine_tags=(),
        longitude=None, latitude=None, accuracy=None,
        page_url=f"http://www.flickr.com/photos/{photo.user_nsid}/{photo.photo_id}/",
        download_url=download_url, license_name=photo.license_name, license_url=license_url,
        license=slug, server_id="9999", farm_id="9", secret="5ec7e7a1b2",
        secret_original="0000000000", original_extension="jpg", marker=photo.marker,
        line_idx=line_idx)


def mirror_path(mirror_root: str, hash_hex: str) -> str:
    """Where the mirror layout stores an image: data/images/{h[:3]}/{h[3:6]}/{h}.jpg."""
    return mirror_layout.mirror_path(mirror_root, hash_hex)


def build_sample(input_dir: str, photos: Sequence[SamplePhoto] = SAMPLE_PHOTOS) -> tuple[str, str]:
    """Write the local mirror and the YFCC lines; returns (yfcc_path, mirror_root)."""
    mirror_root = os.path.join(input_dir, "mirror")
    os.makedirs(mirror_root, exist_ok=True)
    lines = []
    for line_idx, photo in enumerate(photos):
        record = sample_record(photo, line_idx)
        if photo.load is not None:
            path = mirror_path(mirror_root, record.photo_hash)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(photo.load()).save(path, format="JPEG", quality=92)
        lines.append(format_line(record, columns=25))
    lines.insert(4, MALFORMED_LINE)
    yfcc_path = os.path.join(input_dir, "yfcc100m_sample.txt")
    with open(yfcc_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return yfcc_path, mirror_root


def _decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def draw_sample(members: dict) -> Image.Image:
    """One crop with the person mask tinted and the visible keypoints drawn."""
    image = _decode_png(members["image.png"]).astype(np.float32)
    background = _decode_png(members["maskrcnn_mask.png"]).astype(bool)
    tint = np.array([255.0, 40.0, 40.0])
    image[~background] = 0.7 * image[~background] + 0.3 * tint
    canvas = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    keypoints = np.load(io.BytesIO(members["keypoints.npy"]))
    for x, y, visible in keypoints:
        if visible > 0:
            cx, cy = x * CROP_WIDTH, y * CROP_HEIGHT
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), outline=(0, 255, 0), width=2)
    return canvas


def contact_sheet(dataset_dir: str, out_path: str, columns: int = 6) -> int:
    """Draw every sample of the dataset into one PNG; returns how many were drawn."""
    manifest = load_manifest(dataset_dir)
    tiles = []
    for shard in manifest["shards"]:
        for members in read_tar_shard(os.path.join(dataset_dir, shard["path"])):
            tile = Image.new("RGB", (CROP_WIDTH, CROP_HEIGHT + 28), "white")
            tile.paste(draw_sample(members), (0, 0))
            label = ImageDraw.Draw(tile)
            label.text((3, CROP_HEIGHT + 2), members["__key__"], fill="black")
            label.text((3, CROP_HEIGHT + 14), shard["license"], fill="black")
            tiles.append(tile)
    columns = max(1, min(columns, len(tiles)))
    rows = max(1, (len(tiles) + columns - 1) // columns)
    width = max(columns * (CROP_WIDTH + 4), LEGEND_WIDTH)
    sheet = Image.new("RGB", (width, LEGEND_HEIGHT + rows * (CROP_HEIGHT + 32)), "white")
    draw_legend(ImageDraw.Draw(sheet))
    for index, tile in enumerate(tiles):
        sheet.paste(tile, ((index % columns) * (CROP_WIDTH + 4),
                           LEGEND_HEIGHT + (index // columns) * (CROP_HEIGHT + 32)))
    sheet.save(out_path)
    return len(tiles)


# The legend strip above the tiles: what the marks on a crop mean.
LEGEND_HEIGHT, LEGEND_WIDTH = 64, 420
LEGEND = (
    ("tint", (235, 110, 110), "red tint: the person (where maskrcnn_mask.png is 0)"),
    ("dot", (0, 255, 0), "green circles: visible keypoints (keypoints.npy)"),
    ("text", (0, 0, 0), "under each crop: sample key (photo id x 1000 + person), licence"),
)


def draw_legend(draw: ImageDraw.ImageDraw) -> None:
    """Draw LEGEND at the top left: a swatch and a line of text per mark."""
    for row, (kind, color, text) in enumerate(LEGEND):
        top = 6 + 19 * row
        if kind == "tint":
            draw.rectangle((6, top, 18, top + 12), fill=color)
        elif kind == "dot":
            draw.ellipse((6, top, 18, top + 12), outline=color, width=2)
        else:
            draw.text((6, top), "Aa", fill=color)
        draw.text((26, top), text, fill=(0, 0, 0))


def run_job(module: str, *args: str) -> None:
    """Run `python -m beam_jobs.MODULE ARGS...` as a user would type it; its output is printed.
    Raises SystemExit naming the command when it fails."""
    command = [sys.executable, "-m", f"beam_jobs.{module}", *args]
    print("$ " + " ".join(shlex.quote(part) for part in ["python", *command[1:]]), flush=True)
    if subprocess.run(command, check=False).returncode != 0:
        raise SystemExit(f"demo: `{' '.join(command[1:])}` failed")


def run(argv: Optional[Sequence[str]] = None) -> str:
    """Build the sample, rebuild it with the lite annotator, verify, chart, draw the contact sheet;
    returns the dataset directory. Each job runs as its own `python -m beam_jobs.X` process."""
    parser = argparse.ArgumentParser(prog="python -m beam_jobs.demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="demo_out", help="demo directory (input/ and dataset/)")
    args, beam_args = parser.parse_known_args(argv)
    input_dir = os.path.join(args.output, "input")
    dataset_dir = os.path.join(args.output, "dataset")
    yfcc_path, mirror_root = build_sample(input_dir)
    run_job("rebuild", f"--yfcc={yfcc_path}", f"--output={dataset_dir}",
            f"--image_source=mirror:{os.path.abspath(mirror_root)}", "--annotator=lite", *beam_args)
    print()
    run_job("verify", f"--dataset={dataset_dir}")
    print()
    run_job("stats", f"--dataset={dataset_dir}", f"--plots_dir={args.output}")
    sheet = os.path.join(args.output, "contact_sheet.png")
    drawn = contact_sheet(dataset_dir, sheet)
    print(f"contact sheet with {drawn} samples: {sheet}")
    return dataset_dir


def main() -> None:
    run()


if __name__ == "__main__":
    main()
