"""The schemas of a dataset's files: the shard Parquet rows, metadata.json entries, stats.json.

manifest.json: {"format_version", "config", "versions", "crawl_time", "shards": [entry...]}, one
entry per tar shard sorted by path (`SHARD_ENTRY_FIELDS`). metadata.json: FDH's {sample_key:
entry} in key order (`METADATA_FIELDS`). stats.json: `build_stats`.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import pyarrow as pa

# FDH's metadata.json field names (README "Metainfo"), plus the correctly spelt `category`.
METADATA_FIELDS = ("author", "category", "cateogry", "date_crawled", "date_taken", "date_uploaded",
                   "id", "license", "license_url", "photo_title", "photo_url", "unixtime_crawled",
                   "user_nsid", "yfcc100m_line_idx")

# One row per sample, beside each tar shard (same stem, .parquet).
PARQUET_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("photo_id", pa.int64()),
    ("person_index", pa.int32()),
    ("license_slug", pa.string()),
    ("split", pa.string()),
    # The FDH metadata.json fields, same names and types as in metadata.json.
    ("author", pa.string()),
    ("category", pa.string()),
    ("cateogry", pa.string()),
    ("date_crawled", pa.string()),
    ("date_taken", pa.string()),
    ("date_uploaded", pa.string()),
    ("id", pa.int64()),
    ("license", pa.string()),
    ("license_url", pa.string()),
    ("photo_title", pa.string()),
    ("photo_url", pa.string()),
    ("unixtime_crawled", pa.float64()),
    ("user_nsid", pa.string()),
    ("yfcc100m_line_idx", pa.string()),
    # Where the crop came from and how sure the models were.
    ("crop_x0", pa.int32()),
    ("crop_y0", pa.int32()),
    ("crop_x1", pa.int32()),
    ("crop_y1", pa.int32()),
    ("detection_score", pa.float32()),
    ("keypoint_scores", pa.list_(pa.float32())),
    ("annotator", pa.string()),
    ("source_sha256", pa.string()),
    # The consent check (issue 15): when Flickr was asked (UTC, ISO 8601) and the licence id and
    # slug it reported. Null with --consent_check=off; absent from datasets written before them.
    ("consent_checked_at", pa.string()),
    ("consent_license_id", pa.int32()),
    ("consent_license", pa.string()),
    ("shard", pa.string()),  # tar shard path relative to the dataset root
])

# The consent check's columns, in PARQUET_SCHEMA order (`ConsentResult.metadata()` fills them).
# Optional when reading: a dataset written before them lacks them, and every reader copes.
CONSENT_COLUMNS = ("consent_checked_at", "consent_license_id", "consent_license")

# Parquet columns the search needs (PARQUET_SCHEMA has many more).
KEY_COLUMN = "key"
USER_COLUMN = "user_nsid"
PHOTO_COLUMN = "photo_id"
SEARCH_COLUMNS = (KEY_COLUMN, USER_COLUMN, PHOTO_COLUMN)

# A manifest shard entry (`dataset.shards.shard_entry`).
SHARD_ENTRY_FIELDS = ("path", "sha256", "samples", "bytes", "license", "split", "parquet",
                      "parquet_sha256")


def build_stats(shards: Iterable[Mapping[str, Any]], counts: Optional[dict] = None) -> dict[str, Any]:
    """stats.json: the funnel counts and samples/bytes/shards per licence x split."""
    shards = list(shards)
    written: dict[str, dict[str, dict[str, int]]] = {}
    for entry in shards:
        cell = written.setdefault(entry["license"], {}).setdefault(
            entry["split"], {"samples": 0, "bytes": 0, "shards": 0})
        cell["samples"] += int(entry["samples"])
        cell["bytes"] += int(entry["bytes"])
        cell["shards"] += 1
    return {
        "funnel": {str(name): value for name, value in sorted((counts or {}).items())},
        "written": written,
        "totals": {"samples": sum(int(e["samples"]) for e in shards),
                   "bytes": sum(int(e["bytes"]) for e in shards), "shards": len(shards)},
    }
