"""Bench: search_user over Parquet shards vs FDH's way (json.load of metadata.json and a scan).

    .venv/bin/python bench/bench_search_user.py              # 200k rows (about a minute)
    .venv/bin/python bench/bench_search_user.py --rows 1870000   # FDH's full size

Builds synthetic metadata for `--rows` samples in a temp dir, laid out as the writer lays it out:
shard Parquet files of 3,000 rows with the full PARQUET_SCHEMA (so reading only three columns
matters) listed in a manifest.json, and a metadata.json with FDH's 14 fields per entry. Then it
searches for one user (a few samples) both ways in the same run and prints the times and ratio.
Both searches must find the same keys.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from dataset.metadata import write_metadata_json  # noqa: E402
from dataset.schema import METADATA_FIELDS, PARQUET_SCHEMA  # noqa: E402
from dataset.search import metadata_matches, parquet_files, parquet_matches  # noqa: E402
from transforms.opt_out import OptOut  # noqa: E402

SHARD_ROWS = 3000
LICENSES = (("cc-by-2", "Attribution License"), ("cc-by-nc-sa-2", "Attribution-NonCommercial-ShareAlike License"))


def synthetic_rows(count: int, users: int, seed: int = 0):
    """Rows in PARQUET_SCHEMA order, deterministic; one in `users` NSIDs per row."""
    rng = random.Random(seed)
    for index in range(count):
        photo_id = 10_000_000 + index // 2
        key = f"{photo_id}_{index % 2}"
        slug, name = LICENSES[index % 2]
        nsid = f"{rng.randrange(users):08d}@N0{index % 8}"
        yield {
            "key": key, "photo_id": photo_id, "person_index": index % 2, "license_slug": slug,
            "split": "train", "author": f"author {nsid}", "category": "train", "cateogry": "train",
            "date_crawled": "2022-03-01", "date_taken": "2011-06-05 14:03:22.0",
            "date_uploaded": "1307302345", "id": photo_id, "license": name,
            "license_url": "http://creativecommons.org/licenses/by/2.0/",
            "photo_title": f"photo title number {index}",
            "photo_url": f"http://www.flickr.com/photos/{nsid}/{photo_id}/",
            "unixtime_crawled": 1646092800.0, "user_nsid": nsid, "yfcc100m_line_idx": str(index),
            "crop_x0": 10, "crop_y0": 20, "crop_x1": 170, "crop_y1": 308, "detection_score": 0.98,
            "keypoint_scores": [0.9] * 17, "annotator": "fdh",
            "source_sha256": f"{index:064x}", "shard": "",
        }


def build(root: str, count: int, users: int) -> str:
    """Write the Parquet shards, manifest.json and metadata.json; returns the searched NSID."""
    shards, metadata, batch = [], {}, []
    target = None

    def flush():
        relative = f"cc-by-2/train/out-{len(shards):06d}"
        os.makedirs(os.path.join(root, "cc-by-2/train"), exist_ok=True)
        for row in batch:
            row["shard"] = relative + ".tar"
        pq.write_table(pa.Table.from_pylist(batch, schema=PARQUET_SCHEMA),
                       os.path.join(root, relative + ".parquet"), compression="zstd")
        shards.append({"path": relative + ".tar", "parquet": relative + ".parquet",
                       "samples": len(batch), "bytes": 0, "license": "cc-by-2", "split": "train"})
        batch.clear()

    for row in synthetic_rows(count, users):
        target = target or row["user_nsid"]
        metadata[row["key"]] = {name: row[name] for name in METADATA_FIELDS}
        batch.append(row)
        if len(batch) == SHARD_ROWS:
            flush()
    if batch:
        flush()
    with open(os.path.join(root, "manifest.json"), "w") as handle:
        json.dump({"shards": shards}, handle)
    write_metadata_json(root, sorted(metadata.items()))  # the writer's own layout (indent=1)
    return target


def fdh_search(path: str, user_nsid: str) -> list[str]:
    """FDH's search_user.py: json.load the whole file, then scan every entry."""
    with open(path) as handle:
        data = json.load(handle)
    return [key for key, item in data.items() if item["user_nsid"] == user_nsid]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=None,
                        help="distinct NSIDs (default rows/5, so a user has ~5 samples)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    users = args.users or max(1, args.rows // 5)
    with tempfile.TemporaryDirectory(prefix="bench-search-") as root:
        started = time.perf_counter()
        nsid = build(root, args.rows, users)
        size = os.path.getsize(os.path.join(root, "metadata.json"))
        print(f"built {args.rows:,} rows in {time.perf_counter() - started:.1f} s: metadata.json "
              f"{size / 2**20:.0f} MiB, {len(parquet_files(root))} Parquet shards")
        query = OptOut(frozenset([nsid]))
        fdh_times, ours_times, json_times = [], [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            expected = fdh_search(os.path.join(root, "metadata.json"), nsid)
            fdh_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            found = [m.key for m in parquet_matches(parquet_files(root), query)]
            ours_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        with open(os.path.join(root, "metadata.json")) as handle:
            via_json = [m.key for m in metadata_matches(json.load(handle), query)]
        json_times.append(time.perf_counter() - started)
        assert found == sorted(expected) == via_json, (found, expected, via_json)
        fdh, ours = min(fdh_times), min(ours_times)
        print(f"searched user {nsid}: {len(found)} samples")
        print(f"FDH json.load + scan:            {fdh:8.3f} s (best of {args.repeats})")
        print(f"ours, metadata.json input:       {min(json_times):8.3f} s (once)")
        print(f"ours, Parquet (3 cols, filter):  {ours:8.3f} s (best of {args.repeats})")
        print(f"speed-up Parquet vs FDH: {fdh / ours:.1f}x on {args.rows:,} rows")


if __name__ == "__main__":
    main()
