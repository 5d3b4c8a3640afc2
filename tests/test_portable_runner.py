"""The rebuild through Beam's PortableRunner with SDK workers in separate processes, as on
Dataflow or Flink: the Python local job service plus an EXTERNAL worker pool on loopback
(`worker_pool_main`), so every DoFn is pickled, shipped and run in a process that sees only the
package. The demo world (beam_jobs.demo, the offline `lite` annotator) must give the same shards,
byte for byte, as the in-process run (same --crawl_time).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from beam_jobs import demo, rebuild

pytestmark = [pytest.mark.pipeline, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
CRAWL_TIME = "1637341702"
SAME_BYTES = ("metadata.json", "stats.json")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"service on port {port} exited with {process.returncode}"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


@pytest.fixture(scope="module")
def portable_services(tmp_path_factory):
    """(job endpoint, worker pool address): a local job service and an EXTERNAL worker pool
    whose SDK workers run this interpreter with the repository on PYTHONPATH."""
    logs = tmp_path_factory.mktemp("portable")
    env = dict(os.environ, PYTHONPATH=str(REPO),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    pool_port, job_port = _free_port(), _free_port()
    commands = ([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                 f"--service_port={pool_port}"],
                [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                 f"--port={job_port}"])
    processes = [subprocess.Popen(command, env=env, cwd=logs, stdout=open(logs / f"{i}.log", "w"),
                                  stderr=subprocess.STDOUT) for i, command in enumerate(commands)]
    try:
        _wait_for_port(pool_port, processes[0])
        _wait_for_port(job_port, processes[1])
        yield f"localhost:{job_port}", f"localhost:{pool_port}"
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


def _rejects(root: Path) -> list[tuple]:
    rows = pd.concat(pd.read_parquet(p) for p in sorted((root / "rejects").glob("*.parquet")))
    return sorted(map(tuple, rows.astype(str).itertuples(index=False)))


def test_portable_runner_with_external_workers_gives_the_same_shards(portable_services, tmp_path):
    job_endpoint, pool = portable_services
    yfcc, mirror = demo.build_sample(str(tmp_path / "input"))
    common = [f"--yfcc={yfcc}", f"--image_source=mirror:{mirror}", "--annotator=lite",
              f"--crawl_time={CRAWL_TIME}"]
    local, portable = tmp_path / "local", tmp_path / "portable"
    rebuild.run([*common, f"--output={local}"])
    rebuild.run([*common, f"--output={portable}", "--runner=PortableRunner",
                 f"--job_endpoint={job_endpoint}", "--environment_type=EXTERNAL",
                 f"--environment_config={pool}", f"--temp_location={tmp_path / 'tmp'}"])
    local_files, portable_files = _files(local), _files(portable)
    shards = sorted(name for name in local_files if name.endswith((".tar", ".parquet"))
                    and not name.startswith("rejects/"))
    assert shards and sorted(name for name in portable_files if name in shards) == shards
    for name in [*shards, *SAME_BYTES]:
        assert local_files[name].read_bytes() == portable_files[name].read_bytes(), name
    assert _rejects(local) == _rejects(portable)  # same rows; file order may differ by runner
