"""verify: a clean dataset passes; damaged, missing, extra or inconsistent files are each caught."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from beam_jobs import verify
from tests.factories import make_sample
from tests.jobs_dataset import build_dataset
from dataset import fs, layout
from dataset.shards import read_parquet_rows, write_parquet_shard
from dataset import verify as verify_core
from transforms.s8_write import encode_sample


def shards(dataset) -> list[dict]:
    return json.loads((dataset / "manifest.json").read_text())["shards"]


def run_verify(dataset, capsys, *flags) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        verify.main([f"--dataset={dataset}", *flags])
    return exit_info.value.code, capsys.readouterr().out


def test_clean_dataset_passes_with_one_ok_line(dataset, capsys):
    code, out = run_verify(dataset, capsys)
    assert code == 0
    assert out.splitlines() == [f"OK: {dataset}: 8 shards, 12 samples, 2.8 MiB verified"]


def test_flipped_byte_is_caught(dataset, capsys):
    entry = shards(dataset)[0]
    tar = dataset / entry["path"]
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF  # inside the first sample's image.png
    tar.write_bytes(bytes(data))
    code, out = run_verify(dataset, capsys)
    assert code == 1 and out.startswith("FAILED")
    assert f"{entry['path']}: sha256 " in out
    assert "image.png: does not decode" in out


def test_truncated_shard_is_caught(dataset, capsys):
    entry = shards(dataset)[1]
    tar = dataset / entry["path"]
    tar.write_bytes(tar.read_bytes()[: entry["bytes"] // 3])
    code, out = run_verify(dataset, capsys)
    assert code == 1
    assert f"{entry['path']}: sha256 " in out
    assert f"{entry['path']}: unreadable after" in out or f"{entry['path']}: 0 samples" in out


def test_missing_and_extra_shards_are_caught(dataset, capsys):
    entries = shards(dataset)
    (dataset / entries[2]["path"]).unlink()
    extra = dataset / "cc-by-2" / "train" / "out-000009.tar"
    shutil.copy(dataset / entries[0]["path"], extra)
    staged = dataset / (entries[0]["parquet"] + layout.STAGED_SUFFIX)
    shutil.copy(dataset / entries[0]["parquet"], staged)
    code, out = run_verify(dataset, capsys)
    assert f"{entries[0]['parquet']}{layout.STAGED_SUFFIX}: leftover of an unfinished takedown" in out
    assert code == 1
    assert f"{entries[2]['path']}: missing" in out
    assert "cc-by-2/train/out-000009.tar: shard file not in the manifest" in out


def test_counts_out_of_step_with_metadata_parquet_and_stats_are_caught(dataset, capsys):
    metadata = json.loads((dataset / "metadata.json").read_text())
    metadata.pop("1001000")
    metadata["424242000"] = dict(metadata["1002000"])
    fs.save_json(str(dataset), layout.METADATA_FILE, metadata)
    stats = json.loads((dataset / "stats.json").read_text())
    stats["totals"]["samples"] += 1
    fs.save_json(str(dataset), layout.STATS_FILE, stats)
    entry, rows = next((e, rows) for e in shards(dataset) if e["samples"] == 2
                       for rows in [read_parquet_rows(str(dataset / e["parquet"]))]
                       if "1001000" not in {r["key"] for r in rows})
    write_parquet_shard(str(dataset / entry["parquet"]), rows[1:])
    code, out = run_verify(dataset, capsys)
    assert code == 1
    dropped_row = rows[0]["key"]
    assert "metadata.json keys are in no shard: " in out and "'424242000'" in out
    assert f"'{dropped_row}'" in out.split("metadata.json keys are in no shard: ")[1].splitlines()[0]
    assert "metadata.json: 1 shard samples are missing from metadata.json: ['1001000']" in out
    assert "stats.json: totals" in out
    assert f"{entry['parquet']}: sha256" in out
    assert f"{entry['parquet']}: 1 rows vs 2 tar samples; only in tar ['{dropped_row}']" in out


def test_not_a_dataset_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        verify.main([f"--dataset={tmp_path}"])
    assert exit_info.value.code == 2
    assert "not a dataset" in capsys.readouterr().err


def test_no_embeddings_dataset_passes(tmp_path, capsys):
    dataset = build_dataset(tmp_path, no_embeddings=True)
    code, out = run_verify(dataset, capsys)
    assert code == 0 and out.startswith("OK:")


def _members(**changes):
    members = encode_sample(make_sample(5, 0))
    members.update(changes)
    return {k: v for k, v in members.items() if v is not None}


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("changes, no_embeddings, problem", [
    ({}, False, None),
    ({"vertices.npy": None, "e_mask.png": None}, True, None),
    ({"vertices.npy": None}, False, "vertices.npy: missing"),
    ({}, True, "vertices.npy: present in a no-embeddings dataset"),
    ({"image.png": _png(np.zeros((288, 160), np.uint8))}, False, "image.png: mode L, expected RGB"),
    ({"image.png": _png(np.zeros((160, 288, 3), np.uint8))}, False, "image.png: size 288x160"),
    ({"mask.png": _png(np.zeros((288, 160), np.uint8))}, False, "mask.png: mode L, expected 1"),
    ({"keypoints.npy": _npy(np.zeros((17, 3), np.float64))}, False, "keypoints.npy: float64 (17, 3)"),
    ({"keypoints.npy": b"junk"}, False, "keypoints.npy: does not decode"),
    ({"vertices.npy": _npy(np.full((288, 160), 27554, np.int16))}, False, "ids in [27554, 27554]"),
    ({"vertices.npy": _npy(np.zeros((288, 160), np.int32))}, False, "vertices.npy: int32"),
    ({"json": b"{"}, False, "json: does not parse"),
    ({"__key__": "5.0"}, False, "key contains a dot"),
])
def test_check_sample(changes, no_embeddings, problem):
    problems = verify_core.check_sample(_members(**changes), no_embeddings)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def test_naming_problems_want_contiguous_numbers():
    entries = [{"path": layout.shard_path("cc-by-2", "train", i), "license": "cc-by-2",
                "split": "train"} for i in (0, 2)]
    assert verify_core.naming_problems(entries) == [
        "cc-by-2/train: shard numbers not contiguous from 000000: [0, 2]"]
    assert verify_core.naming_problems(entries[:1]) == []


@pytest.mark.parametrize("job", ["verify", "takedown", "strip_embeddings"])
def test_missing_dataset_flag_is_a_usage_error(job, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"beam_jobs.{job}").run([])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --dataset" in capsys.readouterr().err
