"""AssignSplit (deterministic hash) and the no-embeddings variant (strip_embeddings job)."""
from __future__ import annotations

import os

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs import strip_embeddings
from beam_jobs.common import make_pipeline
from tests.factories import make_record, make_sample
from dataset.fs import load_json
from dataset.layout import EMBEDDING_MEMBERS, MANIFEST_FILE, METADATA_FILE
from dataset.shards import read_tar_shard
from tests.beam_writer import write_with_beam
from transforms.s8_write import AssignSplit, split_of


def test_split_is_a_stable_hash_by_user_or_photo():
    records = [make_record(i, user_nsid=f"{i}@N01") for i in range(20000)]
    val = sum(split_of(r, 0.017) == "val" for r in records)
    assert 0.012 * len(records) < val < 0.022 * len(records)
    assert [split_of(r, 0.017) for r in records[:200]] == [split_of(r, 0.017) for r in records[:200]]
    same_user = [make_record(i, user_nsid="42@N01") for i in range(50)]
    assert len({split_of(r, 0.5) for r in same_user}) == 1  # one user never spans two splits
    assert len({split_of(r, 0.5, by="photo_id") for r in same_user}) == 2
    assert split_of(records[0], 0.0) == "train" and split_of(records[0], 1.0) == "val"
    assert split_of(records[0], 0.5, seed="other") in ("train", "val")
    with pytest.raises(ValueError):
        AssignSplit(by="title")
    with pytest.raises(ValueError):
        AssignSplit(val_fraction=1.5)


def test_assign_split_in_beam_keeps_the_persons_of_a_photo_together():
    samples = [make_sample(i, j, user_nsid=f"{i}@N01", with_embeddings=False)
               for i in range(12) for j in range(3)]
    expected = [(s.key, split_of(s.record, 0.4, by="photo_id")) for s in samples]
    with make_pipeline(PipelineOptions([])) as pipeline:
        got = ((pipeline | beam.Create(samples) | AssignSplit(val_fraction=0.4, by="photo_id")).main
               | beam.Map(lambda s: (s.key, s.split)))
        assert_that(got, equal_to(expected))
    assert len({split for _, split in expected}) == 2


@pytest.mark.slow
def test_strip_embeddings_job_equals_a_no_embeddings_run(tmp_path):
    samples = [make_sample(100 + i, j, user_nsid=f"{i % 4}@N01") for i in range(8) for j in range(2)]
    full, stripped, fresh = (str(tmp_path / name) for name in ("full", "stripped", "fresh"))
    write_with_beam(full, samples, max_samples=3, val_fraction=0.3, crawl_time=5.0)
    (tmp_path / "full" / "opt_out.txt").write_text("user:1@N01\n")
    summary = strip_embeddings.run([f"--dataset={full}", f"--output={stripped}"])
    assert summary == {"shards": len(load_json(full, MANIFEST_FILE)["shards"]), "samples": 16}
    write_with_beam(fresh, samples, max_samples=3, val_fraction=0.3, crawl_time=5.0, no_embeddings=True)
    manifest = load_json(stripped, MANIFEST_FILE)
    fresh_manifest = load_json(fresh, MANIFEST_FILE)
    assert manifest["config"]["no_embeddings"] is True and manifest["crawl_time"] == 5.0
    # Same shards, byte for byte, as annotating without embeddings (count-bound shards here).
    assert manifest["shards"] == fresh_manifest["shards"]
    for entry in manifest["shards"]:
        for name in (entry["path"], entry["parquet"]):
            assert (tmp_path / "stripped" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
        for members in read_tar_shard(os.path.join(stripped, entry["path"])):
            assert not set(EMBEDDING_MEMBERS) & set(members)
    assert (tmp_path / "stripped" / METADATA_FILE).read_bytes() == (tmp_path / "full" / METADATA_FILE).read_bytes()
    assert (tmp_path / "stripped" / "opt_out.txt").read_text() == "user:1@N01\n"


def test_strip_embeddings_refuses_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        strip_embeddings.run([f"--dataset={tmp_path}", f"--output={tmp_path / 'x'}"])
    write_with_beam(str(tmp_path / "d"), [make_sample()])
    with pytest.raises(ValueError, match="differ"):
        strip_embeddings.run([f"--dataset={tmp_path / 'd'}", f"--output={tmp_path / 'd'}/"])
