"""Write FdhSamples as per-(licence, split) tar + Parquet shards: the Beam path and a one-process path.

Both paths share the same pure cores (`encode_for_writing`, the layout in `layout.py`,
`write_bucket`), so they give byte-identical shards for the same samples.

Beam (`WriteShards`): encode each sample once; count samples and bytes per group (cheap combine);
assign hash buckets; plan the parts of every bucket from (key, size) pairs only (a small shuffle);
group the encoded samples by bucket (the one large shuffle) and write each part to its final,
contiguous shard number.

One process (`write_dataset`): encoded samples are spilled to local temporary tars per group, then
per bucket, so memory holds at most one bucket (<= ~max_bytes) whatever the input size.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import tempfile
from typing import Any, Iterable, NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.records import METRICS_NAMESPACE, REJECTS_TAG, FdhSample
from transforms.rejects import reject
from transforms.s8_write.encode import SampleError, encode_sample, sample_row
from transforms.s8_write.layout import (MAX_BYTES, MAX_SAMPLES, bucket_of, dedupe_sorted,
                                        num_buckets, part_sizes, shard_offsets, tar_size)
from transforms.s8_write.run_outputs import finalize_dataset, resolve_crawl_time
from transforms.s8_write.shards import (TarShardWriter, read_tar_shard, shard_path,
                                        write_shard)
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


def write_bucket(output_dir: str, group: str, first_index: int, items: Iterable[EncodedSample],
                 max_samples: int = MAX_SAMPLES, max_bytes: int = MAX_BYTES
                 ) -> tuple[list[dict], list[EncodedSample]]:
    """Sort a bucket by key, cut it into parts and write each as shard first_index, first_index+1, ...

    Returns (manifest entries, duplicate samples dropped: a key seen twice keeps one copy).
    """
    license, split = group.split("/")
    kept, duplicates = dedupe_sorted(((item.key, item.size, item) for item in items))
    entries = []
    start = 0
    for index, count in enumerate(part_sizes([size for _, size, _ in kept], max_samples, max_bytes),
                                  start=first_index):
        part = [item for _, _, item in kept[start:start + count]]
        start += count
        entries.append(write_shard(output_dir, shard_path(license, split, index),
                                   (item.members for item in part), [item.row for item in part]))
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

_SPILL_ROW = "spillrow.json"


def _spill(writer: TarShardWriter, item: EncodedSample) -> None:
    writer.write({**item.members, _SPILL_ROW: json.dumps(item.row).encode("utf-8")})


def _unspill(members: dict) -> EncodedSample:
    members = dict(members)
    row = json.loads(members.pop(_SPILL_ROW))
    return EncodedSample(f"{row['license_slug']}/{row['split']}", members["__key__"],
                         tar_size(members), members, row)


class _close_all:
    """Close every writer on exit (abort them all when the block raised)."""

    def __init__(self, writers: list[TarShardWriter]):
        self._writers = writers

    def __enter__(self):
        return self._writers

    def __exit__(self, exc_type, exc, traceback):
        for writer in self._writers:
            writer.__exit__(exc_type, exc, traceback)


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
    written are counted in stats.json as `write.<reason>` and logged. Memory stays bounded by one
    bucket: encoded samples are spilled to temporary tars under `spill_dir` (default: system temp).
    Returns the manifest.
    """
    output_dir = output_dir.rstrip("/")
    crawl_time = resolve_crawl_time(output_dir, crawl_time)
    funnel = collections.Counter(counts or {})
    entries: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fdh-write-", dir=spill_dir) as spill:
        spills: dict[str, TarShardWriter] = {}
        totals: dict[str, list[int]] = {}
        try:
            for sample in samples:
                if val_fraction is not None:
                    sample = assign_split(sample, val_fraction, split_by, split_seed)
                try:
                    item = encode_for_writing(sample, no_embeddings, crawl_time)
                except SampleError as error:
                    logging.warning("not writing %s: %s", sample.key, error)
                    funnel[f"{STAGE}.{error.reason}"] += 1
                    continue
                if item.group not in spills:
                    spills[item.group] = TarShardWriter(
                        os.path.join(spill, f"group-{len(spills)}.tar"), spill, check_unique=False)
                    totals[item.group] = [0, 0]
                _spill(spills[item.group], item)
                totals[item.group][0] += 1
                totals[item.group][1] += item.size
        finally:
            for writer in spills.values():
                writer.close()
        for group in sorted(spills):
            group_spill = spills[group].path
            buckets = num_buckets(*totals[group], max_samples, max_bytes)
            bucket_spills = [group_spill]
            if buckets > 1:
                writers = [TarShardWriter(os.path.join(spill, f"{group.replace('/', '-')}-{b}.tar"),
                                          spill, check_unique=False) for b in range(buckets)]
                with _close_all(writers):
                    for members in read_tar_shard(group_spill):
                        writers[bucket_of(members["__key__"], buckets)].write(members)
                os.remove(group_spill)
                bucket_spills = [writer.path for writer in writers]
            next_index = 0
            for path in bucket_spills:
                items = [_unspill(members) for members in read_tar_shard(path)]
                written, duplicates = write_bucket(output_dir, group, next_index, items,
                                                   max_samples, max_bytes)
                del items
                os.remove(path)
                next_index += len(written)
                entries += written
                for item in duplicates:
                    logging.warning("duplicate sample key %s: kept one copy", item.key)
                    funnel[f"{STAGE}.duplicate_key"] += 1
    run_config = {"no_embeddings": bool(no_embeddings), "max_samples": int(max_samples),
                  "max_bytes": int(max_bytes), **(config or {})}
    return finalize_dataset(output_dir, entries, run_config, versions, crawl_time, dict(funnel))

