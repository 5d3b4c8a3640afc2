"""Progress of a local run: a line on stderr at most every few seconds, from running totals."""
from __future__ import annotations

import io
import time

import pytest

from beam_jobs import progress, scan
from beam_jobs.progress import ProgressReporter, progress_line
from tests.yfcc_lines import random_records, write_lines
from transforms import live_counts
from transforms.yfcc_format import format_line


def test_progress_line_shows_share_eta_lines_candidates_and_reject_rates():
    line = progress_line("scan", {"read.bytes": 25 << 20, "read.lines": 40_000,
                                  "prefilter.passed": 27_000, "rejects.read": 40,
                                  "rejects.prefilter": 12_960}, 100 << 20, 10.0)
    assert line == ("scan: 10s, read 25.0 MiB of 100.0 MiB (25%, ETA 30s), 40,000 lines "
                    "(4,000/s), 27,000 candidates, rejected prefilter 32.4%, read 0.1%")


def test_reporter_prints_plain_lines_while_running_and_a_last_one():
    stream = io.StringIO()
    reporter = ProgressReporter("job", 1000, interval_s=0.05, stream=stream).start()
    live_counts.add_all({"read.bytes": 500, "read.lines": 10})
    time.sleep(0.3)
    reporter.stop()
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3
    assert "read 500 B of 1000 B (50%" in lines[-1] and "10 lines" in lines[-1]


@pytest.mark.pipeline
def test_scan_reports_progress_on_stderr(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "DEFAULT_INTERVAL_S", 0.05)
    write_lines(tmp_path / "y.txt", [format_line(r) for r in random_records(300, seed=2)])
    counts = scan.run([f"--yfcc={tmp_path}/y.txt", f"--output={tmp_path}/out", "--counts_only"])
    err = capsys.readouterr().err
    shown = [line for line in err.splitlines() if line.startswith("scan: ")]
    assert shown and "(100%)" in shown[-1]
    assert f"{counts['lines_read']:,} lines" in shown[-1]


def test_a_run_shorter_than_the_interval_prints_nothing():
    stream = io.StringIO()
    ProgressReporter("job", 10, interval_s=60, stream=stream).start().stop()
    assert stream.getvalue() == ""
