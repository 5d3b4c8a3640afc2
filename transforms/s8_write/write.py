"""Write FdhSamples as per-(licence, split) tar + Parquet shards with Beam (`WriteShards`).

Encode each sample once; count samples and bytes per group (cheap combine); assign hash buckets;
plan the parts of every bucket from (key, size) pairs only (a small shuffle); group the encoded
samples by bucket (the one large shuffle) and write each part to its final, contiguous shard
number. The pure cores (`encode_for_writing`, the layout in `layout.py`, `write_bucket`) are
tested directly; the file format itself is `dataset`'s.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from dataset.layout import shard_path
from dataset.shards import write_shard_items
from transforms.records import METRICS_NAMESPACE, REJECTS_TAG, FdhSample
from transforms.rejects import reject
from transforms.s8_write.encode import SampleError, encode_sample, sample_row
from transforms.s8_write.layout import (MAX_BYTES, MAX_SAMPLES, bucket_of, dedupe_sorted,
                                        num_buckets, part_sizes, shard_offsets, tar_size)
from transforms.s8_write.run_outputs import resolve_crawl_time
from transforms.spill import Spilled, SpillValues, load
from transforms.stage import StageDoFn, StageOutput, stage_output

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
    samples themselves in the same order and is consumed one sample at a time.
    """
    license, split = group.split("/")
    items = iter(items)
    entries = []
    for index, count in enumerate(part_sizes(sizes, max_samples, max_bytes), start=first_index):
        entries.append(write_shard_items(output_dir, shard_path(license, split, index),
                                         ((item.members, item.row)
                                          for item in itertools.islice(items, count))))
    return entries


class SpilledSample(NamedTuple):
    """An EncodedSample waiting in a staging file (`transforms.spill`): what the writer plans
    with (group, key, size) and where the rest is."""

    group: str
    key: str
    size: int
    spilled: Spilled


def load_sample(item: Any) -> EncodedSample:
    """The EncodedSample of a SpilledSample (an EncodedSample as is)."""
    return load(item.spilled) if isinstance(item, SpilledSample) else item


def write_bucket(output_dir: str, group: str, first_index: int, items: Iterable[Any],
                 max_samples: int = MAX_SAMPLES, max_bytes: int = MAX_BYTES
                 ) -> tuple[list[dict], list[EncodedSample]]:
    """Sort a bucket by key, cut it into parts and write each as shard first_index, first_index+1, ...

    `items` are EncodedSamples or SpilledSamples (loaded one at a time as they are written).
    Returns (manifest entries, duplicate samples dropped: a key seen twice keeps one copy).
    """
    kept, duplicates = dedupe_sorted(((item.key, item.size, item) for item in items))
    entries = write_sorted_bucket(output_dir, group, first_index, [size for _, size, _ in kept],
                                  (load_sample(item) for _, _, item in kept), max_samples,
                                  max_bytes)
    return entries, [load_sample(item) for _, _, item in duplicates]


def _duplicate_reject(item: EncodedSample):
    return reject(STAGE, "duplicate_key", item.key, f"sample {item.key} seen twice; kept one",
                  photo_id=item.row.get("photo_id"), user_nsid=item.row.get("user_nsid"))


class _EncodeFn(StageDoFn):
    """FdhSample -> EncodedSample; a sample that does not fit FDH's layout is a reject with its
    reason, any other failure a `write.error` reject (the StageDoFn policy)."""

    stage = STAGE

    def __init__(self, no_embeddings: bool, crawl_time: float):
        self._no_embeddings = no_embeddings
        self._crawl_time = crawl_time

    def process_element(self, sample: FdhSample):
        try:
            yield encode_for_writing(sample, self._no_embeddings, self._crawl_time)
        except SampleError as error:
            yield reject(STAGE, error.reason, sample.key, error.detail,
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

    Output: `StageOutput(main, rejects)`: main is a PCollection of manifest entries (dicts: path,
    sha256, samples, bytes, license, split, parquet, parquet_sha256) for `WriteRunOutputs`;
    rejects holds the samples that could not be written (`Rejected`, stage 'write').
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

    @property
    def config(self) -> dict[str, Any]:
        return {"no_embeddings": self._no_embeddings, "max_samples": self._max_samples,
                "max_bytes": self._max_bytes}

    def encoder(self) -> "EncodeSamples":
        """The encode half (FdhSample -> EncodedSample), e.g. to run it on the GPU workers."""
        return EncodeSamples(self._no_embeddings, self._crawl_time)

    def writer(self, staging_dir: Optional[str] = None) -> "WriteEncodedShards":
        """The write half (EncodedSample -> shard entries); see WriteEncodedShards for
        `staging_dir`."""
        return WriteEncodedShards(self._output_dir, self._max_samples, self._max_bytes,
                                  staging_dir)

    def expand(self, samples) -> StageOutput:
        # `AssignSplit(...) | WriteShards(...)`: a StageOutput's rejects pass through to ours.
        upstream = (samples.rejects,) if isinstance(samples, StageOutput) else ()
        samples = samples.main if isinstance(samples, StageOutput) else samples
        encoded = samples | "EncodeSamples" >> self.encoder()
        written = encoded.main | "WriteEncoded" >> self.writer()
        rejects = (*upstream, encoded.rejects, written.rejects) | "FlattenRejects" >> beam.Flatten()
        return StageOutput(main=written.main, rejects=rejects)


class EncodeSamples(beam.PTransform):
    """FdhSample (split set) -> StageOutput(EncodedSample, 'write' rejects): `encode_for_writing`."""

    def __init__(self, no_embeddings: bool, crawl_time: float):
        super().__init__()
        self._no_embeddings, self._crawl_time = bool(no_embeddings), float(crawl_time)

    def expand(self, samples) -> StageOutput:
        return stage_output(samples | "Encode" >> beam.ParDo(
            _EncodeFn(self._no_embeddings, self._crawl_time)).with_outputs(REJECTS_TAG, main="encoded"),
            "encoded")


def _spilled_sample(pair: tuple[None, Spilled]) -> SpilledSample:
    group, key, size = pair[1].summary
    return SpilledSample(group, key, size, pair[1])


class WriteEncodedShards(beam.PTransform):
    """EncodedSample -> StageOutput(manifest entries, duplicate-key rejects) (see `WriteShards`).

    With `staging_dir` (local runs), the encoded samples wait in files there and only
    SpilledSamples (key, size, reference) cross the shuffles: memory holds one sample at a time
    while writing, not the dataset."""

    def __init__(self, output_dir: str, max_samples: int = MAX_SAMPLES, max_bytes: int = MAX_BYTES,
                 staging_dir: Optional[str] = None):
        super().__init__()
        self._output_dir, self._max_samples, self._max_bytes = output_dir, max_samples, max_bytes
        self._staging_dir = staging_dir

    def expand(self, good) -> StageOutput:
        max_samples, max_bytes = self._max_samples, self._max_bytes
        if self._staging_dir:
            good = (good
                    | "NoKey" >> beam.Map(lambda item: (None, item))
                    | "SpillSamples" >> SpillValues(
                        self._staging_dir, lambda item: (item.group, item.key, item.size))
                    | "SpilledSamples" >> beam.Map(_spilled_sample))
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
        written = stage_output(written, "shards")
        return written

