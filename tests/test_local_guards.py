"""Traps a new user falls into on a local run, each refused or shown plainly (issue 13)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

from beam_jobs import demo, search_user, stats, takedown
from beam_jobs.common import UsageError
from beam_jobs.nsid import check_nsids, nsid_hint
from transforms.s5_annotate import Annotate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_with_the_lite_annotator_is_an_error():
    with pytest.raises(ValueError, match="MediaPipe runs on the CPU"):
        Annotate(annotator="lite", device="GPU")
    with pytest.raises(ValueError, match="--annotator=fdh"):
        Annotate(annotator="lite", device="gpu")


@pytest.mark.parametrize("value,hint", [
    ("10000001", "did you mean 10000001@N01?"),
    ("10000001@n01", "did you mean 10000001@N01?"),
    ("10000001@1", "did you mean 10000001@N01?"),
])
def test_malformed_nsids_get_a_hint(value, hint):
    assert hint in nsid_hint(value)
    with pytest.raises(UsageError, match="is not a Flickr NSID"):
        check_nsids(["12345678@N00", value])


def test_well_formed_and_unusual_nsids_pass():
    """Any text YFCC's NSID column holds must stay takedown-able (issue 10, finding 3)."""
    assert nsid_hint("12345678@N00") is None
    assert check_nsids(["1@N01", "98765432@N08", "a#b cé%41@N01"]) == [
        "1@N01", "98765432@N08", "a#b cé%41@N01"]


def test_search_user_and_takedown_refuse_a_bare_number_with_the_hint(tmp_path, capsys):
    for job in (search_user, takedown):
        with pytest.raises(SystemExit) as exit_info:
            job.main([f"--dataset={tmp_path}", "--user_nsid=10000001"])
        assert exit_info.value.code == 2
        assert "did you mean 10000001@N01?" in capsys.readouterr().err


def _shard(license_: str, split: str, samples: int, size: int) -> dict:
    return {"license": license_, "split": split, "samples": samples, "bytes": size,
            "path": f"{license_}/{split}/x.tar"}


def test_stats_table_has_no_repeated_all_row_and_shows_small_sizes_in_kib():
    table = stats.license_table([
        _shard("cc-by-2", "train", 3, 40 * 1024), _shard("cc-by-2", "val", 1, 10 * 1024),
        _shard("cc-by-sa-2", "train", 2, 40 * 1024)])
    rows = [line.split() for line in table.splitlines()]
    assert [row[:2] for row in rows if row[0] == "cc-by-sa-2"] == [["cc-by-sa-2", "train"]]
    assert [row[:2] for row in rows if row[0] == "cc-by-2"] == [
        ["cc-by-2", "train"], ["cc-by-2", "val"], ["cc-by-2", "all"]]
    assert "40.0 KiB" in table and "0.0 MiB" not in table
    assert any(row[:2] == ["total", "all"] for row in rows)


def test_contact_sheet_legend_explains_the_tint_and_the_keypoints():
    sheet = Image.new("RGB", (demo.LEGEND_WIDTH, demo.LEGEND_HEIGHT), "white")
    demo.draw_legend(ImageDraw.Draw(sheet))
    assert sheet.getpixel((12, 12)) == demo.LEGEND[0][1]  # the tint swatch
    assert any("keypoints" in text for _, _, text in demo.LEGEND)
    assert any("mask" in text for _, _, text in demo.LEGEND)


def test_the_demo_imports_nothing_from_torch():
    code = ("import sys, beam_jobs.demo, beam_jobs.verify, beam_jobs.stats; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'torchvision', 'detectron2', 'densepose')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.stdout.strip() == "[]"


def test_the_demo_extra_has_mediapipe_and_no_torch():
    sys.path.insert(0, ROOT)
    try:
        import runpy
        captured = {}
        import setuptools
        original = setuptools.setup
        setuptools.setup = lambda **kwargs: captured.update(kwargs)
        try:
            runpy.run_path(os.path.join(ROOT, "setup.py"))
        finally:
            setuptools.setup = original
    finally:
        sys.path.remove(ROOT)
    demo_deps = captured["extras_require"]["demo"]
    assert any(dep.startswith("mediapipe") for dep in demo_deps)
    assert not any(dep.startswith(("torch", "detectron2")) for dep in
                   captured["install_requires"] + demo_deps)
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as handle:
        makefile = handle.read()
    assert "'.[demo]'" in makefile and "$(DEMO_VENV)/bin/python -m beam_jobs.demo" in makefile
