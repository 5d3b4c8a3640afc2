"""Issue 10 (findings 2, 3, 7, 8, 9): a rebuild deletes only what its dataset listed, one job at a
time per output (run lock), takedown never half-applies and counts exactly, verify compares
values, manifest paths never lead outside the dataset."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from beam_jobs import strip_embeddings, takedown, verify
from dataset import lock, ownership
from dataset import takedown as takedown_core
from dataset.shards import read_parquet_rows, write_parquet_shard
from tests.gcs_emulator import REPO
from tests.jobs_dataset import VICTIM, file_digests, keys_of
from transforms.opt_out import OptOut
from transforms.s8_write.run_outputs import finalize_dataset

UNRELATED = "myproj/shards/out-000042.tar"


def manifest_of(dataset) -> dict:
    return json.loads((dataset / "manifest.json").read_text())


def write_manifest(dataset, manifest: dict) -> None:
    (dataset / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=1) + "\n")


# ------------------------------------------------------------------- output ownership (2) ---

def test_finishing_a_run_never_deletes_a_file_no_manifest_listed(dataset):
    unrelated = dataset / UNRELATED
    unrelated.parent.mkdir(parents=True)
    unrelated.write_bytes(b"my own project's shard")
    shards = manifest_of(dataset)["shards"]
    kept = [e for e in shards if e["license"] == "cc-by-2"]

    removed = ownership.remove_leftovers(str(dataset), kept)

    assert unrelated.read_bytes() == b"my own project's shard"
    dropped = {e["path"] for e in shards} - {e["path"] for e in kept}
    assert {os.path.relpath(p, dataset) for p in removed} == (
        dropped | {e["parquet"] for e in shards if e["path"] in dropped})


def test_finalize_keeps_unrelated_files_and_removes_only_temp_files(tmp_path):
    out = tmp_path / "out"
    (out / "myproj" / "shards").mkdir(parents=True)
    (out / UNRELATED).write_bytes(b"x")
    (out / "cc-by-2" / "train").mkdir(parents=True)
    (out / "cc-by-2" / "train" / ".out-000000.tar.tmp-abc").write_bytes(b"partial")
    finalize_dataset(str(out), [], {"licenses": "cc-by-2"})
    assert (out / UNRELATED).exists()
    assert not (out / "cc-by-2" / "train" / ".out-000000.tar.tmp-abc").exists()


def test_a_rebuild_into_another_dataset_or_unrelated_files_is_refused_unless_overwrite(dataset, tmp_path):
    config = manifest_of(dataset)["config"]
    ownership.check_output_ownership(str(dataset), config)  # the same dataset: fine
    ownership.check_output_ownership(str(tmp_path / "new"), {"licenses": "cc-by-2"})  # nothing there
    (dataset / "rejects").mkdir(exist_ok=True)
    (dataset / "rejects" / "rejects-00000-of-00001.parquet").write_bytes(b"")
    (dataset / "opt_out.txt").write_text("user:1@N01\n")
    ownership.check_output_ownership(str(dataset), config)  # run files are the dataset's own

    subset = {**config, "licenses": "cc-by-2"}
    fuller = {**manifest_of(dataset), "config": {**config, "licenses": "cc-by-2,cc-by-sa-2"}}
    write_manifest(dataset, fuller)
    with pytest.raises(ownership.OutputOwnershipError,
                       match=r"holds another dataset \(licenses: 'cc-by-2,cc-by-sa-2' -> 'cc-by-2'\)"
                             r".*--overwrite"):
        ownership.check_output_ownership(str(dataset), subset)
    ownership.check_output_ownership(str(dataset), subset, overwrite=True)

    (dataset / UNRELATED).parent.mkdir(parents=True)
    (dataset / UNRELATED).write_bytes(b"x")
    with pytest.raises(ownership.OutputOwnershipError, match=f"1 files this job did not write.*{UNRELATED}"):
        ownership.check_output_ownership(str(dataset), fuller["config"])
    ownership.check_output_ownership(str(dataset), fuller["config"], overwrite=True)


def test_shard_files_without_a_manifest_are_not_ours(tmp_path):
    out = tmp_path / "out"
    (out / "cc-by-2" / "train").mkdir(parents=True)
    (out / "cc-by-2" / "train" / "out-000000.tar").write_bytes(b"x")
    with pytest.raises(ownership.OutputOwnershipError, match="no manifest.json lists them"):
        ownership.check_output_ownership(str(out), {})


def test_empty_beam_temp_folders_are_found_and_removed_but_not_full_ones(tmp_path):
    (tmp_path / "rejects" / "beam-temp-rejects-1").mkdir(parents=True)
    (tmp_path / "rejects" / "beam-temp-rejects-2").mkdir()
    (tmp_path / "rejects" / "beam-temp-rejects-2" / "part").write_bytes(b"x")
    assert ownership.empty_beam_temp_folders(str(tmp_path)) == ["rejects/beam-temp-rejects-1"]
    assert ownership.remove_empty_beam_temp_folders(str(tmp_path)) == ["rejects/beam-temp-rejects-1"]
    assert (tmp_path / "rejects" / "beam-temp-rejects-2" / "part").exists()
    assert ownership.empty_beam_temp_folders(str(tmp_path)) == []


# ---------------------------------------------------------------------------- run lock ---

def test_a_second_job_on_the_same_output_fails_naming_the_holder(tmp_path):
    with lock.run_lock(str(tmp_path), "rebuild") as lease:
        held = json.loads((tmp_path / ownership.LOCK_FILE).read_text())
        assert held["run_id"] == lease.run_id and held["host"] == socket.gethostname()
        with pytest.raises(lock.RunLockHeld, match=f"in use by rebuild run {lease.run_id} "
                                                   f"\\(host .*, pid {os.getpid()}\\) until 20"):
            lock.acquire(str(tmp_path), "takedown")
    assert not (tmp_path / ownership.LOCK_FILE).exists()  # released


@pytest.mark.parametrize("lease", [
    {"job": "rebuild", "run_id": "old", "host": "elsewhere", "pid": 1, "expires": 1.0},  # expired
    {"job": "rebuild", "run_id": "dead", "host": socket.gethostname(), "pid": 2 ** 22 + 7,
     "expires": 4e9},  # a process of this host that has gone
])
def test_a_stale_lease_is_taken_over(tmp_path, lease):
    (tmp_path / ownership.LOCK_FILE).write_text(json.dumps(lease))
    with lock.run_lock(str(tmp_path), "takedown") as mine:
        assert lock.read_lease(str(tmp_path)).run_id == mine.run_id


def test_the_lease_is_renewed_while_the_job_runs(tmp_path):
    with lock.run_lock(str(tmp_path), "rebuild", lease_seconds=0.6) as lease:
        time.sleep(0.9)
        assert lock.read_lease(str(tmp_path)).expires > lease.expires


@pytest.mark.pipeline
def test_takedown_refuses_to_run_while_another_job_holds_the_output(dataset):
    other = {"job": "rebuild", "run_id": "r1", "host": "worker-7", "pid": 1, "expires": time.time() + 600}
    (dataset / ownership.LOCK_FILE).write_text(json.dumps(other))
    before = file_digests(dataset)
    with pytest.raises(lock.RunLockHeld, match="in use by rebuild run r1 \\(host worker-7"):
        takedown.run([f"--dataset={dataset}", f"--user_nsid={VICTIM}"])
    assert file_digests(dataset) == before


_GCS_LOCK_SCRIPT = """
import sys
from dataset import lock
output = sys.argv[1]
with lock.run_lock(output, "rebuild") as lease:
    assert lock.read_lease(output).run_id == lease.run_id
    try:
        lock.acquire(output, "takedown")
    except lock.RunLockHeld as error:
        print("refused:", error)
print("after:", lock.read_lease(output))
"""


@pytest.mark.pipeline
def test_run_lock_on_gcs(gcs_emulator):
    output = gcs_emulator.url("locked/out")
    done = subprocess.run([sys.executable, "-c", _GCS_LOCK_SCRIPT, output], cwd=REPO,
                          env=gcs_emulator.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"refused: {output} is in use by rebuild run" in done.stdout
    assert "after: None" in done.stdout


# ----------------------------------------------------------- takedown (findings 3, 8, 9) ---

@pytest.mark.pipeline
def test_a_bad_line_in_opt_out_txt_stops_the_takedown_before_any_write(dataset):
    (dataset / "opt_out.txt").write_text("user:1@N01\nnot an entry\n")
    before = file_digests(dataset)
    with pytest.raises(ValueError, match="opt_out.txt:2: .*nothing was changed"):
        takedown.run([f"--dataset={dataset}", f"--user_nsid={VICTIM}"])
    assert file_digests(dataset) == before
    assert not list(dataset.glob("**/*.takedown-staged"))


@pytest.mark.pipeline
@pytest.mark.parametrize("bad", ["/tmp/elsewhere/out-000000.tar", "../outside/x/out-000000.tar",
                                 "cc-by-2/../../out-000000.tar", "cc-by-2/train/private.tar"])
def test_takedown_and_strip_refuse_manifest_paths_outside_the_template(dataset, tmp_path, bad):
    manifest = manifest_of(dataset)
    manifest["shards"][0] = {**manifest["shards"][0], "path": bad, "parquet": None}
    write_manifest(dataset, manifest)
    before = file_digests(dataset)
    with pytest.raises(ValueError, match="refusing to write anything"):
        takedown.run([f"--dataset={dataset}", f"--user_nsid={VICTIM}"])
    with pytest.raises(ValueError, match="refusing to write anything"):
        strip_embeddings.run([f"--dataset={dataset}", f"--output={tmp_path / 'stripped'}"])
    assert file_digests(dataset) == before
    assert not (tmp_path / "stripped").exists()


class Killed(BaseException):
    """Stands for SIGKILL at one moment of the takedown's run-level update."""


@pytest.mark.pipeline
@pytest.mark.parametrize("moment", ["metadata", "stats", "opt_out", "parquet_moves"])
def test_a_rerun_after_a_killed_takedown_counts_every_sample_once(dataset, monkeypatch, moment):
    request = OptOut(frozenset([VICTIM]))
    rewrites = [takedown_core.rewrite_shard(str(dataset), entry, matches)
                for entry in manifest_of(dataset)["shards"]
                if (matches := takedown_core.find_shard_matches(str(dataset), entry, request))]

    def die(*args, **kwargs):
        raise Killed(moment)

    target = {"metadata": "write_metadata_json", "stats": "build_stats"}.get(moment)
    if target:
        monkeypatch.setattr(takedown_core, target, die)
    elif moment == "opt_out":
        monkeypatch.setattr(takedown_core.fs, "write_bytes_atomic", die)
    else:
        monkeypatch.setattr(takedown_core.fs, "rename", die)
    with pytest.raises(Killed):
        takedown_core.update_run_files(str(dataset), request, rewrites)
    monkeypatch.undo()

    takedown.run([f"--dataset={dataset}", f"--user_nsid={VICTIM}"])
    stats = json.loads((dataset / "stats.json").read_text())
    assert stats["funnel"]["takedown.samples_removed"] == len(keys_of(VICTIM))
    assert verify.run([f"--dataset={dataset}"])["ok"]


# ------------------------------------------------------------------- verify values (7) ---

@pytest.mark.pipeline
def test_verify_catches_a_user_changed_in_parquet_with_its_checksum_updated(dataset):
    manifest = manifest_of(dataset)
    entry = next(e for e in manifest["shards"] if e["samples"])
    rows = read_parquet_rows(str(dataset / entry["parquet"]))
    rows[0]["user_nsid"] = "00000000@N00"
    entry["parquet_sha256"] = write_parquet_shard(str(dataset / entry["parquet"]), rows)
    write_manifest(dataset, manifest)

    report = verify.run([f"--dataset={dataset}"])
    assert not report["ok"]
    key = rows[0]["key"]
    assert any(p.startswith(f"{entry['path']}: {key}: tar json user_nsid") and "'00000000@N00'" in p
               for p in report["problems"]), report["problems"]
    assert any(p.startswith(f"metadata.json: {key}: metadata.json user_nsid") for p in report["problems"])


@pytest.mark.pipeline
def test_verify_catches_an_edited_metadata_json(dataset):
    metadata = json.loads((dataset / "metadata.json").read_text())
    key = sorted(metadata)[0]
    metadata[key]["license"] = "Public Domain"
    (dataset / "metadata.json").write_text(json.dumps(metadata, sort_keys=True, indent=1) + "\n")
    report = verify.run([f"--dataset={dataset}"])
    assert not report["ok"]
    assert any(p.startswith(f"metadata.json: {key}: metadata.json license 'Public Domain' != Parquet")
               for p in report["problems"]), report["problems"]


@pytest.mark.pipeline
def test_verify_flags_temp_files_anywhere_and_empty_beam_temp_folders(dataset):
    (dataset / ".metadata.json.tmp-0123abcd").write_bytes(b"")
    (dataset / "rejects" / "beam-temp-rejects-9").mkdir(parents=True)
    report = verify.run([f"--dataset={dataset}"])
    assert ".metadata.json.tmp-0123abcd: leftover of a writer's temporary file: a killed run?" in report["problems"]
    assert "rejects/beam-temp-rejects-9/: an empty folder Beam left" in report["problems"]


@pytest.mark.pipeline
def test_verify_checks_the_parquet_photo_id_and_licence_columns(dataset):
    manifest = manifest_of(dataset)
    entry = next(e for e in manifest["shards"] if e["samples"])
    table = pq.read_table(str(dataset / entry["parquet"]))
    rows = table.to_pylist()
    rows[0]["license_slug"] = "cc-by-nd-2"
    entry["parquet_sha256"] = write_parquet_shard(str(dataset / entry["parquet"]), rows)
    write_manifest(dataset, manifest)
    report = verify.run([f"--dataset={dataset}"])
    assert (f"{entry['path']}: {rows[0]['key']}: Parquet license_slug 'cc-by-nd-2' in a "
            f"{entry['license']!r} shard") in report["problems"]
