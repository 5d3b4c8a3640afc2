"""The scan job end to end: real files in, candidates/rejects Parquet + scan_counts.json out."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from beam_jobs import scan
from tests.yfcc_lines import random_records, record_line, write_lines
from transforms.records import LICENSES
from transforms.reject_limits import RejectRateExceeded
from transforms.s2_prefilter import PrefilterRules
from transforms.yfcc_format import format_line, parse_line

def _licence(name: str) -> dict:
    return {"license_name": name, "license_url": LICENSES.get(name, ("", "http://x/"))[1]}


def _write_inputs(directory: Path) -> tuple[str, str]:
    """Two YFCC files (23-column plain, 25-column bz2) and an opt-out list."""
    write_lines(directory / "a.txt", [
        record_line(1, title="one", user_tags=("new york", "people"), longitude=2.5,
                    latitude=48.5, accuracy=16),
        record_line(2, **_licence("Attribution-ShareAlike License")),
        record_line(3, **_licence("Attribution-NonCommercial License")),
        record_line(4, **_licence("Attribution-NonCommercial-ShareAlike License")),
        record_line(5, **_licence("Attribution-NoDerivs License")),
        record_line(6, marker=1),
        record_line(7, user_tags=("No_CV",)),
        record_line(8, user_nsid="888@N08"),
        record_line(9),
        record_line(10, **_licence("All Rights Reserved")),
        "",
        "bad\tline",
        record_line(1, title="duplicate"),
    ])
    write_lines(directory / "b.txt.bz2", [
        record_line(11, 25, date_taken=None),
        record_line(12, 25).replace("\t12\t", "\tx12\t", 1),
        record_line(13, 25, **_licence("Attribution-NonCommercial-NoDerivs License")),
    ])
    opt_out = directory / "opt_out.txt"
    opt_out.write_text("user:888@N08\nphoto:9\n")
    return f"{directory}/a.txt,{directory}/*.bz2", str(opt_out)


EXPECTED_REJECTS = {
    "read.blank_line": 1, "read.bad_field_count": 1, "read.bad_photo_id": 1,
    "prefilter.license_not_allowed": 2, "prefilter.license_unknown": 1, "prefilter.video": 1,
    "prefilter.no_cv_tag": 1, "prefilter.user_opt_out": 1, "prefilter.photo_opt_out": 1,
    "prefilter.duplicate_photo_id": 1,
}


@pytest.mark.pipeline
def test_scan_end_to_end(tmp_path, capsys):
    yfcc, opt_out = _write_inputs(tmp_path)
    output = tmp_path / "out"
    counts = scan.run([f"--yfcc={yfcc}", f"--output={output}", f"--opt_out={opt_out}",
                       "--max_reject_rate=none"])  # the world is 3 of 16 bad lines on purpose

    assert counts == json.loads((output / "scan_counts.json").read_text())
    assert counts["lines_read"] == 16
    assert counts["candidates_per_license"] == {
        "cc-by-2": 2, "cc-by-nc-2": 1, "cc-by-nc-sa-2": 1, "cc-by-sa-2": 1}
    assert counts["rejects_per_reason"] == EXPECTED_REJECTS
    assert counts["lines_read"] == counts["candidates"] + sum(EXPECTED_REJECTS.values())

    candidates = pd.read_parquet(output / "candidates").sort_values("photo_id")
    assert candidates["photo_id"].tolist() == [1, 2, 3, 4, 11]
    first = candidates.iloc[0]
    assert first["title"] == "one" and first["source"].endswith("a.txt:1")
    assert list(first["user_tags"]) == ["new york", "people"]
    assert (first["longitude"], first["latitude"], first["accuracy"]) == (2.5, 48.5, 16)
    eleventh = candidates.iloc[-1]
    assert pd.isna(eleventh["date_taken"]) and eleventh["line_idx"] == 11
    assert pd.isna(eleventh["longitude"])

    rejects = pd.read_parquet(output / "rejects")
    assert dict(Counter(rejects["stage"] + "." + rejects["reason"])) == EXPECTED_REJECTS
    assert set(rejects["photo_id"].dropna().astype(int)) == {1, 5, 6, 7, 8, 9, 10, 13}
    assert "lines read" in capsys.readouterr().out


@pytest.mark.pipeline
def test_scan_agrees_with_the_pure_rules_on_random_input(tmp_path):
    records = list(random_records(1500, seed=11))
    lines = [format_line(record, 23 if record.photo_id % 2 else 25) for record in records]
    rules = PrefilterRules.create(["cc-by-2", "cc-by-nc-2"], ["people", "no_cv"])
    # A kept photo of the second file repeated in the first one, and a short line.
    lines[100] = next(line for line in lines[700:] if rules.check(parse_line(line)) is None)
    lines[300] = lines[300].replace("\t", " ", 3)
    write_lines(tmp_path / "r-0.txt.gz", lines[:700])
    write_lines(tmp_path / "r-1.txt", lines[700:])
    counts = scan.run([f"--yfcc={tmp_path}/r-*", f"--output={tmp_path}/out", "--num_shards=2",
                       "--licenses=cc-by-2,cc-by-nc-2", "--drop_tags=people,no_cv"])

    parsed = [parse_line(line) for line in lines]
    kept = {r.photo_id: r for r in parsed if hasattr(r, "photo_id") and rules.check(r) is None}
    assert counts["lines_read"] == len(lines) == counts["candidates"] + counts["rejects"]
    assert counts["candidates_per_license"] == dict(sorted(Counter(
        r.license for r in kept.values()).items()))
    assert counts["rejects_per_reason"]["read.bad_field_count"] == 1
    assert counts["rejects_per_reason"]["prefilter.duplicate_photo_id"] == 1
    assert len(list((tmp_path / "out" / "candidates").glob("*.parquet"))) == 2

    # A second run into the same directory replaces the first run's shards.
    again = scan.run([f"--yfcc={tmp_path}/r-1.txt", f"--output={tmp_path}/out", "--num_shards=1"])
    assert len(pd.read_parquet(tmp_path / "out" / "candidates")) == again["candidates"]
    assert len(pd.read_parquet(tmp_path / "out" / "rejects")) == again["rejects"]


@pytest.mark.pipeline
def test_scan_flag_errors_are_raised_before_running(tmp_path):
    with pytest.raises(ValueError, match="--yfcc"):
        scan.run([f"--output={tmp_path}"])
    with pytest.raises(ValueError, match="cc-by-sa-2"):
        scan.run([f"--yfcc={tmp_path}/x", f"--output={tmp_path}", "--licenses=cc-by"])
    with pytest.raises(FileNotFoundError, match="missing"):
        scan.run([f"--yfcc={tmp_path}/missing*.bz2", f"--output={tmp_path}/out"])


def test_scan_help_explains_each_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        scan.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--yfcc", "--output", "--licenses", "--opt_out", "--drop_tags", "--num_shards"):
        assert flag in text


# ---- gs:// through a GCS emulator on loopback (tests/gcs_emulator.py) -----------------------------

@pytest.mark.pipeline
def test_scan_reads_and_writes_gcs_through_an_emulator(tmp_path, gcs_emulator):
    yfcc, opt_out = _write_inputs(tmp_path)
    for name in ("a.txt", "b.txt.bz2"):
        gcs_emulator.upload_file(tmp_path / name, f"meta/{name}")
    gcs_emulator.upload_file(opt_out, "lists/opt_out.txt")

    done = gcs_emulator.run_job(
        "beam_jobs.scan", f"--yfcc={gcs_emulator.url('meta/*.txt*')}",
        f"--output={gcs_emulator.url('scan')}", "--max_reject_rate=none",
        f"--opt_out={gcs_emulator.url('lists/opt_out.txt')}")
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(gcs_emulator.read("scan/scan_counts.json"))
    assert counts["lines_read"] == 16 and counts["candidates"] == 5
    assert counts["rejects_per_reason"] == EXPECTED_REJECTS
    names = gcs_emulator.names("scan/")
    assert any(name.startswith("scan/candidates/") and name.endswith(".parquet") for name in names)
    assert any(name.startswith("scan/rejects/") for name in names)
    assert not any("/_staging/" in name for name in names)  # the staged candidate tables


@pytest.mark.pipeline
def test_scan_reads_past_a_corrupt_file_then_fails_loudly_naming_it(tmp_path):
    write_lines(tmp_path / "good.txt", [record_line(1), record_line(2)])
    (tmp_path / "bad.txt.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"not gzip at all" * 10)
    with pytest.raises(RuntimeError, match="accounting broken"):
        scan.run([f"--yfcc={tmp_path}/*.txt*", f"--output={tmp_path / 'out'}"])
    rejects = pd.read_parquet(tmp_path / "out" / "rejects")
    assert rejects["reason"].tolist() == ["corrupt_input"]
    assert rejects["detail"].str.contains("bad.txt.gz").all()


@pytest.mark.pipeline
def test_scan_past_the_read_reject_limit_fails_loudly_with_an_example(tmp_path):
    """Issue 10, finding 10: `scan` of a file that is mostly not YFCC exited 0."""
    write_lines(tmp_path / "mix.txt", [record_line(1), record_line(2), "bad\tline", "bad", "bad"])
    with pytest.raises(RejectRateExceeded, match=r"read rejected 3 of 5 .*bad_field_count"):
        scan.run([f"--yfcc={tmp_path / 'mix.txt'}", f"--output={tmp_path / 'out'}"])
    counts = scan.run([f"--yfcc={tmp_path / 'mix.txt'}", f"--output={tmp_path / 'out'}",
                       "--max_reject_rate=read=0.7"])
    assert counts["candidates"] == 2
