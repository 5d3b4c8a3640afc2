"""Tar/Parquet shard files: deterministic bytes, round trip, atomic replace, crash safety, layout."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tarfile
import textwrap

import pandas as pd
import pytest

from tests.factories import make_sample
from dataset.layout import shard_path
from dataset.schema import PARQUET_SCHEMA
from dataset.shards import read_parquet_rows, read_tar_shard, write_parquet_shard, write_tar_shard
from tests.beam_writer import write_with_beam
from transforms.s8_write import encode_sample, part_sizes, sample_row
from transforms.s8_write.layout import TAR_RECORD, num_buckets, shard_offsets, tar_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _members(n, start=0):
    return [encode_sample(make_sample(start + i, 0)) for i in range(n)]


def test_tar_is_deterministic_with_fixed_headers_and_round_trips(tmp_path):
    members = _members(3)
    first = tmp_path / "a" / shard_path("cc-by-2", "train", 0)
    second = tmp_path / "b" / shard_path("cc-by-2", "train", 0)
    info = write_tar_shard(str(first), members)
    assert info.path == "cc-by-2/train/out-000000.tar" and info.samples == 3
    write_tar_shard(str(second), members)
    data = first.read_bytes()
    assert data == second.read_bytes() and info.bytes == len(data)
    with tarfile.open(first) as tar:
        headers = tar.getmembers()
    assert [h.name for h in headers[:7]] == [f"0.{ext}" for ext in list(members[0])[1:]]
    assert {(h.mtime, h.uid, h.gid, h.uname, h.gname, h.mode) for h in headers} == {(0, 0, 0, "", "", 0o444)}
    # Raw read-back and rewrite gives the same bytes (what takedown relies on).
    back = list(read_tar_shard(str(first)))
    assert back == members  # encode_sample gives bytes for every member, str for __key__
    third = tmp_path / "c" / "out-000000.tar"
    write_tar_shard(str(third), read_tar_shard(str(first)))
    assert third.read_bytes() == data
    # tar_size predicts the archive size exactly (plus end blocks and record padding).
    payload = sum(tar_size(m) for m in members) + 1024
    assert len(data) == -(-payload // TAR_RECORD) * TAR_RECORD


def test_writing_a_shard_twice_leaves_one_correct_file(tmp_path):
    path = tmp_path / shard_path("cc-by-2", "val", 0)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"partial garbage from an older run")
    write_tar_shard(str(path), _members(2))
    once = path.read_bytes()
    write_tar_shard(str(path), _members(2))
    assert path.read_bytes() == once
    assert os.listdir(path.parent) == ["out-000000.tar"]
    assert [m["__key__"] for m in read_tar_shard(str(path))] == ["0", "1000"]


def test_failing_writer_keeps_the_old_shard_and_leaves_no_temp(tmp_path):
    path = tmp_path / "cc-by-2" / "train" / "out-000000.tar"
    write_tar_shard(str(path), _members(1))
    old = path.read_bytes()

    def broken():
        yield _members(1, start=5)[0]
        raise RuntimeError("encoder died")

    with pytest.raises(RuntimeError):
        write_tar_shard(str(path), broken())
    assert path.read_bytes() == old and os.listdir(path.parent) == ["out-000000.tar"]
    with pytest.raises(ValueError, match="duplicate"):
        write_tar_shard(str(path), _members(1) + _members(1))


def test_killed_writer_leaves_no_visible_shard_and_a_rerun_completes(tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {REPO!r})
        from dataset.shards import write_tar_shard
        def members():
            for i in range(100000):
                yield {{"__key__": f"{{i}}_0", "image.png": bytes(1 << 20)}}
                if i == 8:
                    print("writing", flush=True)
                    time.sleep(600)
        write_tar_shard({str(out / 'cc-by-2' / 'train' / 'out-000000.tar')!r}, members())
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        temps = glob.glob(str(out / "cc-by-2" / "train" / ".*"))
        assert len(temps) == 1 and os.path.getsize(temps[0]) > 0  # the partial data is there...
        assert glob.glob(str(out / "*" / "*" / "out-*.tar")) == []  # ...but not as a shard
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert glob.glob(str(out / "*" / "*" / "out-*.tar")) == []
    # Re-running the write completes: every sample once, the leftover temp file removed.
    samples = [make_sample(i, j) for i in range(6) for j in range(2)]
    manifest = write_with_beam(str(out), samples, max_samples=5)
    keys = [m["__key__"] for e in manifest["shards"] for m in read_tar_shard(str(out / e["path"]))]
    assert sorted(keys) == sorted(s.key for s in samples)
    assert glob.glob(str(out / "*" / "*" / ".*")) == []
    listed = {e["path"] for e in manifest["shards"]}
    assert {os.path.relpath(p, out) for p in glob.glob(str(out / "*" / "*" / "out-*.tar"))} == listed


def test_parquet_shard_is_deterministic_and_reads_back(tmp_path):
    rows = [sample_row(make_sample(i, 0), "cc-by-2/train/out-000000.tar") for i in range(4)]
    sha = write_parquet_shard(str(tmp_path / "a.parquet"), rows)
    write_parquet_shard(str(tmp_path / "b.parquet"), rows)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert len(sha) == 64
    back = read_parquet_rows(str(tmp_path / "a.parquet"))
    assert [r["key"] for r in back] == ["0", "1000", "2000", "3000"]
    assert back[1]["photo_url"] == rows[1]["photo_url"]
    frame = pd.read_parquet(tmp_path / "a.parquet")
    assert list(frame.columns) == PARQUET_SCHEMA.names and len(frame) == 4


def test_layout_cuts_parts_by_count_and_bytes_and_numbers_contiguously():
    assert part_sizes([10] * 7, max_samples=3, max_bytes=10**6) == [3, 3, 1]
    budget = 10 * TAR_RECORD
    assert part_sizes([4 * TAR_RECORD] * 5, max_samples=100, max_bytes=budget) == [2, 2, 1]
    assert part_sizes([budget * 2, 1], max_samples=100, max_bytes=budget) == [1, 1]  # oversized alone
    assert num_buckets(0, 0) == 0 and num_buckets(1, 1) == 1
    assert num_buckets(6000, 10, max_samples=3000) == 3  # 90 % fill leaves room for the hash spread
    assert num_buckets(10, 500 * 2**20) == 3  # bytes decide
    assert shard_offsets({0: 1, 2: 2, 3: 1}, 4) == {0: 0, 1: 1, 2: 1, 3: 3}
