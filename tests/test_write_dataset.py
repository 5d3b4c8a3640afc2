"""Whole datasets: Beam path twice == byte-identical == write_with_beam; FDH/DP2 compatibility."""
from __future__ import annotations

import io
import json
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs.common import make_pipeline
from tests.factories import read_tree, make_sample
from transforms.records import NUM_CSE_VERTICES
from transforms.rejects import CountRejects
from dataset.fs import load_json, save_json
from dataset.layout import MANIFEST_FILE, METADATA_FILE, STATS_FILE
from dataset.schema import METADATA_FIELDS
from dataset.shards import read_parquet_rows, read_tar_shard
from tests.beam_writer import write_with_beam
from transforms.s8_write import AssignSplit, sample_metadata, split_of, WriteRunOutputs, WriteShards

LICENCES = [("cc-by-2", "Attribution License"), ("cc-by-nc-sa-2", "Attribution-NonCommercial-ShareAlike License")]
CRAWL_TIME = 1637341702.5


def _samples(photos=12, persons=2, bad=True):
    samples = []
    for i in range(photos):
        slug, name = LICENCES[i % 2]
        samples += [make_sample(5000 + i, j, license=slug, license_name=name,
                                user_nsid=f"{i % 5}@N0{i % 3}") for j in range(persons)]
    if bad:  # a NoDerivs sample must become a reject, not a crash
        samples.append(make_sample(9999, 0, license="cc-by-nd-2"))
    return samples


def _run_beam(out, samples):
    with make_pipeline(PipelineOptions([])) as pipeline:
        write = WriteShards(str(out), max_samples=4, crawl_time=CRAWL_TIME)
        written = (pipeline | beam.Create(samples) | AssignSplit(val_fraction=0.3)).main | write
        counts = written.rejects | CountRejects()
        {"shards": written.main, "counts": counts} | WriteRunOutputs(
            str(out), config=write.config, versions={"model": "test"}, crawl_time=CRAWL_TIME)


@pytest.mark.slow
def test_beam_runs_twice_byte_identical_and_equal_to_write_dataset(tmp_path):
    samples = _samples()
    _run_beam(tmp_path / "a", samples)
    _run_beam(tmp_path / "b", samples)
    first, second = read_tree(tmp_path / "a"), read_tree(tmp_path / "b")
    assert first == second
    write_with_beam(str(tmp_path / "c"), samples, max_samples=4, crawl_time=CRAWL_TIME,
                  val_fraction=0.3, versions={"model": "test"})
    assert read_tree(tmp_path / "c") == first

    manifest = load_json(str(tmp_path / "a"), MANIFEST_FILE)
    stats = load_json(str(tmp_path / "a"), STATS_FILE)
    assert stats["funnel"] == {"write.licence_not_fdh": 1}
    assert manifest["crawl_time"] == CRAWL_TIME and manifest["config"]["max_samples"] == 4
    good = [s for s in samples if s.record.license != "cc-by-nd-2"]
    assert stats["totals"]["samples"] == len(good) == sum(e["samples"] for e in manifest["shards"])
    by_group: dict = {}
    keys = []
    for entry in manifest["shards"]:
        assert 1 <= entry["samples"] <= 4
        by_group.setdefault((entry["license"], entry["split"]), []).append(entry["path"])
        shard_keys = [m["__key__"] for m in read_tar_shard(str(tmp_path / "a" / entry["path"]))]
        assert shard_keys == sorted(shard_keys) and len(shard_keys) == entry["samples"]
        rows = read_parquet_rows(str(tmp_path / "a" / entry["parquet"]))
        assert [r["key"] for r in rows] == shard_keys and {r["shard"] for r in rows} == {entry["path"]}
        assert {r["split"] for r in rows} == {entry["split"]}
        keys += shard_keys
    assert sorted(keys) == sorted(s.key for s in good)
    for (licence, split), paths in by_group.items():  # contiguous names from 000000
        assert sorted(paths) == [f"{licence}/{split}/out-{i:06d}.tar" for i in range(len(paths))]
    # Every person of a photo is in the split of its user.
    metadata = load_json(str(tmp_path / "a"), METADATA_FILE)
    assert list(metadata) == sorted(keys)
    for sample in good:
        assert metadata[sample.key]["category"] == split_of(sample.record, 0.3)
        assert set(metadata[sample.key]) == set(METADATA_FIELDS)
    assert {m["category"] for m in metadata.values()} == {"train", "val"}


def test_metadata_json_is_streamed_like_save_json(tmp_path):
    samples = _samples(photos=5, bad=False)
    write_with_beam(str(tmp_path / "d"), samples, max_samples=3, crawl_time=CRAWL_TIME)
    streamed = (tmp_path / "d" / METADATA_FILE).read_bytes()
    entries = {s.key: sample_metadata(s, CRAWL_TIME) for s in samples}
    save_json(str(tmp_path), "expected.json", entries)
    assert streamed == (tmp_path / "expected.json").read_bytes()
    assert json.loads(streamed) == entries
    write_with_beam(str(tmp_path / "e"), [], crawl_time=CRAWL_TIME)
    assert load_json(str(tmp_path / "e"), METADATA_FILE) == {}
    assert load_json(str(tmp_path / "e"), MANIFEST_FILE)["shards"] == []


def test_rewrite_with_fewer_samples_removes_stale_shards(tmp_path):
    out = str(tmp_path / "out")
    write_with_beam(out, _samples(photos=12, bad=False), max_samples=2)
    manifest = write_with_beam(out, _samples(photos=2, bad=False), max_samples=2)
    on_disk = sorted(os.path.relpath(os.path.join(d, n), out) for d, _, names in os.walk(out)
                     for n in names if n.startswith("out-"))
    listed = sorted([e["path"] for e in manifest["shards"]] + [e["parquet"] for e in manifest["shards"]])
    assert on_disk == listed


def _dp2_decoders():
    """The decoders of DeepPrivacy2's get_dataloader_fdh_wds (dp2/data/datasets/fdh.py), re-stated."""
    import torch
    import webdataset as wds
    from PIL import Image

    def png(data):
        with Image.open(io.BytesIO(data)) as image:
            return torch.from_numpy(np.rollaxis(np.array(image.convert("RGB")), 2))

    def mask(data):
        return torch.from_numpy(np.array(Image.open(io.BytesIO(data)))).squeeze()[None] > 0

    def keypoints(data):
        points = torch.from_numpy(np.load(io.BytesIO(data))).float()
        outside = (points[:, 0] < 0) | (points[:, 0] > 1) | (points[:, 1] < 0) | (points[:, 1] > 1)
        points[:, 2] = (points[:, 2] > 0) & ~outside
        return points

    def vertices(data):
        return torch.from_numpy(np.load(io.BytesIO(data)).astype(np.int32)).squeeze()[None]

    return [wds.handle_extension("image.png", png), wds.handle_extension("mask.png", mask),
            wds.handle_extension("maskrcnn_mask.png", mask), wds.handle_extension("keypoints.npy", keypoints),
            wds.handle_extension("vertices.npy", vertices), wds.handle_extension("E_mask.png", mask)]


def test_shards_load_in_webdataset_as_deep_privacy2_reads_them(tmp_path):
    import torch
    import webdataset as wds

    samples = _samples(photos=4, bad=False)
    samples[0].keypoints[3] = [1.5, 0.5, 1.0]  # a keypoint outside the crop: DP2 marks it invisible
    manifest = write_with_beam(str(tmp_path), samples, max_samples=3)
    urls = [str(tmp_path / e["path"]) for e in manifest["shards"]]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode(*_dp2_decoders()):
        image = sample["image.png"]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 288, 160)
        for name in ("mask.png", "maskrcnn_mask.png", "e_mask.png"):
            assert sample[name].dtype == torch.bool and tuple(sample[name].shape) == (1, 288, 160)
        vertices = sample["vertices.npy"]
        assert vertices.dtype == torch.int32 and tuple(vertices.shape) == (1, 288, 160)
        assert int(vertices.min()) >= 0 and int(vertices.max()) < NUM_CSE_VERTICES
        points = sample["keypoints.npy"]
        assert tuple(points.shape) == (17, 3)
        visible = points[:, 2] > 0
        assert ((points[visible, :2] >= 0) & (points[visible, :2] <= 1)).all()
        seen[sample["__key__"]] = sample
    assert sorted(seen) == sorted(s.key for s in samples)
    original = samples[0]
    got = seen[original.key]
    assert torch.equal(got["image.png"], torch.from_numpy(np.rollaxis(original.image, 2)))
    assert torch.equal(got["mask.png"][0], torch.from_numpy(original.mask))
    assert float(got["keypoints.npy"][3, 2]) == 0.0 and float(got["keypoints.npy"][4, 2]) == 1.0
    # webdataset's own default decoders ("rgb8") read the same members.
    first = next(iter(wds.WebDataset(urls[:1], shardshuffle=False).decode("rgb8")))
    assert first["image.png"].shape == (288, 160, 3) and first["image.png"].dtype == np.uint8
    assert first["keypoints.npy"].shape == (17, 3) and first["vertices.npy"].dtype == np.int16
    assert set(first["json"]) == set(METADATA_FIELDS)  # the extra json member


def test_parquet_reads_in_pandas_and_pyarrow_dataset(tmp_path):
    import pandas as pd
    import pyarrow.dataset as ds

    samples = _samples(photos=6, bad=False)
    manifest = write_with_beam(str(tmp_path), samples, max_samples=3, val_fraction=0.5)
    paths = [str(tmp_path / e["parquet"]) for e in manifest["shards"]]
    table = ds.dataset(paths, format="parquet").to_table()
    assert table.num_rows == len(samples)
    assert sorted(table.column("key").to_pylist()) == sorted(s.key for s in samples)
    frame = pd.read_parquet(tmp_path / manifest["shards"][0]["parquet"])
    assert len(frame) == manifest["shards"][0]["samples"]
    assert (frame["shard"] == manifest["shards"][0]["path"]).all()
    assert set(METADATA_FIELDS) <= set(frame.columns)
    by_licence = table.to_pandas().groupby("license_slug").size().to_dict()
    assert by_licence == {"cc-by-2": 6, "cc-by-nc-sa-2": 6}
