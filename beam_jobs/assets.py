"""List, download and verify the model assets the annotators need.

    python -m beam_jobs.assets list
    python -m beam_jobs.assets fetch  --model_dir=DIR [--names=a,b] [--no_embeddings]
    python -m beam_jobs.assets verify --model_dir=DIR [--names=a,b] [--no_embeddings]

DIR may be local or gs://. `fetch` downloads (with retries) and verifies each file against the
registry in transforms/assets.py; assets without a published checksum get their sha256 recorded in
DIR/assets.lock.json on first download (trust on first use) and checked against it afterwards.
Then run the job with the same --model_dir.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from apache_beam.io.filesystems import FileSystems

from transforms import assets

# What `--no_embeddings` leaves out (DensePose CSE and its data).
EMBEDDING_ASSETS = ("densepose_rcnn_R_101_FPN_DL_soft_s1x", "phi_smpl_27554_256")
# Needs detectron2 and is not used by default: fetched only when named.
OPTIONAL_ASSETS = ("mask_rcnn_X_101_32x8d_FPN_3x",)


def _selected(names: Optional[str], no_embeddings: bool) -> list[str]:
    if names:
        chosen = [name.strip() for name in names.split(",") if name.strip()]
        for name in chosen:
            assets.get_asset(name)  # unknown names fail before any download
        return chosen
    skip = set(OPTIONAL_ASSETS) | (set(EMBEDDING_ASSETS) if no_embeddings else set())
    return [asset.name for asset in assets.ASSETS if asset.name not in skip]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m beam_jobs.assets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("list", "fetch", "verify"))
    parser.add_argument("--model_dir", default=None,
                        help="local dir or gs:// prefix (default: $FDH_BEAM_CACHE or ~/.cache/fdh-beam/models)")
    parser.add_argument("--names", default=None,
                        help="comma-separated asset names (default: all but the optional ones)")
    parser.add_argument("--no_embeddings", action="store_true",
                        help="leave out the DensePose CSE assets (for --no_embeddings runs)")
    parser.add_argument("--timeout_s", type=float, default=60.0, help="per-request network timeout")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    model_dir = args.model_dir or assets.default_cache_dir()
    if args.command == "list":
        for asset in assets.ASSETS:
            print(f"{asset.name}\t{asset.filename}\t{asset.check_kind()}\t{asset.license}\t{asset.url}")
        return 0
    names = _selected(args.names, args.no_embeddings)
    if args.command == "fetch":
        for name, path in assets.fetch(names, model_dir, timeout_s=args.timeout_s).items():
            print(f"ok\t{name}\t{path}")
        return 0
    lock = assets.read_lock(model_dir)
    failures = 0
    for name in names:
        asset = assets.get_asset(name)
        path = assets.locate(name, model_dir)
        if not FileSystems.exists(path):
            print(f"MISSING\t{name}\t{path}")
            failures += 1
            continue
        try:
            digest, unpinned = assets.verify(asset, path, lock)
        except assets.ChecksumMismatchError as error:
            print(f"BAD\t{name}\t{error}")
            failures += 1
            continue
        note = "  (no checksum pinned: run fetch to record it)" if unpinned else ""
        print(f"ok\t{name}\t{digest}{note}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
