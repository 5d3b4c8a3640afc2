"""Build the body-part table of the smpl_27554 CSE mesh (needs the network, or local copies).

    python -m beam_jobs.part_table --output=MODEL_DIR
    python -m beam_jobs.part_table --output=MODEL_DIR --subdiv=SMPL_subdiv.mat \\
        --transform=SMPL_SUBDIV_TRANSFORM.mat [--meshcapade=smpl_vert_segmentation.json]

Writes MODEL_DIR/part_table.npy (uint32 part bitmask per vertex, see transforms/s6_select/parts.py)
and part_table.json (part bits, provenance, sha256 of the inputs, vertex counts per part).
Inputs default to DensePose's public files; a Meshcapade segmentation is used only when the user
supplies it (its licence is unstated, so the project never ships or downloads it).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import urllib.request
from typing import Optional, Sequence

from transforms.assets import get_asset
from transforms.s6_select import parts

SUBDIV_URL = get_asset(parts.SUBDIV_ASSET).url
SUBDIV_TRANSFORM_URL = get_asset(parts.SUBDIV_TRANSFORM_ASSET).url


def read_source(source: str, timeout_s: float = 120.0) -> bytes:
    """Bytes of an http(s) URL or of a path Beam's FileSystems can open (local, gs://)."""
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=timeout_s) as response:  # noqa: S310 (fixed URLs)
            return response.read()
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(source) as handle:
        return handle.read()


def build(output: str, subdiv: str = SUBDIV_URL,
          transform: str = SUBDIV_TRANSFORM_URL, meshcapade: Optional[str] = None,
          neck_distance: Optional[float] = None) -> str:
    """Fetch the inputs, build the table, write it; returns the .npy path."""
    inputs = {"subdiv": subdiv, "transform": transform}
    if meshcapade:
        inputs["meshcapade"] = meshcapade
    data = {name: read_source(source) for name, source in inputs.items()}
    if meshcapade:
        table, info = parts.build_from_meshcapade(data["meshcapade"], data["subdiv"], data["transform"])
    else:
        table, info = parts.build_from_densepose(data["subdiv"], data["transform"], neck_distance)
    info["inputs"] = {name: {"source": inputs[name], "sha256": hashlib.sha256(blob).hexdigest()}
                      for name, blob in data.items()}
    path = parts.save_part_table(table, output, info)
    logging.info("wrote %s: %s", path, {k: v for k, v in info.items() if k.startswith("count_")})
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="model directory (local or gs://)")
    parser.add_argument("--subdiv", default=SUBDIV_URL, help="SMPL_subdiv.mat URL or path")
    parser.add_argument("--transform", default=SUBDIV_TRANSFORM_URL,
                        help="SMPL_SUBDIV_TRANSFORM.mat URL or path")
    parser.add_argument("--meshcapade", default=None,
                        help="optional smpl_vert_segmentation.json (user-supplied) to lift instead")
    parser.add_argument("--neck_distance", type=float, default=None,
                        help="neck band radius in mesh units (default: 5%% of the mesh height)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(build(args.output, args.subdiv, args.transform, args.meshcapade, args.neck_distance))


if __name__ == "__main__":
    main()
