"""A gs:// model dir through the GCS emulator (tests/gcs_emulator.py), both directions:
`assets fetch --model_dir=gs://...` streams each verified download local -> gs:// and builds the
part table there; a worker's `resolve()` streams gs:// -> its local cache and checks the sha256
of the bytes it copied. Beam's `FileSystems.copy` raised BeamIOError on both (issue 11, finding 1).
Each step runs in a fresh process (Beam caches GCS credentials per process) with a test registry
of files served from loopback HTTP (no network)."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.gcs_emulator import REPO
from tests.test_annotate_assets import DIGEST, PAYLOAD, mesh_files, server  # noqa: F401 (fixtures)
from transforms.assets import Asset

pytestmark = pytest.mark.slow

# Runs in the child: install the test registry (argv[1], JSON), then the rest of the code.
_PRELUDE = """
import json, sys
from transforms import assets
assets.ASSETS = [assets.Asset(**fields) for fields in json.loads(sys.argv[1])]
"""
_CLI = _PRELUDE + "from beam_jobs import assets as cli\nsys.exit(cli.main(sys.argv[2:]))\n"
_RESOLVE = _PRELUDE + "print(assets.resolve(sys.argv[2], sys.argv[3]))\n"


def _registry(base: str) -> list[Asset]:
    return [Asset("exact", base + "good.bin", "exact.bin", sha256=DIGEST),
            Asset("tofu", base + "good.bin", "tofu.bin"),
            Asset("smpl_subdiv", base + "subdiv.mat", "SMPL_subdiv.mat"),
            Asset("smpl_subdiv_transform", base + "transform.mat", "SMPL_SUBDIV_TRANSFORM.mat")]


def _child(emulator, code: str, registry: list[Asset], *args: str, cache=None):
    env = dict(emulator.env, **({"FDH_BEAM_CACHE": str(cache)} if cache else {}))
    return subprocess.run([sys.executable, "-c", code, json.dumps([asdict(a) for a in registry]),
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.fixture(scope="module")
def gs_model_dir(gcs_emulator, server, mesh_files):  # noqa: F811 (fixtures)
    """`assets fetch --model_dir=gs://BUCKET/models` with the test registry; yields the URL."""
    registry = _registry(server[0])
    model_dir = gcs_emulator.url("models")
    done = _child(gcs_emulator, _CLI, registry, "fetch", f"--model_dir={model_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    return model_dir, registry


def test_fetch_puts_every_asset_and_the_part_table_on_gcs(gs_model_dir, gcs_emulator, mesh_files):  # noqa: F811
    model_dir, registry = gs_model_dir
    names = gcs_emulator.names("models/")
    assert names == {"models/" + name for name in (
        "exact.bin", "tofu.bin", "SMPL_subdiv.mat", "SMPL_SUBDIV_TRANSFORM.mat",
        "part_table.npy", "part_table.json", "assets.lock.json")}
    assert gcs_emulator.read("models/exact.bin") == PAYLOAD == gcs_emulator.read("models/tofu.bin")
    assert gcs_emulator.read("models/SMPL_subdiv.mat") == (mesh_files / "subdiv.mat").read_bytes()
    lock = json.loads(gcs_emulator.read("models/assets.lock.json"))
    assert set(lock) == {"tofu", "smpl_subdiv", "smpl_subdiv_transform", "part_table"}
    verified = _child(gcs_emulator, _CLI, registry, "verify", f"--model_dir={model_dir}")
    assert verified.returncode == 0, verified.stderr[-3000:]
    assert [line.split("\t")[:2] for line in verified.stdout.splitlines()] == [
        ["ok", "exact"], ["ok", "tofu"], ["ok", "smpl_subdiv"], ["ok", "smpl_subdiv_transform"],
        ["ok", "part_table"]]


def test_workers_copy_gcs_assets_into_their_local_cache_verified(gs_model_dir, gcs_emulator,
                                                                 tmp_path):
    model_dir, registry = gs_model_dir
    done = _child(gcs_emulator, _RESOLVE, registry, "tofu", model_dir, cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    local = done.stdout.strip()
    assert local.startswith(str(tmp_path / "cache")) and Path(local).read_bytes() == PAYLOAD


def test_a_tampered_gcs_asset_fails_verification_and_leaves_nothing_in_the_cache(
        gs_model_dir, gcs_emulator, tmp_path):
    _, registry = gs_model_dir
    gcs_emulator.bucket.blob("bad/exact.bin").upload_from_string(PAYLOAD + b"tampered")
    done = _child(gcs_emulator, _RESOLVE, registry, "exact", gcs_emulator.url("bad"),
                  cache=tmp_path / "cache")
    assert done.returncode != 0 and "ChecksumMismatchError" in done.stderr
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    verified = _child(gcs_emulator, _CLI, registry, "verify", f"--model_dir={gcs_emulator.url('bad')}",
                      "--names=exact,tofu")
    assert verified.returncode == 2
    assert [line.split("\t")[:2] for line in verified.stderr.splitlines()
            if line.startswith(("BAD", "MISSING"))] == [["BAD", "exact"], ["MISSING", "tofu"]]


# Checks a Dataflow launch with each model dir of argv[2] (comma-separated): one line per dir.
_LAUNCH = _PRELUDE + """
from beam_jobs.common import UsageError, split_job_flags
from beam_jobs.launch_checks import check_remote_launch
from beam_jobs.rebuild import RebuildOptions
for model_dir in sys.argv[2].split(","):
    try:
        check_remote_launch(*split_job_flags(RebuildOptions, [*sys.argv[3:], "--model_dir=" + model_dir]))
        print("launch ok")
    except UsageError as error:
        print(f"error: {error}")
"""


def test_dataflow_launch_check_reads_the_gcs_model_dir(gs_model_dir, gcs_emulator):
    model_dir, registry = gs_model_dir
    flags = ["--yfcc=gs://b/y", "--output=gs://b/o", "--runner=DataflowRunner",
             "--temp_location=gs://b/tmp", "--sdk_container_image=img", "--random_weights"]
    done = _child(gcs_emulator, _LAUNCH, registry, f"{model_dir},{gcs_emulator.url('none')}", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "launch ok",
        "error: --model_dir=gs://fdh-test/none is not ready (part_table MISSING): run "
        "`python -m beam_jobs.assets fetch --model_dir=gs://fdh-test/none`, then "
        "`python -m beam_jobs.assets verify --model_dir=gs://fdh-test/none`"]
