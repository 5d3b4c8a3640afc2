"""Write FdhSamples as per-(licence, split) tar + Parquet shards: the Beam path and a one-process path.

Both paths share the same pure cores (`encode_for_writing`, the layout in `layout.py`,
`write_bucket`), so they give byte-identical shards for the same samples.

Beam (`WriteShards`): encode each sample once; count samples and bytes per group (cheap combine);
assign hash buckets; plan the parts of every bucket from (key, size) pairs only (a small shuffle);
group the encoded samples by bucket (the one large shuffle) and write each part to its final,
contiguous shard number.

One process (`write_dataset`): encoded samples are spilled to a local file per group, split into
a file per bucket, and each bucket is written in key order by reading its samples back by offset:
memory holds one sample, one shard's Parquet rows and one bucket's (key, size, offset) index
(~150 B per sample of that bucket), whatever the input size.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import pickle
import struct
import tempfile
from typing import Any, BinaryIO, Iterable, Iterator, NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.records import METRICS_NAMESPACE, REJECTS_TAG, FdhSample
from transforms.rejects import reject
from transforms.s8_write.encode import SampleError, encode_sample, sample_row
from transforms.s8_write.layout import (MAX_BYTES, MAX_SAMPLES, bucket_of, dedupe_sorted,
                                        num_buckets, part_sizes, shard_offsets, tar_size)
from transforms.s8_write.run_outputs import finalize_dataset, resolve_crawl_time
from transforms.s8_write.shards import shard_path, write_shard_items
from transforms.s8_write.split import DEFAULT_SPLIT_SEED, assign_split

STAGE = "write"


class EncodedSample(NamedTuple):
    """A sample ready for a shard: its group ("licence/split"), key, tar size, members, Parquet row."""

    group: str
    key: str
    size: int
    members: dict
    row: dict  # `sample_row` without the shard path (set when the shard is known)


def encode_for_writing(sample: FdhSample, no_embeddings: bool, crawl_time: float) -> EncodedSample:
    """Encode a sample once for writing; raises `SampleError` for a sample that cannot be written."""
    members = encode_sample(sample, no_embeddings=no_embeddings, crawl_time=crawl_time)
    row = sample_row(sample, "", crawl_time)
    return EncodedSample(f"{sample.record.license}/{sample.split}", sample.key, tar_size(members),
                         members, row)


def write_sorted_bucket(output_dir: str, group: str, first_index: int, sizes: Sequence[int],
                        items: Iterable[EncodedSample], max_samples: int = MAX_SAMPLES,
                        max_bytes: int = MAX_BYTES) -> list[dict]:
    """Cut a bucket's samples, already deduplicated and sorted by key, into parts and write each part
    as shard first_index, first_index+1, ...; returns the manifest entries.

    `sizes` are the samples' tar sizes in that order (they decide the parts); `items` yields the
    samples themselves in the same order and is consumed one sample at a time, so a caller can load
    them lazily (the one-process writer reads them back from its spill file).
    """
    license, split = group.split("/")
    items = iter(items)
    entries = []
    for index, count in enumerate(part_sizes(sizes, max_samples, max_bytes), start=first_index):
        entries.append(write_shard_items(output_dir, shard_path(license, split, index),
                                         ((item.members, item.row)
                                          for item in itertools.islice(items, count))))
    return entries


def write_bucket(output_dir: str, group: str, first_index: int, items: Iterable[EncodedSample],
                 max_samples: int = MAX_SAMPLES, max_bytes: int = MAX_BYTES
                 ) -> tuple[list[dict], list[EncodedSample]]:
    """Sort a bucket by key, cut it into parts and write each as shard first_index, first_index+1, ...

    Returns (manifest entries, duplicate samples dropped: a key seen twice keeps one copy).
    """
    kept, duplicates = dedupe_sorted(((item.key, item.size, item) for item in items))
    entries = write_sorted_bucket(output_dir, group, first_index, [size for _, size, _ in kept],
                                  (item for _, _, item in kept), max_samples, max_bytes)
    return entries, [item for _, _, item in duplicates]


def _duplicate_reject(item: EncodedSample):
    return reject(STAGE, "duplicate_key", item.key, f"sample {item.key} seen twice; kept one",
                  photo_id=item.row.get("photo_id"), user_nsid=item.row.get("user_nsid"))


class _EncodeFn(beam.DoFn):
    def __init__(self, no_embeddings: bool, crawl_time: float):
        self._no_embeddings = no_embeddings
        self._crawl_time = crawl_time

    def process(self, sample: FdhSample):
        try:
            yield encode_for_writing(sample, self._no_embeddings, self._crawl_time)
        except SampleError as error:
            yield reject(STAGE, error.reason, sample.key, error.detail,
                         photo_id=sample.record.photo_id, user_nsid=sample.record.user_nsid)
        except Exception as error:  # an encoder failure must not kill the job
            yield reject(STAGE, "encode_failed", sample.key, f"{type(error).__name__}: {error}",
                         photo_id=sample.record.photo_id, user_nsid=sample.record.user_nsid)


def _bucket_offsets(group: str, bucket_parts: Iterable[tuple[int, int]]):
    parts = dict(bucket_parts)
    for bucket, offset in shard_offsets(parts, max(parts) + 1).items():
        yield (group, bucket), offset


class _WriteBucketFn(beam.DoFn):
    def __init__(self, output_dir: str, max_samples: int, max_bytes: int):
        self._output_dir = output_dir
        self._max_samples = max_samples
        self._max_bytes = max_bytes

    def setup(self):
        self._shards = Metrics.counter(METRICS_NAMESPACE, "write.shards")
        self._samples = Metrics.counter(METRICS_NAMESPACE, "write.samples")
        self._bytes = Metrics.counter(METRICS_NAMESPACE, "write.bytes")

    def process(self, element, offsets):
        (group, bucket), items = element
        entries, duplicates = write_bucket(self._output_dir, group, offsets[(group, bucket)], items,
                                           self._max_samples, self._max_bytes)
        for item in duplicates:
            yield _duplicate_reject(item)
        for entry in entries:
            self._shards.inc()
            self._samples.inc(entry["samples"])
            self._bytes.inc(entry["bytes"])
            yield entry


def _sum_pairs(pairs):
    count = total = 0
    for c, b in pairs:
        count += c
        total += b
    return count, total


class WriteShards(beam.PTransform):
    """Write FdhSamples (split set) as OUT/{licence}/{split}/out-NNNNNN.tar + .parquet shards.

    Output: a PCollection of manifest entries (dicts: path, sha256, samples, bytes, license, split,
    parquet, parquet_sha256) for `WriteRunOutputs`. Samples that cannot be written become
    `Rejected` records (stage 'write'), available as `self.rejects` after the transform is applied.
    `self.config` holds the settings to record in the manifest config.
    """

    def __init__(self, output_dir: str, no_embeddings: bool = False, max_samples: int = MAX_SAMPLES,
                 max_bytes: int = MAX_BYTES, crawl_time: Optional[float] = None):
        super().__init__()
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        self._output_dir = output_dir.rstrip("/")
        self._no_embeddings = bool(no_embeddings)
        self._max_samples = int(max_samples)
        self._max_bytes = int(max_bytes)
        self._crawl_time = resolve_crawl_time(self._output_dir, crawl_time)
        self.rejects = None

    @property
    def config(self) -> dict[str, Any]:
        return {"no_embeddings": self._no_embeddings, "max_samples": self._max_samples,
                "max_bytes": self._max_bytes}

    def expand(self, samples):
        max_samples, max_bytes = self._max_samples, self._max_bytes
        encoded = samples | "Encode" >> beam.ParDo(
            _EncodeFn(self._no_embeddings, self._crawl_time)).with_outputs(REJECTS_TAG, main="encoded")
        good = encoded.encoded
        buckets = (
            good
            | "GroupSize" >> beam.Map(lambda item: (item.group, (1, item.size)))
            | "SumGroupSize" >> beam.CombinePerKey(_sum_pairs)
            | "NumBuckets" >> beam.MapTuple(
                lambda group, totals: (group, num_buckets(totals[0], totals[1], max_samples, max_bytes))))
        keyed = good | "AssignBucket" >> beam.Map(
            lambda item, buckets: ((item.group, bucket_of(item.key, buckets[item.group])), item),
            buckets=beam.pvalue.AsDict(buckets))
        offsets = (
            keyed
            | "KeySize" >> beam.MapTuple(lambda group_bucket, item: (group_bucket, (item.key, item.size)))
            | "GroupKeySizes" >> beam.GroupByKey()
            | "CountParts" >> beam.MapTuple(lambda group_bucket, key_sizes: (
                group_bucket[0], (group_bucket[1], len(part_sizes(
                    [size for _, size in dedupe_sorted(key_sizes)[0]], max_samples, max_bytes)))))
            | "GroupParts" >> beam.GroupByKey()
            | "Offsets" >> beam.FlatMapTuple(_bucket_offsets))
        written = (
            keyed
            | "GroupBucket" >> beam.GroupByKey()
            | "WriteBucket" >> beam.ParDo(
                _WriteBucketFn(self._output_dir, max_samples, max_bytes),
                beam.pvalue.AsDict(offsets)).with_outputs(REJECTS_TAG, main="shards"))
        self.rejects = ((encoded[REJECTS_TAG], written[REJECTS_TAG])
                        | "FlattenRejects" >> beam.Flatten())
        return written.shards


# --- one process ----------------------------------------------------------------------------

# A spill file is a sequence of records: header (key length, tar size, payload length), the key
# (UTF-8), then the payload: pickle of (group, members, row). The header lets a reader index a
# bucket's (key, size, offset) without loading any payload, then read the samples back in key
# order by seeking. Spill files are local, private to this process and deleted when it is done.
_SPILL_HEADER = struct.Struct("<IQQ")
MAX_OPEN_SPILLS = 128  # bucket spill files open at once while splitting a group (file handles)


def _spill(handle: BinaryIO, item: EncodedSample) -> None:
    key = item.key.encode("utf-8")
    payload = pickle.dumps((item.group, item.members, item.row), protocol=pickle.HIGHEST_PROTOCOL)
    handle.write(_SPILL_HEADER.pack(len(key), item.size, len(payload)) + key)
    handle.write(payload)


def _spill_records(path: str) -> Iterator[tuple[str, int, int, int]]:
    """(key, tar size, record offset, record length) of every record, in file order, payloads skipped."""
    with open(path, "rb") as handle:
        offset = 0
        while header := handle.read(_SPILL_HEADER.size):
            key_length, size, payload_length = _SPILL_HEADER.unpack(header)
            key = handle.read(key_length).decode("utf-8")
            length = _SPILL_HEADER.size + key_length + payload_length
            yield key, size, offset, length
            offset += length
            handle.seek(offset)


def _read_spilled(handle: BinaryIO, offset: int) -> EncodedSample:
    handle.seek(offset)
    key_length, size, payload_length = _SPILL_HEADER.unpack(handle.read(_SPILL_HEADER.size))
    key = handle.read(key_length).decode("utf-8")
    group, members, row = pickle.loads(handle.read(payload_length))
    return EncodedSample(group, key, size, members, row)


def _split_spill(path: str, buckets: int, first: int = 0, stop: Optional[int] = None
                 ) -> Iterator[tuple[int, str]]:
    """Split a group's spill file into one file per bucket; yields (bucket, path) in bucket order.

    Covers buckets first..stop-1 (all of them by default) and deletes `path`. At most
    MAX_OPEN_SPILLS files are written at once: more buckets than that are split into ranges
    first, then each range again.
    """
    stop = buckets if stop is None else stop
    if stop - first == 1:
        yield first, path
        return
    step = -(-(stop - first) // MAX_OPEN_SPILLS)
    starts = range(first, stop, step)
    parts = [f"{path}.{start}" for start in starts]
    with open(path, "rb") as source, contextlib.ExitStack() as stack:
        sinks = [stack.enter_context(open(part, "wb")) for part in parts]
        for key, _, offset, length in _spill_records(path):
            source.seek(offset)
            sinks[(bucket_of(key, buckets) - first) // step].write(source.read(length))
    os.remove(path)
    for start, part in zip(starts, parts):
        if step == 1:
            yield start, part
        else:
            yield from _split_spill(part, buckets, start, min(start + step, stop))


def _write_spilled_bucket(output_dir: str, group: str, first_index: int, path: str,
                          max_samples: int, max_bytes: int) -> tuple[list[dict], list[str]]:
    """`write_bucket` for a bucket spill file, holding only its (key, size, offset) index in memory.

    Returns (manifest entries, keys of the duplicates dropped).
    """
    kept, duplicates = dedupe_sorted((key, size, offset) for key, size, offset, _ in _spill_records(path))
    with open(path, "rb") as handle:
        entries = write_sorted_bucket(output_dir, group, first_index, [size for _, size, _ in kept],
                                      (_read_spilled(handle, offset) for _, _, offset in kept),
                                      max_samples, max_bytes)
    return entries, [key for key, _, _ in duplicates]


def write_dataset(output_dir: str, samples: Iterable[FdhSample], *, no_embeddings: bool = False,
                  max_samples: int = MAX_SAMPLES, max_bytes: int = MAX_BYTES,
                  crawl_time: Optional[float] = None, config: Optional[dict] = None,
                  versions: Optional[dict] = None, counts: Optional[dict] = None,
                  val_fraction: Optional[float] = None, split_by: str = "user_nsid",
                  split_seed: str = DEFAULT_SPLIT_SEED, spill_dir: Optional[str] = None
                  ) -> dict[str, Any]:
    """Write a whole dataset (shards, Parquet, metadata.json, stats.json, manifest.json) in one process.

    Gives the same shards as `AssignSplit | WriteShards | WriteRunOutputs`. Samples keep their split
    unless `val_fraction` is given (then `AssignSplit`'s hash sets it). Samples that cannot be
    written are counted in stats.json as `write.<reason>` and logged. Memory does not grow with the
    input: encoded samples are spilled to local files under `spill_dir` (default: system temp; it
    needs about twice the encoded size of the largest licence/split group), and only one bucket's
    (key, size, offset) index, one sample and one shard's Parquet rows are held at a time.
    Returns the manifest.
    """
    output_dir = output_dir.rstrip("/")
    crawl_time = resolve_crawl_time(output_dir, crawl_time)
    funnel = collections.Counter(counts or {})
    entries: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fdh-write-", dir=spill_dir) as spill:
        spills: dict[str, str] = {}
        totals: dict[str, list[int]] = {}
        with contextlib.ExitStack() as stack:
            handles: dict[str, BinaryIO] = {}
            for sample in samples:
                if val_fraction is not None:
                    sample = assign_split(sample, val_fraction, split_by, split_seed)
                try:
                    item = encode_for_writing(sample, no_embeddings, crawl_time)
                except SampleError as error:
                    logging.warning("not writing %s: %s", sample.key, error)
                    funnel[f"{STAGE}.{error.reason}"] += 1
                    continue
                if item.group not in handles:
                    spills[item.group] = os.path.join(spill, f"group-{len(spills)}")
                    handles[item.group] = stack.enter_context(open(spills[item.group], "wb"))
                    totals[item.group] = [0, 0]
                _spill(handles[item.group], item)
                totals[item.group][0] += 1
                totals[item.group][1] += item.size
        for group in sorted(spills):
            buckets = num_buckets(*totals[group], max_samples, max_bytes)
            next_index = 0
            for _, path in _split_spill(spills[group], buckets):
                written, duplicates = _write_spilled_bucket(output_dir, group, next_index, path,
                                                            max_samples, max_bytes)
                os.remove(path)
                next_index += len(written)
                entries += written
                for key in duplicates:
                    logging.warning("duplicate sample key %s: kept one copy", key)
                    funnel[f"{STAGE}.duplicate_key"] += 1
    run_config = {"no_embeddings": bool(no_embeddings), "max_samples": int(max_samples),
                  "max_bytes": int(max_bytes), **(config or {})}
    return finalize_dataset(output_dir, entries, run_config, versions, crawl_time, dict(funnel))

