"""The cost planner (beam_jobs.plan): its arithmetic on a tiny example with round numbers, and
the printed plan, which must name every assumption with its value and where it comes from."""
from __future__ import annotations

import dataclasses

import pytest

from beam_jobs import plan as plan_job
from beam_jobs.plan import Assumptions, plan
from beam_jobs.scan import build_counts, write_json
from tests.conftest import exit_status

TINY = Assumptions(
    fetch_success=0.5, samples_per_candidate=0.1, samples_per_kept_photo=2,
    gpu_ms_per_photo=72_000, gpu_utilisation=0.5,
    read_ms_per_line=3600, fetch_decode_ms_per_candidate=36_000,
    select_crop_ms_per_sample=180_000, encode_ms_per_sample=180_000,
    write_mib_per_s=1 / 360, sample_bytes=2**20, cpu_utilisation=1, vcpus_per_worker=2,
    record_bytes=1000, gpu_in_bytes_per_photo=1e6, gpu_out_bytes_per_photo=1e6,
    gpu_out_bytes_per_sample=0.5e6, flickr_calls_per_kept_photo=2, flickr_calls_per_hour=5,
    target_hours=1, gpu_hour_price=3, cpu_worker_hour_price=0.5, shuffle_gb_price=10)


def test_arithmetic_on_a_tiny_example():
    result = plan(lines_read=1000, candidates=100, a=TINY)
    assert (result.photos_decoded, result.samples, result.kept_photos) == (50, 10, 5)
    assert result.gpu_hours == pytest.approx(2.0)  # 50 x 72 s = 1 h, at 50 % utilisation
    # 1000 x 3.6 s read + 100 x 36 s fetch + 10 x (180 + 180 + 360 s write of 1 MiB) = 4 h
    assert result.cpu_core_hours == pytest.approx(4.0)
    assert result.cpu_worker_hours == pytest.approx(2.0)
    assert (result.gpus_for_target, result.workers_for_target) == (2, 2)
    # 100 x 1 kB + 50 x (1 + 1 MB) + 10 x 0.5 MB out of the GPU composite + 10 x 1 MiB
    assert result.shuffle_bytes == pytest.approx(100_000 + 105_000_000 + 10 * 2**20)
    assert (result.flickr_api_calls, result.flickr_api_hours) == (pytest.approx(10), pytest.approx(2))
    assert result.dollars_gpu == pytest.approx(6) and result.dollars_cpu == pytest.approx(1)
    assert result.dollars_shuffle == pytest.approx(1.1558576)
    assert result.dollars == pytest.approx(8.1558576)


def test_defaults_come_from_the_measured_and_published_numbers():
    defaults = {name: (value, source) for name, value, _, source, _ in Assumptions().rows()}
    assert defaults["encode_ms_per_sample"] == (3.97, "measured")
    assert defaults["fetch_decode_ms_per_candidate"] == (1.95, "measured")
    assert defaults["samples_per_candidate"] == (pytest.approx(1_859_496 / 68_070_018, abs=1e-5),
                                                 "design.md")
    assert defaults["gpu_ms_per_photo"][1] == "estimate"
    assert all(source in ("measured", "issue 11", "design.md", "estimate", "example price")
               for _, source in defaults.values())


def test_prints_the_plan_from_scan_counts_with_every_assumption(tmp_path, capsys):
    counts = tmp_path / "scan_counts.json"
    write_json(str(counts), build_counts([(("lines_read", ""), 1000),
                                          (("candidates_per_license", "cc-by-2"), 60),
                                          (("candidates_per_license", "cc-by-nc-2"), 40),
                                          (("rejects_per_reason", "prefilter.license"), 900)]))
    names = [field.name for field in dataclasses.fields(Assumptions) if field.metadata]
    assert exit_status(plan_job.main, [f"--scan_counts={counts}", "--gpu_hour_price=3",
                          "--gpu_ms_per_photo=72000", "--gpu_utilisation=0.5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"FDH rebuild plan: 100 candidates of 1,000 lines read ({counts})")
    assert len(names) == 23
    for name in names:
        assert sum(line.startswith(f"  --{name}=") for line in out.splitlines()) == 1, name
    assert "  --gpu_hour_price=3 $/GPU-hour  [given]" in out
    assert "  --gpu_ms_per_photo=72000 GPU ms  [given]" in out
    assert "  --encode_ms_per_sample=3.97 CPU ms  [measured]" in out
    assert "  --shuffle_gb_price=0.011 $/GB  [example price]" in out
    # defaults otherwise: 100 x 0.97 decoded photos x 72 s / 0.5 = 3.88 GPU-hours at $3
    gpu_line = next(line for line in out.splitlines() if line.startswith("  GPU-hours"))
    assert gpu_line.split() == ["GPU-hours", "3.9", "1", "GPU(s)", "for", "12", "h", "$12"]
    assert "Not modelled: network bandwidth" in out


@pytest.mark.parametrize("argv, message", [
    ([], "plan needs --scan_counts"),
    (["--scan_counts=/nonexistent/scan_counts.json"], "not a scan_counts.json"),
    (["--candidates=10", "--vcpus_per_worker=0"], "--vcpus_per_worker=0: must be > 0"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    assert exit_status(plan_job.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
