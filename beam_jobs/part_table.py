"""Build the body-part table of the smpl_27554 CSE mesh into a model dir.

    python -m beam_jobs.part_table --output=MODEL_DIR
    python -m beam_jobs.part_table --output=MODEL_DIR --subdiv=SMPL_subdiv.mat \\
        --transform=SMPL_SUBDIV_TRANSFORM.mat [--meshcapade=smpl_vert_segmentation.json]

Writes MODEL_DIR/part_table.npy (uint32 part bitmask per vertex, see transforms/s6_select/parts.py)
and part_table.json (part bits, provenance, sha256 of the inputs, vertex counts per part), and
records the table's sha256 in MODEL_DIR/assets.lock.json. `python -m beam_jobs.assets fetch`
does this too (from the .mat files in the model dir); use this job to rebuild the table from
other inputs. Inputs default to DensePose's public files (needs the network); a Meshcapade
segmentation is used only when the user supplies it (its licence is unstated, so the project
never ships or downloads it).
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from beam_jobs.common import JobOptions, run_main, split_job_flags
from beam_jobs.model_dir import build_part_table
from transforms.assets import get_asset
from transforms.s6_select import parts

SUBDIV_URL = get_asset(parts.SUBDIV_ASSET).url
SUBDIV_TRANSFORM_URL = get_asset(parts.SUBDIV_TRANSFORM_ASSET).url


class PartTableOptions(JobOptions):
    """Flags of the part_table job."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--output", required=True, help="model directory (local or gs://)")
        parser.add_argument("--subdiv", default=SUBDIV_URL, help="SMPL_subdiv.mat URL or path")
        parser.add_argument("--transform", default=SUBDIV_TRANSFORM_URL,
                            help="SMPL_SUBDIV_TRANSFORM.mat URL or path")
        parser.add_argument("--meshcapade", default=None,
                            help="optional smpl_vert_segmentation.json (user-supplied) to lift instead")
        parser.add_argument("--neck_distance", type=float, default=None,
                            help="neck band radius in mesh units (default: 5%% of the mesh height)")


def run(argv: Optional[Sequence[str]] = None) -> str:
    """Build the part table into --output; returns (and prints) where it was written."""
    options, _ = split_job_flags(PartTableOptions, argv, __doc__)
    written = build_part_table(options.output, options.subdiv, options.transform,
                               options.meshcapade, options.neck_distance)
    print(written)
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(run, argv)


if __name__ == "__main__":
    main()
