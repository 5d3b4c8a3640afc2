"""Bench `beam_jobs.recheck`'s cost in Flickr API calls per 1,000 kept photos, end to end.

    .venv/bin/python bench/bench_recheck.py [--mix rebuild-like]

Builds a dataset of 1,000 kept photos (one sample each) with the project's writer, for an owner
mix of bench_consent.py (owners x photos in the dataset x public photos each on Flickr), serves
that world from the loopback fake of the Flickr API (tests/flickr_api_fixture.py), runs the
recheck job on it and prints the calls it made (consent.py counts them) per 1,000 kept photos,
against getInfo alone (one call per photo; ratio < 1: fewer calls), and the hours a recheck of
FDH's ~1.43M kept photos (1.86M samples / 1.3 samples per photo, beam_jobs/plan.py) takes at
Flickr's documented 3,600 calls per hour per key.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_consent import FLICKR_CALLS_PER_HOUR, MIXES  # noqa: E402
from beam_jobs import recheck  # noqa: E402
from beam_jobs.plan import Assumptions, plan  # noqa: E402
from tests.beam_writer import write_with_beam  # noqa: E402
from tests.factories import make_sample, replace  # noqa: E402
from tests.flickr_api_fixture import API_KEY, mixed_world, serve  # noqa: E402


def fdh_kept_photos() -> float:
    """beam_jobs.plan's kept photos for FDH's four licences (its default assumptions)."""
    from beam_jobs.plan import FDH_CANDIDATES

    return plan(FDH_CANDIDATES, FDH_CANDIDATES, Assumptions()).kept_photos


def flat_sample(photo_id: int, user_nsid: str):
    """A no-embeddings sample with a flat image: only the rows matter here, and flat PNGs are
    small and quick to write."""
    sample = make_sample(photo_id, 0, with_embeddings=False, user_nsid=user_nsid)
    return replace(sample, image=np.zeros_like(sample.image))


def bench(mix: str) -> None:
    world, records = mixed_world(MIXES[mix])
    with tempfile.TemporaryDirectory() as root:
        out = os.path.join(root, "dataset")
        write_with_beam(out, (flat_sample(r.photo_id, r.user_nsid) for r in records),
                        max_samples=250, no_embeddings=True)
        fake = serve(world)
        try:
            start = time.perf_counter()
            report = recheck.run([f"--dataset={out}", f"--flickr_api_key={API_KEY}",
                                  f"--flickr_api_url={fake.url}",
                                  "--flickr_requests_per_second=100000"])
            seconds = time.perf_counter() - start
        finally:
            fake.stop()
    calls = sum(report["api_calls"].values())
    per_1000 = 1000 * calls / report["photos_kept"]
    kept = fdh_kept_photos()
    print(f"{mix}: {report['photos_kept']} kept photos of {len(records)}, calls {report['api_calls']}"
          f"; per 1,000 kept photos {per_1000:.1f} (getInfo alone 1000; ratio {per_1000 / 1000:.2f})"
          f"; job {seconds:.1f} s unthrottled; FDH's {kept:,.0f} kept photos at "
          f"{FLICKR_CALLS_PER_HOUR:,}/h: {kept * per_1000 / 1000 / FLICKR_CALLS_PER_HOUR:,.0f} h")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", choices=sorted(MIXES), action="append")
    for mix in parser.parse_args().mix or ["one photo per owner", "rebuild-like"]:
        bench(mix)


if __name__ == "__main__":
    main()
