"""Launch-time validation of remote runs (beam_jobs.launch_checks): each missing piece is one
UsageError line on the launcher, before anything is staged (issue 11, finding 3 and "launch-time
validation"). Job options come from the rebuild job's own flag parser; the model dirs are real
directories checked file by file."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from beam_jobs.common import UsageError, split_job_flags
from beam_jobs.launch_checks import check_remote_launch, required_model_entries
from beam_jobs.model_dir import PART_TABLE
from beam_jobs.rebuild import RebuildOptions
from transforms import assets
from transforms.assets import Asset
from transforms.s6_select import parts

DATAFLOW = ["--runner=DataflowRunner", "--temp_location=gs://b/tmp", "--sdk_container_image=img"]
FULL_RUN = ["keypointrcnn_resnet50_fpn_coco", "maskrcnn_resnet50_fpn_v2_coco",
            "densepose_rcnn_R_101_FPN_DL_soft_s1x", "phi_smpl_27554_256", PART_TABLE]


def _check(*flags: str) -> None:
    check_remote_launch(*split_job_flags(RebuildOptions, ["--yfcc=y", "--output=gs://b/o", *flags]))


@pytest.fixture
def model_dir(monkeypatch, tmp_path):
    """A complete local model dir for a full fdh run: the registry's weights replaced by small
    files pinned in the lock file, and a part table."""
    registry = assets.registry()
    lock = {}
    fakes = []
    for name in FULL_RUN[:-1]:
        real = registry[name]
        fakes.append(Asset(name, real.url, real.filename))  # pinned by the lock file below
        payload = f"weights of {name}".encode()
        (tmp_path / real.filename).write_bytes(payload)
        lock[name] = hashlib.sha256(payload).hexdigest()
    monkeypatch.setattr(assets, "ASSETS", fakes)
    path = parts.save_part_table(np.zeros(27554, np.uint32), str(tmp_path))
    lock[PART_TABLE] = assets.sha256_file(path)
    assets.write_lock(str(tmp_path), lock)
    return tmp_path


def test_local_runs_are_not_checked():
    _check()  # no model dir, no temp location: fine in this process
    _check("--runner=DirectRunner", "--image_source=flickr")


def test_what_each_run_loads_from_the_model_dir():
    def entries(*flags):
        return required_model_entries(split_job_flags(RebuildOptions, list(flags))[0])

    assert entries() == FULL_RUN
    assert entries("--no_embeddings") == FULL_RUN[:2]
    assert entries("--random_weights") == [PART_TABLE]
    assert entries("--annotator=lite") == []


def test_a_complete_verified_model_dir_passes(model_dir):
    _check("--runner=PortableRunner", "--temp_location=/tmp/t", f"--model_dir={model_dir}")


@pytest.mark.parametrize("flags, message", [
    (["--runner=DataflowRunner", "--sdk_container_image=img"], "--temp_location=gs://BUCKET/tmp is required"),
    (["--runner=DataflowRunner", "--temp_location=gs://b/tmp"], "--sdk_container_image=IMAGE is required"),
    ([*DATAFLOW, "--annotator=lite", "--image_source=mirror:gs://m,flickr"], "--max_num_workers=N is required"),
    ([*DATAFLOW, "--annotator=lite", "--image_source=bogus"], "--image_source=bogus: unknown image source"),
    (DATAFLOW, "--model_dir is required with --runner=DataflowRunner"),
    ([*DATAFLOW, "--model_dir=/local/models"], "--model_dir=/local/models is a local path"),
])
def test_each_missing_piece_is_one_line(flags, message):
    with pytest.raises(UsageError) as error:
        _check(*flags)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_lite_and_a_worker_budget_need_nothing_more():
    _check(*DATAFLOW, "--annotator=lite", "--image_source=flickr", "--max_num_workers=8")


def test_an_incomplete_or_tampered_model_dir_is_refused(model_dir):
    (model_dir / parts.PART_TABLE_FILENAME).unlink()
    with pytest.raises(UsageError, match=r"part_table MISSING\): run `python -m beam_jobs.assets fetch"):
        _check("--runner=PortableRunner", "--temp_location=/tmp/t", f"--model_dir={model_dir}")
    with open(model_dir / assets.get_asset(FULL_RUN[0]).filename, "ab") as handle:
        handle.write(b"!")
    with pytest.raises(UsageError, match=f"{FULL_RUN[0]} BAD; part_table MISSING"):
        _check("--runner=PortableRunner", "--temp_location=/tmp/t", f"--model_dir={model_dir}")
    # --no_embeddings needs neither the part table nor the CSE files, but still the weights.
    with pytest.raises(UsageError, match=f"{FULL_RUN[0]} BAD\\)"):
        _check("--runner=PortableRunner", "--temp_location=/tmp/t", f"--model_dir={model_dir}",
               "--no_embeddings")
