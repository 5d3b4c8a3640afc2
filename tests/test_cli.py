"""One command-line contract for every job (beam_jobs/cli.py): unknown flags are refused with a
hint, Beam's flags pass through, user errors end with one line and exit 2, Ctrl-C with one line
and exit 130, --help says `python -m beam_jobs.NAME`, and local runs are quiet.

Real subprocesses of `python -m beam_jobs.NAME` where the start-up (~3 s) is worth it; the same
functions in-process otherwise."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from beam_jobs import cli, rebuild, scan, strip_embeddings, takedown, verify
from beam_jobs.common import JobOptions, UsageError, is_local, run_main, split_job_flags
from tests.yfcc_lines import record_line, write_lines

REPO = Path(__file__).resolve().parent.parent

# (job module, a misspelled flag, the flag the hint must name): every job on JobOptions.
MISSPELLED = [
    (rebuild, "--licence=cc-by-2", "--licenses"),
    (scan, "--licence=cc-by-2", "--licenses"),
    (verify, "--datset=x", "--dataset"),
    (takedown, "--user_nsd=1@N01", "--user_nsid"),
    (strip_embeddings, "--outptu=x", "--output"),
]
BEAM_FLAGS = ["--runner=DirectRunner", "--project=p", "--region=europe-west4",
              "--temp_location=gs://b/tmp", "--direct_num_workers=2",
              "--sdk_container_image=example/fdh:1", "--experiments=a", "--experiments=b",
              "--no_use_public_ips", "--save_main_session"]


@pytest.fixture(autouse=True)
def isolated_logging():
    """run_main configures the root logger as a job would: undo it after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    if cli._HANDLER is not None:
        root.removeHandler(cli._HANDLER)
        cli._HANDLER = None
    root.handlers[:], root.level = handlers, level


def run_job(*args: str, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    """`python -m <args>` in a fresh process from the repository root."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, **popen)


def tiny_yfcc(directory: Path) -> str:
    return write_lines(directory / "yfcc.txt", [record_line(1), record_line(2), "bad\tline"])


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ---- unknown flags -------------------------------------------------------------------------------

def test_misspelled_flag_on_the_command_line_exits_2_with_a_hint(tmp_path):
    """Finding 11: `rebuild --licence=cc-by-2` used to build all four licences (scan here: the
    same machinery, a third of rebuild's start-up)."""
    done = run_job("-m", "beam_jobs.scan", f"--yfcc={tiny_yfcc(tmp_path)}",
                   f"--output={tmp_path / 'out'}", "--licence=cc-by-2")
    assert done.returncode == 2
    assert stderr_lines(done.stderr) == [
        "error: unknown flag --licence (did you mean --licenses?)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("job, flag, hint", MISSPELLED, ids=lambda v: getattr(v, "__name__", v))
def test_every_job_refuses_a_misspelled_flag(job, flag, hint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        job.run([flag])
    assert exit_info.value.code == 2
    name = flag.split("=")[0]
    assert stderr_lines(capsys.readouterr().err) == [
        f"error: unknown flag {name} (did you mean {hint}?)"]


def test_beam_and_dataflow_flags_pass_through_and_their_typos_do_not(tmp_path, capsys):
    job, options = split_job_flags(scan.ScanOptions, ["--yfcc=a", "--output=b", *BEAM_FLAGS])
    assert (job.yfcc, job.output) == ("a", "b")
    values = options.get_all_options()
    assert values["project"] == "p" and values["region"] == "europe-west4"
    assert values["experiments"] == ["a", "b"] and values["direct_num_workers"] == 2
    assert values["sdk_container_image"] == "example/fdh:1" and values["use_public_ips"] is False
    assert is_local(job) and is_local(options)

    with pytest.raises(SystemExit) as exit_info:
        split_job_flags(scan.ScanOptions, ["--yfcc=a", *BEAM_FLAGS, "--regoin=x", "stray"])
    assert exit_info.value.code == 2
    assert stderr_lines(capsys.readouterr().err) == [
        "error: unknown flag --regoin (did you mean --region?)"]


def test_bad_values_and_stray_arguments_are_one_line_usage_errors(capsys):
    for argv, message in (
            (["--direct_num_workers=many"], "argument --direct_num_workers: invalid int value"),
            (["--num_shards=x"], "argument --num_shards: invalid int value: 'x'"),
            (["stray"], "unexpected argument 'stray'"),
            (["--licence", "cc-by-2"], "unknown flag --licence (did you mean --licenses?)")):
        with pytest.raises(SystemExit) as exit_info:
            split_job_flags(scan.ScanOptions, argv)
        assert exit_info.value.code == 2
        lines = stderr_lines(capsys.readouterr().err)
        assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines


# ---- required flags and --help -------------------------------------------------------------------

class _RequiredOptions(JobOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--dataset", required=True, help="a built dataset")
        parser.add_argument("--limit", type=int, default=7, help="at most this many")
        parser.add_argument("--tags", action="append", default=[], help="repeatable")


def test_missing_required_flag_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        split_job_flags(_RequiredOptions, ["--limit=3"])
    assert exit_info.value.code == 2
    assert stderr_lines(capsys.readouterr().err) == [
        "error: the following arguments are required: --dataset "
        "(see python -m tests.test_cli --help)"]
    job, _ = split_job_flags(_RequiredOptions, ["--dataset=d"])
    assert job.as_dict() == {"dataset": "d", "limit": 7, "tags": [], "verbose": False}


def test_help_marks_required_flags_and_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        split_job_flags(_RequiredOptions, ["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m tests.test_cli [-h] --dataset DATASET")
    assert "a built dataset (required)" in text and "at most this many (default: 7)" in text
    assert "repeatable (default" not in text  # empty defaults are not worth a mention
    assert "--verbose" in text and "--sdk_container_image" in text


def test_job_help_says_python_m_beam_jobs_name(capsys):
    done = run_job("-m", "beam_jobs.verify", "--help")
    assert done.returncode == 0 and done.stderr == ""
    assert " ".join(done.stdout.split()).startswith("usage: python -m beam_jobs.verify [-h]")
    with pytest.raises(SystemExit):
        rebuild.run(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m beam_jobs.rebuild [-h]")
    assert "(default: 0.017)" in text and "(default: fdh)" in text


# ---- user errors, --verbose, Ctrl-C --------------------------------------------------------------

def _launch(code: str, *args: str, **popen):
    """Start a job the way `python -m beam_jobs.NAME` does once its main() is `run_main(run)`:
    the job's logging is set up before Beam is imported."""
    script = "from beam_jobs import cli\ncli.configure_logging('--verbose' in __import__('sys').argv)\n"
    return run_job("-c", script + textwrap.dedent(code), *args, **popen)


def test_user_error_is_one_line_without_traceback(tmp_path):
    """Finding 13: a missing input printed a long traceback."""
    done = _launch("""
        from beam_jobs import scan
        from beam_jobs.common import run_main
        run_main(scan.run)
    """, f"--yfcc={tmp_path}/missing*.bz2", f"--output={tmp_path / 'out'}")
    assert done.returncode == 2
    lines = stderr_lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing" in lines[0], lines


@pytest.mark.parametrize("argv, message", [
    (["--output=OUT"], "scan needs --yfcc"),
    (["--yfcc=YFCC", "--output=OUT", "--licenses=cc-by"], "cc-by-sa-2"),
])
def test_value_errors_at_launch_are_user_errors(argv, message, tmp_path, capsys):
    argv = [arg.replace("YFCC", tiny_yfcc(tmp_path)).replace("OUT", str(tmp_path / "o"))
            for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        run_main(scan.run, argv)
    assert exit_info.value.code == 2
    lines = stderr_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_bad_image_source_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(rebuild.run, [f"--yfcc={tiny_yfcc(tmp_path)}", f"--output={tmp_path / 'o'}",
                               "--image_source=ftp:x", "--annotator=lite"])
    assert exit_info.value.code == 2
    lines = stderr_lines(capsys.readouterr().err)
    assert lines == ["error: unknown image source 'ftp:x': expected 'mirror:PREFIX', 'flickr' "
                     "or 'flickr:SIZE'"] or (len(lines) == 1 and "ftp:x" in lines[0]), lines


def test_verbose_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(scan.run, [f"--yfcc={tmp_path}/missing*.bz2", f"--output={tmp_path}/o",
                            "--verbose"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):" in err
    assert stderr_lines(err)[-1].startswith("error: ") and "missing" in err


def test_usage_error_class_and_exit_codes(capsys):
    def fails(argv):
        raise UsageError("--model_dir\nhas no weights")

    with pytest.raises(SystemExit) as exit_info:
        run_main(fails, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --model_dir has no weights\n"
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda argv: {"ok": False}, [], exit_code=lambda report: 0 if report["ok"] else 1)
    assert exit_info.value.code == 1


def test_failures_while_processing_elements_keep_their_traceback():
    """A ValueError out of a DoFn is a bug or bad data, not a bad command line: not hidden."""
    import apache_beam as beam

    from beam_jobs.common import make_pipeline

    def bad(_):
        raise ValueError("bug in a DoFn")

    def run(argv):
        _, options = split_job_flags(JobOptions, argv)
        with make_pipeline(options) as pipeline:
            _ = pipeline | beam.Create([1]) | beam.Map(bad)

    with pytest.raises(ValueError, match="bug in a DoFn"):
        run_main(run, [])


def test_keyboard_interrupt_is_one_line_and_exit_130(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_main(interrupted, [])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_ctrl_c_during_a_running_pipeline_is_one_line(tmp_path):
    """Finding 13: Ctrl-C printed ~200 lines (Beam wraps it in a RuntimeError)."""
    code = """
        import sys, time
        import apache_beam as beam
        from beam_jobs.common import JobOptions, make_pipeline, run_main, split_job_flags

        def slow(x):
            print("started", flush=True)
            time.sleep(60)

        def run(argv):
            _, options = split_job_flags(JobOptions, argv)
            with make_pipeline(options) as pipeline:
                _ = pipeline | beam.Create([1]) | beam.Map(slow)

        run_main(run)
    """
    script = "from beam_jobs import cli\ncli.configure_logging(False)\n" + textwrap.dedent(code)
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert process.stdout.readline().strip() == "started"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert stderr_lines(err) == ["interrupted"]


# ---- log noise -----------------------------------------------------------------------------------

def test_local_run_is_quiet(tmp_path):
    """A real scan: stdout is the summary, stderr is empty (no crcmod / Beam chatter)."""
    yfcc = tiny_yfcc(tmp_path)
    done = run_job("-m", "beam_jobs.scan", f"--yfcc={yfcc}", f"--output={tmp_path / 'out'}",
                   "--direct_num_workers=1", "--experiments=x", "--max_reject_rate=none")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and "candidates" in done.stdout


def _log(name: str, level: int, pathname: str, msg: str) -> None:
    logging.getLogger(name).handle(logging.makeLogRecord(
        {"name": name, "levelno": level, "levelname": logging.getLevelName(level),
         "pathname": pathname, "msg": msg}))


def test_project_log_records_still_show_when_quiet(capsys):
    beam_file = sys.modules["apache_beam"].__file__
    cli.configure_logging(verbose=False)
    _log("root", logging.WARNING, str(REPO / "transforms" / "s3_fetch.py"), "a project warning")
    _log("root", logging.WARNING, beam_file, "crcmod package not found")
    _log("apache_beam.runners", logging.ERROR, beam_file, "beam chatter")
    _log("apache_beam.io", logging.CRITICAL, beam_file, "critical from a library")
    err = capsys.readouterr().err
    assert "a project warning" in err and "critical from a library" in err
    assert "beam chatter" not in err and "crcmod" not in err
    cli.configure_logging(verbose=True)
    _log("apache_beam.runners", logging.WARNING, beam_file, "beam chatter")
    assert "beam chatter" in capsys.readouterr().err
