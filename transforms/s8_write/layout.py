"""Deterministic shard layout: which shard of its (licence, split) group each sample goes to.

1. Per group, count the samples and sum their exact tar sizes.
2. The group gets `n = max(ceil(count / (FILL * max_samples)), ceil(bytes / (FILL * max_bytes)))`
   buckets; a sample's bucket is `sha256(key) mod n`, so it never depends on the input order or on
   how the work was split between workers. FILL (0.9) leaves room for the spread of a hash.
3. A bucket is sorted by key and cut greedily into parts of at most `max_samples` samples and
   `max_bytes` bytes (header, padding and end-of-archive blocks counted exactly). Almost always a
   bucket is one part; when the hash spread overfills one, it becomes two or more parts.
4. Shard numbers are contiguous from 000000 within the group: bucket b's first part gets the sum of
   the part counts of buckets 0..b-1 (an empty bucket takes no number).
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable, Sequence

FILL = 0.9
TAR_BLOCK = 512
TAR_RECORD = 10240  # tarfile pads the archive to a multiple of this (end blocks included)
MAX_SAMPLES = 3000  # FDH download.py: shards roll at 3,000 samples or 200 MiB
MAX_BYTES = 200 * 2**20


def tar_size(members: dict) -> int:
    """Exact bytes the sample's members take in a tar: a header block each plus padded data."""
    total = 0
    for extension, data in members.items():
        if extension.startswith("__"):
            continue
        length = len(data.encode("utf-8")) if isinstance(data, str) else len(data)
        total += TAR_BLOCK + -(-length // TAR_BLOCK) * TAR_BLOCK
    return total


def num_buckets(count: int, total_bytes: int, max_samples: int = MAX_SAMPLES,
                max_bytes: int = MAX_BYTES) -> int:
    """How many hash buckets a group of `count` samples and `total_bytes` gets (0 when empty)."""
    if count <= 0:
        return 0
    by_count = math.ceil(count / max(1.0, FILL * max_samples))
    by_bytes = math.ceil(total_bytes / max(1.0, FILL * (max_bytes - TAR_RECORD)))
    return max(1, by_count, by_bytes)


def bucket_of(key: str, buckets: int) -> int:
    """The hash bucket of a sample key (stable across runs, machines and Python versions)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def part_sizes(sizes: Sequence[int], max_samples: int = MAX_SAMPLES,
               max_bytes: int = MAX_BYTES) -> list[int]:
    """Cut samples (tar sizes, in key order) greedily into parts; returns samples per part.

    A part closes when it holds `max_samples` samples or the next sample would push the tar
    (end-of-archive and record padding included) past `max_bytes`. A single sample bigger than
    `max_bytes` gets a part of its own.
    """
    parts: list[int] = []
    count = used = 0
    budget = max_bytes - TAR_RECORD
    for size in sizes:
        if count and (count >= max_samples or used + size > budget):
            parts.append(count)
            count = used = 0
        count += 1
        used += size
    if count:
        parts.append(count)
    return parts


def shard_offsets(parts_per_bucket: dict[int, int], buckets: int) -> dict[int, int]:
    """First shard number of each bucket: contiguous numbering in bucket order."""
    offsets: dict[int, int] = {}
    next_index = 0
    for bucket in range(buckets):
        offsets[bucket] = next_index
        next_index += parts_per_bucket.get(bucket, 0)
    return offsets


def dedupe_sorted(items: Iterable, key=lambda item: item[0]) -> tuple[list, list]:
    """Sort by (key, size) and keep the first item per key; returns (kept, duplicates)."""
    kept: list = []
    duplicates: list = []
    last = None
    for item in sorted(items, key=lambda item: (key(item), item[1])):
        if key(item) == last:
            duplicates.append(item)
        else:
            kept.append(item)
            last = key(item)
    return kept, duplicates
