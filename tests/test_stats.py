"""stats: the licence x split table, the funnel, and the two PNG charts."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from beam_jobs import stats
from tests.jobs_dataset import build_dataset
from dataset import stats as dataset_stats
from tests.conftest import exit_status


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("stats"))


def test_table_funnel_and_pngs(dataset, tmp_path, capsys):
    assert exit_status(stats.main, [f"--dataset={dataset}", f"--plots_dir={tmp_path / 'plots'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["licence", "split", "shards", "samples", "size", "share"]
    rows = {tuple(line.split()[:2]): line.split() for line in lines[3:13]}
    assert rows[("cc-by-2", "train")][2:4] == ["4", "6"]
    assert ("cc-by-2", "all") not in rows  # one split: no repeated "all" row
    assert rows[("cc-by-2", "train")][-1] == "50.0%"
    assert rows[("cc-by-nc-2", "val")][2:4] == ["1", "1"]
    assert rows[("total", "all")][2:4] == ["8", "12"] and rows[("total", "all")][-1] == "100.0%"
    funnel = lines[lines.index("Funnel (stats.json)"):]
    assert funnel[3].split() == ["lines", "read", "40", "100.0%"]
    assert [line.split() for line in funnel[4:6]] == [
        ["-", "prefilter.license_not_allowed", "12", "30.0%"],
        ["candidates", "(after", "prefilter)", "28", "70.0%"]]
    assert funnel[funnel.index("") - 1].split() == ["samples", "in", "the", "dataset", "12", "30.0%"]
    for name in (stats.PIE_FILE, stats.FUNNEL_FILE):
        path = tmp_path / "plots" / name
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 200
        assert path.stat().st_size > 10_000
    assert not (dataset / stats.PIE_FILE).exists()


def test_pngs_default_to_the_dataset_dir(dataset):
    stats.run([f"--dataset={dataset}"])
    assert (dataset / stats.PIE_FILE).stat().st_size > 0
    assert (dataset / stats.FUNNEL_FILE).stat().st_size > 0


def test_not_a_dataset_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        stats.main([f"--dataset={tmp_path}"])
    assert exit_.value.code == 2 and "not a dataset" in capsys.readouterr().err


def test_dataset_flag_is_required(capsys):
    with pytest.raises(SystemExit) as exit_:
        stats.main([])
    assert exit_.value.code == 2 and "--dataset" in capsys.readouterr().err


def test_license_rows_add_up(dataset):
    shards = json.loads((dataset / "manifest.json").read_text())["shards"]
    rows = dataset_stats.license_rows(shards)
    per_licence = [r for r in rows if r["split"] == "all" and r["license"] != "total"]
    assert sum(r["percent"] for r in per_licence) == pytest.approx(100.0)
    assert rows[-1]["samples"] == sum(r["samples"] for r in per_licence) == 12
    assert rows[-1]["bytes"] == sum(e["bytes"] for e in shards)


def test_empty_dataset_still_plots():
    assert stats.license_pie_png([])[:8] == b"\x89PNG\r\n\x1a\n"
    assert stats.funnel_png([])[:8] == b"\x89PNG\r\n\x1a\n"


def test_funnel_steps_follow_the_stages():
    steps = dataset_stats.funnel_steps({"funnel": {"write.bad_shape": 1, "fetch.not_found": 2,
                                                 "funnel.lines_read": 9, "funnel.candidates": 7,
                                                 "funnel.samples": 6, "read.bad_field_count": 2,
                                                 "zzz.other": 1},
                                      "totals": {"samples": 5}})
    assert steps == [("lines read", 9), ("  - read.bad_field_count", 2),
                     ("candidates (after prefilter)", 7), ("  - fetch.not_found", 2),
                     ("samples cropped", 6), ("  - write.bad_shape", 1),
                     ("zzz.other", 1), ("samples in the dataset", 5)]
