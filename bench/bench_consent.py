"""Bench the consent check's cost in Flickr API calls, and the clean-tag match in prefilter.

    .venv/bin/python bench/bench_consent.py [--tags 1000000]

* calls per 1,000 photos to check, against the loopback fake of the Flickr API
  (tests/flickr_api_fixture.py), for owner mixes (owners x photos to check x public photos
  each), with the per-user method choice against getInfo alone (ratio < 1: fewer calls), and the
  hours a rebuild of N photos would take at Flickr's 3,600 calls per hour per key.
* the prefilter's tag match: `find_tag` (Flickr's clean form) against the old
  `tag.strip().lower() in drop_tags`, over random YFCC-like tag lists (ratio = old / new time).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.flickr_api_fixture import API_KEY, mixed_world, serve  # noqa: E402
from transforms.consent import ConsentChecker, ConsentConfig, FlickrClient  # noqa: E402
from transforms.tags import clean_tag, find_tag  # noqa: E402

MIXES = {
    "one photo per owner": [(1000, 1, 50)],
    "rebuild-like": [(400, 1, 30), (100, 2, 80), (10, 40, 1200)],
    "prolific owners": [(20, 50, 5000)],
}
FLICKR_CALLS_PER_HOUR = 3600


def calls_for(groups, listing_min_photos: int) -> tuple[int, int]:
    """(photos checked, calls made) for a mix."""
    world, records = mixed_world(groups)
    fake = serve(world)
    try:
        client = FlickrClient(ConsentConfig(api_url=fake.url, api_key=API_KEY,
                                            requests_per_second=None,
                                            listing_min_photos=listing_min_photos))
        ConsentChecker(client).check_records(records)
    finally:
        fake.stop()
    return len(records), sum(client.calls.values())


def bench_calls() -> None:
    for name, groups in MIXES.items():
        photos, chosen = calls_for(groups, ConsentConfig.listing_min_photos)
        _, get_info = calls_for(groups, 10 ** 9)
        per_1000 = 1000 * chosen / photos
        print(f"{name:22s} calls per 1,000 photos: {per_1000:7.1f} (getInfo alone "
              f"{1000 * get_info / photos:.0f}; ratio {chosen / get_info:.2f}); 1.5M photos at "
              f"3,600/h: {1.5e6 * per_1000 / 1000 / FLICKR_CALLS_PER_HOUR:,.0f} h")


def bench_tags(count: int) -> None:
    rng = random.Random(0)
    words = ["people", "Portrait", "new york", "NYC", "2008", "café", "no cv", "Beach", "dog",
             "summer_vacation", "canon eos", "日本"]
    records = [tuple(rng.choice(words) for _ in range(rng.randint(0, 12))) for _ in range(count)]
    old_tags, new_tags = frozenset({"no_cv"}), frozenset({clean_tag("no_cv")})
    start = time.perf_counter()
    old = sum(1 for tags in records for tag in tags if tag.strip().lower() in old_tags)
    old_s = time.perf_counter() - start
    start = time.perf_counter()
    new = sum(1 for tags in records if find_tag(tags, new_tags) is not None)
    new_s = time.perf_counter() - start
    print(f"tag match over {count:,} records: old {old_s:.2f}s ({old} hits), clean form "
          f"{new_s:.2f}s ({new} hits); ratio old/new {old_s / new_s:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tags", type=int, default=1_000_000)
    args = parser.parse_args()
    bench_calls()
    bench_tags(args.tags)


if __name__ == "__main__":
    main()
