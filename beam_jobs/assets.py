"""List, fetch and verify what a model dir must hold for the annotators (local dir or gs://).

    python -m beam_jobs.assets list
    python -m beam_jobs.assets fetch  --model_dir=DIR [--names=a,b] [--no_embeddings]
    python -m beam_jobs.assets verify --model_dir=DIR [--names=a,b] [--no_embeddings]

ACTION is the first argument (list, fetch or verify). `fetch` prepares DIR in one command: it
downloads (with retries) and verifies each registered asset of transforms/assets.py, then builds
part_table.npy from the two DensePose .mat assets (no download needed for that). Assets without a
published checksum, and the part table, get their sha256 recorded in DIR/assets.lock.json the
first time (trust on first use) and checked against it afterwards. Offline, put the files named
in the error lines into DIR by hand and run fetch again. `verify` checks that DIR is complete and
every checksum holds. Both print one line per entry and exit 2 when anything is missing or bad.
Then run the job with the same --model_dir.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from beam_jobs.common import JobOptions, UsageError, run_main, split_job_flags, split_list
from beam_jobs.model_dir import PART_TABLE, check_model_dir, entry_names, prepare
from transforms import assets

ACTIONS = ("list", "fetch", "verify")


class AssetsOptions(JobOptions):
    """Flags of the assets job."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("action", choices=ACTIONS,
                            help="list: the registry; fetch: fill --model_dir; verify: check it")
        parser.add_argument("--model_dir", default=None,
                            help="local dir or gs:// prefix (default: $FDH_BEAM_CACHE or "
                                 "~/.cache/fdh-beam/models)")
        parser.add_argument("--names", default=None,
                            help=f"comma-separated asset names, `{PART_TABLE}` for the part table "
                                 "(default: all but the optional ones, plus the part table)")
        parser.add_argument("--no_embeddings", action="store_true",
                            help="leave out DensePose CSE, its data and the part table (for "
                                 "--no_embeddings runs)")
        parser.add_argument("--timeout_s", type=float, default=60.0,
                            help="per-request network timeout in seconds")
        parser.add_argument("--retries", type=int, default=4,
                            help="retries per download (backoff; 429/5xx/resets)")


def _print_registry() -> int:
    for asset in assets.ASSETS:
        print(f"{asset.name}\t{asset.filename}\t{asset.check_kind()}\t{asset.license}\t{asset.url}")
    print(f"{PART_TABLE}\tpart_table.npy\tlock-file (built by fetch)\tderived\t(no download)")
    return 0


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Run one action; returns the exit status (2 when an entry is missing or bad)."""
    options, _ = split_job_flags(AssetsOptions, argv, __doc__)
    if options.action == "list":
        return _print_registry()
    model_dir = options.model_dir or assets.default_cache_dir()
    try:
        names = entry_names(split_list(options.names) if options.names else None,
                            options.no_embeddings)
    except KeyError as error:
        raise UsageError(error.args[0]) from error
    if options.action == "fetch":
        statuses = prepare(model_dir, names, options.timeout_s, options.retries)
    else:
        statuses = check_model_dir(model_dir, names)
    for status in statuses:
        print(status.line(), file=sys.stdout if status.ok else sys.stderr)
    return 0 if all(status.ok for status in statuses) else 2


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point: exit status 2 when an entry is missing or bad; a usage error is one line."""
    run_main(run, argv, exit_code=lambda status: status)


if __name__ == "__main__":
    main()
