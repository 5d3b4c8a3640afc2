"""The writer's bounded-memory machinery gives the same bytes: multi-pass metadata.json merge,
streamed tars that forget member headers, duplicate keys."""
from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest

from tests.factories import read_tree, make_sample
from dataset.fs import load_json
from dataset.layout import METADATA_FILE, STATS_FILE
from dataset.metadata import metadata_entries
from dataset.shards import read_tar_shard, TarShardWriter
from tests.beam_writer import write_with_beam
from transforms.s8_write import encode_for_writing
from dataset import metadata
from transforms.s8_write.write import write_bucket

CRAWL_TIME = 1637341702.5


def _samples(photos=15):
    return [make_sample(7000 + i, j, user_nsid=f"{i % 4}@N01") for i in range(photos) for j in range(2)]


def test_a_multi_pass_metadata_merge_gives_the_same_bytes(tmp_path, monkeypatch):
    samples = _samples()
    write_with_beam(str(tmp_path / "a"), samples, max_samples=2, crawl_time=CRAWL_TIME, val_fraction=0.2)
    # A 2-way metadata merge (21 shards -> 11 -> 6 -> 3 -> 2 runs -> metadata.json): same bytes.
    monkeypatch.setattr(metadata, "MERGE_FAN_IN", 2)
    manifest = write_with_beam(str(tmp_path / "b"), samples, max_samples=2, crawl_time=CRAWL_TIME,
                               val_fraction=0.2)
    assert len(manifest["shards"]) > 16
    assert read_tree(tmp_path / "b") == read_tree(tmp_path / "a")
    merged = list(metadata_entries(str(tmp_path / "a"), manifest["shards"], fan_in=3))
    assert [key for key, _ in merged] == sorted(s.key for s in samples)
    assert merged == list(metadata_entries(str(tmp_path / "a"), manifest["shards"], fan_in=64))
    assert dict(merged) == load_json(str(tmp_path / "a"), METADATA_FILE)


def test_duplicate_keys_keep_one_copy_like_the_beam_core(tmp_path):
    samples = _samples(photos=4)
    other = dataclasses.replace(samples[3], image=np.zeros_like(samples[3].image))  # smaller PNG
    stream = samples + [samples[1], other]
    manifest = write_with_beam(str(tmp_path / "a"), stream, max_samples=100, crawl_time=CRAWL_TIME)
    assert load_json(str(tmp_path / "a"), STATS_FILE)["funnel"] == {"write.duplicate_key": 2}
    keys = [m["__key__"] for e in manifest["shards"] for m in read_tar_shard(str(tmp_path / "a" / e["path"]))]
    assert sorted(keys) == sorted(s.key for s in samples)
    # The kept copy is the one WriteShards' core keeps (smallest size, then first seen): same shards.
    items = [encode_for_writing(s, False, CRAWL_TIME) for s in stream]
    entries, duplicates = write_bucket(str(tmp_path / "b"), "cc-by-2/train", 0, items, 100)
    assert len(duplicates) == 2 and len(entries) == 1  # one bucket, one shard
    assert entries == manifest["shards"]
    for entry in entries:
        for name in ("path", "parquet"):
            assert (tmp_path / "a" / entry[name]).read_bytes() == (tmp_path / "b" / entry[name]).read_bytes()


def _heap_growth(steps, checkpoints=(500, 4000)):
    """Traced heap bytes at the second checkpoint minus the first, while `steps` advances."""
    tracemalloc.start()
    try:
        seen = {}
        for count, _ in enumerate(steps, start=1):
            if count in checkpoints:
                seen[count] = tracemalloc.get_traced_memory()[0]
        return seen[checkpoints[1]] - seen[checkpoints[0]]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_tar_writer_and_reader_do_not_keep_a_header_per_member(tmp_path):
    path = str(tmp_path / "cc-by-2" / "train" / "out-000000.tar")

    def writes(writer):
        for i in range(4000):
            writer.write({"__key__": f"{i}_0", "json": b"{}", "mask.png": b"x"})
            yield i

    with TarShardWriter(path, check_unique=False) as writer:
        # tarfile alone keeps a TarInfo per member (~1 KB per sample here, ~4 MB in all).
        assert _heap_growth(writes(writer)) < 200_000
    assert _heap_growth(read_tar_shard(path)) < 200_000
    assert sum(1 for _ in read_tar_shard(path)) == 4000
