"""Every job of a dataset's life on gs://, through a GCS emulator on loopback (tests/gcs_emulator.py).

The built-in demo sample (beam_jobs/demo.py) goes to the emulator: YFCC lines at
gs://BUCKET/in/yfcc.txt, the mirror under gs://BUCKET/mirror/. The rebuild reads both and writes
the dataset to gs://BUCKET/out; the same rebuild into a local directory must give the same bytes.
Then verify, takedown, verify, search_user and a second rebuild work on the gs:// dataset.
Each job runs in its own process (Beam caches GCS credentials per process).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from beam_jobs.demo import build_sample

pytestmark = pytest.mark.slow

CRAWL_TIME = "1637341702"
TAKEN_DOWN_USER = "10000002@N02"  # Grace Hopper, the only cc-by-sa-2 sample
KEPT_USER = "10000001@N01"  # the astronaut, cc-by-2
SHARDS = ("cc-by-2/train/out-000000", "cc-by-nc-2/train/out-000000",
          "cc-by-sa-2/train/out-000000")


def _rebuild_args(yfcc: str, output: str, mirror: str) -> list[str]:
    return [f"--yfcc={yfcc}", f"--output={output}", f"--image_source=mirror:{mirror}",
            "--annotator=lite", f"--crawl_time={CRAWL_TIME}"]


def _ok(done) -> str:
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def rebuilt(gcs_emulator, tmp_path_factory):
    """The demo rebuilt to gs://BUCKET/out and to a local dir; yields (gs snapshot, local dir).

    The snapshot is a local copy of gs://BUCKET/out taken right after the rebuild, so the later
    takedown test does not change what the comparisons see.
    """
    work = tmp_path_factory.mktemp("gcs_e2e")
    yfcc, mirror = build_sample(str(work / "input"))
    gcs_emulator.upload_file(yfcc, "in/yfcc.txt")
    gcs_emulator.upload_dir(mirror, "mirror")

    _ok(gcs_emulator.run_job("beam_jobs.rebuild", *_rebuild_args(
        gcs_emulator.url("in/yfcc.txt"), gcs_emulator.url("out"), gcs_emulator.url("mirror"))))
    local = work / "local_out"
    _ok(gcs_emulator.run_job("beam_jobs.rebuild", *_rebuild_args(yfcc, str(local), mirror)))
    return gcs_emulator.download_prefix("out", work / "gs_out"), local


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_rebuild_writes_the_dataset_to_gcs_byte_for_byte_like_a_local_one(rebuilt):
    gs_out, local = rebuilt
    expected = {"manifest.json", "metadata.json", "stats.json",
                "rejects/rejects-00000-of-00001.parquet",
                *(f"{shard}.{ext}" for shard in SHARDS for ext in ("tar", "parquet"))}
    # The annotation store (OUT/annotations/, issue 14): content-named files, the same on both.
    store = {path for path in _files(local) if path.startswith("annotations/")}
    assert any(path.endswith("/models.json") for path in store)
    expected |= store
    # Exactly the dataset: no temporary or staged object is left behind on GCS.
    assert _files(gs_out) == _files(local) == expected

    stats = json.loads((gs_out / "stats.json").read_text())
    assert stats["totals"]["samples"] == 3
    assert stats["funnel"]["funnel.samples"] == 3
    manifest = json.loads((gs_out / "manifest.json").read_text())
    assert sorted(shard["path"] for shard in manifest["shards"]) == [f"{s}.tar" for s in SHARDS]

    # Determinism across filesystems: shards, Parquet and run files are the same bytes.
    for name in sorted(expected - {"rejects/rejects-00000-of-00001.parquet", "manifest.json"}):
        assert (gs_out / name).read_bytes() == (local / name).read_bytes(), name
    # The manifest records the run configuration, so its input locations (gs:// vs local) too.
    manifests = [json.loads((root / "manifest.json").read_text()) for root in (gs_out, local)]
    for run in manifests:
        del run["config"]["yfcc"], run["config"]["image_source"]
    assert manifests[0] == manifests[1]
    # Rejects name their input file (gs:// vs local) for read errors and the mirror paths fetch
    # tried; nothing else differs.
    gs_rejects = pd.read_parquet(gs_out / "rejects").sort_values(["stage", "record_id"])
    local_rejects = pd.read_parquet(local / "rejects").sort_values(["stage", "record_id"])
    assert gs_rejects["detail"].str.contains("tried gs://").any()
    untried = {"detail": lambda r: r["detail"].str.replace(r"tried .*", "tried", regex=True)}
    assert gs_rejects.drop(columns="record_id").assign(**untried).reset_index(drop=True).equals(
        local_rejects.drop(columns="record_id").assign(**untried).reset_index(drop=True))
    read_ids = gs_rejects.loc[gs_rejects["stage"] == "read", "record_id"].tolist()
    assert len(read_ids) == 1 and read_ids[0].startswith("gs://fdh-test/in/yfcc.txt:")


def test_verify_takedown_search_and_rebuild_again_on_gcs(rebuilt, gcs_emulator):
    out = gcs_emulator.url("out")
    assert "3 samples" in _ok(gcs_emulator.run_job("beam_jobs.verify", f"--dataset={out}"))
    found = gcs_emulator.run_job("beam_jobs.search_user", f"--dataset={out}",
                                 f"--user_nsid={TAKEN_DOWN_USER}")
    assert found.returncode == 0, (found.stdout, found.stderr)
    assert found.stdout == "Image 9000002000 includes your username\n"

    removed = _ok(gcs_emulator.run_job("beam_jobs.takedown", f"--dataset={out}",
                                       f"--user_nsid={TAKEN_DOWN_USER}"))
    assert "9000002000" in removed
    assert "2 samples" in _ok(gcs_emulator.run_job("beam_jobs.verify", f"--dataset={out}"))
    assert f"user:{TAKEN_DOWN_USER}" in gcs_emulator.read("out/opt_out.txt").decode().splitlines()
    manifest = json.loads(gcs_emulator.read("out/manifest.json"))
    assert {shard["path"]: shard["samples"] for shard in manifest["shards"]} == {
        f"{shard}.tar": 0 if shard.startswith("cc-by-sa-2/") else 1 for shard in SHARDS}

    # search_user reads gs:// through Beam's FileSystems: Parquet shards and metadata.json.
    for source in (out, f"{out}/metadata.json"):
        gone = gcs_emulator.run_job("beam_jobs.search_user", f"--dataset={source}",
                                    f"--user_nsid={TAKEN_DOWN_USER}")
        assert gone.returncode == 1 and gone.stdout == "", (source, gone.stderr[-2000:])
        assert "No image" in gone.stderr
    kept = gcs_emulator.run_job("beam_jobs.search_user", f"--dataset={out}/cc-by*/*/*.parquet",
                                f"--user_nsid={KEPT_USER}")
    assert kept.returncode == 0 and kept.stdout == "Image 9000001000 includes your username\n"

    # A rebuild into the same gs:// output honours its opt_out.txt and drops the emptied shard.
    _ok(gcs_emulator.run_job("beam_jobs.rebuild", *_rebuild_args(
        gcs_emulator.url("in/yfcc.txt"), out, gcs_emulator.url("mirror"))))
    names = gcs_emulator.names("out/")
    assert not any(name.startswith("out/cc-by-sa-2/") for name in names)
    assert {f"out/{shard}.tar" for shard in SHARDS[:2]} <= names and "out/opt_out.txt" in names
    stats = json.loads(gcs_emulator.read("out/stats.json"))
    assert stats["totals"]["samples"] == 2
    assert stats["funnel"]["prefilter.user_opt_out"] == 1
    assert "2 samples" in _ok(gcs_emulator.run_job("beam_jobs.verify", f"--dataset={out}"))


def test_stats_and_strip_embeddings_read_and_write_gcs(rebuilt, gcs_emulator):
    out, variant = gcs_emulator.url("out"), gcs_emulator.url("no_embeddings")
    printed = _ok(gcs_emulator.run_job("beam_jobs.stats", f"--dataset={out}"))
    assert "cc-by-2" in printed
    for name in ("license_pie.png", "funnel.png"):
        assert gcs_emulator.read(f"out/{name}").startswith(b"\x89PNG")

    # The lite dataset has no embeddings already: the variant's shards are the same bytes.
    source = json.loads(gcs_emulator.read("out/manifest.json"))
    _ok(gcs_emulator.run_job("beam_jobs.strip_embeddings", f"--dataset={out}", f"--output={variant}"))
    manifest = json.loads(gcs_emulator.read("no_embeddings/manifest.json"))
    assert manifest["config"]["no_embeddings"] is True
    assert [(s["path"], s["sha256"], s["samples"]) for s in manifest["shards"]] == [
        (s["path"], s["sha256"], s["samples"]) for s in source["shards"]]
    assert {f"no_embeddings/{s['path']}" for s in manifest["shards"]} <= gcs_emulator.names(
        "no_embeddings/")
    _ok(gcs_emulator.run_job("beam_jobs.verify", f"--dataset={variant}"))
