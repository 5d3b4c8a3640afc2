"""Benchmark: fetch + decode ~500 px JPEGs from a loopback server, ours vs img2dataset 1.47.

Serves N real photos (skimage crops re-encoded at ~500 px, Multimedia Commons layout) from nginx
(if installed; else a Python ThreadingHTTPServer in a separate process), then in the same run:

* ours: `ImageFetcher.fetch` on a thread pool, `decode_image` on the consuming thread (as the
  FetchImages / DecodeImages DoFns do), and the same through a Beam pipeline FetchImages | DecodeImages (FnApiRunner);
* img2dataset 1.47 from its own venv (.venv-bench; it pins old deps), same URL list and thread
  count, `resize_mode=no`, `output_format=files` (it decodes with OpenCV and re-encodes).

Reports images/s per core = images / client CPU seconds (the server's CPU is not counted; it runs
in another process), wall images/s, and the ratio ours / img2dataset (target >= 1.2x). For
img2dataset the whole run's CPU includes its fixed start-up (imports, spawning its worker); its
steady-state cost is measured inside the worker (process CPU during `Downloader.__call__`, through a
sitecustomize hook on its PYTHONPATH) and the ratio is given against both. Also prints decode-alone
CPU ms per image. Usage: .venv/bin/python bench/bench_fetch.py [--images 300] [--threads 64]

`--guards` prints only what the issue-10 guards cost on the hot path (no img2dataset needed):
decode_image and quick_check CPU ms per image with and without the strict JPEG entropy check
(ratio), and the per-request cost of the deadline watchdog, the X-Robots-Tag check and the
mirror-hash check against ours' fetch + decode CPU per image.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transforms.image_checks import check_jpeg_entropy, quick_check  # noqa: E402
from transforms.s3_fetch import (DEFAULT_X_ROBOTS_TAG_DIRECTIVES, DeadlineWatchdog,  # noqa: E402
                                 FetchConfig, FetchImages, ImageFetcher, mirror_hash,
                                 parse_image_sources, robots_refusal)
from transforms.s4_decode import DecodeError, DecodeImages, decode_image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BENCH_PYTHON = REPO / ".venv-bench" / "bin" / "python"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "retina",
          "hubble_deep_field")


def make_images(root: Path, count: int, side: int = 500) -> list[str]:
    """Write `count` distinct ~500 px JPEGs in the mirror layout; return their hashes."""
    from skimage import data

    rng = np.random.default_rng(0)
    sources = [Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB") for name in PHOTOS]
    hashes = []
    for i in range(count):
        image = sources[i % len(sources)]
        w, h = image.size
        cw, ch = int(w * rng.uniform(0.7, 1.0)), int(h * rng.uniform(0.7, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = image.crop((x0, y0, x0 + cw, y0 + ch))
        scale = side / max(crop.size)
        crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BILINEAR)
        photo_hash = hashlib.md5(str(i).encode()).hexdigest()
        path = root / "data" / "images" / photo_hash[:3] / photo_hash[3:6] / f"{photo_hash}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, "JPEG", quality=int(rng.integers(85, 96)))
        hashes.append(photo_hash)
    return hashes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(root: Path, workdir: Path, kind: str) -> tuple[subprocess.Popen, int, str]:
    """nginx (1 worker) or a Python ThreadingHTTPServer (HTTP/1.1) serving `root` on 127.0.0.1."""
    port = free_port()
    if kind in ("auto", "nginx") and shutil.which("nginx"):
        conf = workdir / "nginx.conf"
        conf.write_text(textwrap.dedent(f"""
            worker_processes 1; daemon off; pid {workdir}/nginx.pid; error_log {workdir}/nginx.err;
            events {{ worker_connections 4096; }}
            http {{ access_log off; keepalive_requests 100000; sendfile on;
                   client_body_temp_path {workdir}; proxy_temp_path {workdir}; fastcgi_temp_path {workdir};
                   uwsgi_temp_path {workdir}; scgi_temp_path {workdir};
                   types {{ image/jpeg jpg; }}
                   server {{ listen 127.0.0.1:{port}; root {root}; }} }}
            """))
        process = subprocess.Popen(["nginx", "-p", str(workdir), "-c", str(conf)])
        name = "nginx"
    elif kind == "nginx":
        raise SystemExit("nginx not installed")
    else:
        code = textwrap.dedent(f"""
            import functools, http.server
            class H(http.server.SimpleHTTPRequestHandler):
                protocol_version = "HTTP/1.1"
                def log_message(self, *a): pass
            http.server.ThreadingHTTPServer(("127.0.0.1", {port}),
                functools.partial(H, directory={str(root)!r})).serve_forever()
            """)
        process = subprocess.Popen([sys.executable, "-c", code])
        name = "python ThreadingHTTPServer"
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port, name
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit(f"{name} did not start")


def run_ours(base_url: str, hashes: list[str], threads: int) -> dict:
    """Fetch on `threads` threads and decode on the consuming thread, as FetchImages | DecodeImages
    do (the fetch DoFn's pool, then the decode DoFn on the bundle thread); CPU of this process."""
    from tests.factories import make_record

    records = [make_record(i, photo_hash=h) for i, h in enumerate(hashes)]
    config = FetchConfig(threads=threads, per_host_concurrency=threads)
    fetcher = ImageFetcher(parse_image_sources(f"mirror:{base_url}"), config)

    def fetch_and_decode(batch) -> int:
        ok = 0
        for outcome in pool.map(fetcher.fetch, batch):
            try:
                ok += outcome.image is not None and decode_image(outcome.image.data) is not None
            except DecodeError:
                pass
        return ok

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        fetch_and_decode(records[:20])  # warm-up: connections, imports
        cpu0, wall0 = time.process_time(), time.perf_counter()
        ok = fetch_and_decode(records)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    fetcher.close()
    return {"ok": ok, "cpu": cpu, "wall": wall}


def run_ours_beam(base_url: str, hashes: list[str], threads: int) -> dict:
    """The same through a Beam pipeline FetchImages | DecodeImages (FnApiRunner, one process)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_jobs.common import make_pipeline, read_counters
    from tests.factories import make_record

    records = [make_record(i, photo_hash=h) for i, h in enumerate(hashes)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    pipeline = make_pipeline(PipelineOptions([]))
    fetched = pipeline | beam.Create(records) | FetchImages(f"mirror:{base_url}", threads=threads,
                                                             per_host_concurrency=threads)
    fetched.main | DecodeImages()
    result = pipeline.run()
    result.wait_until_finish()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"ok": read_counters(result).get("decode.ok", 0), "cpu": cpu, "wall": wall}


I2D_SCRIPT = """
import json, resource, sys, time
from img2dataset import download
url_list, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
c0, w0 = cpu(), time.perf_counter()
download(url_list=url_list, output_folder=out, processes_count=1, thread_count=threads,
         resize_mode="no", output_format="files", input_format="txt", timeout=10, retries=0,
         enable_wandb=False, number_sample_per_shard=100000)
print(json.dumps({"cpu": cpu() - c0, "wall": time.perf_counter() - w0}))
"""

# Loaded in img2dataset's processes (its spawned worker included): logs the process CPU spent in
# each Downloader.__call__ (one shard: fetch, decode, re-encode, write) to $I2D_CPU_LOG.
I2D_SITECUSTOMIZE = """
import json, os, time
if os.environ.get("I2D_CPU_LOG"):
    from img2dataset import downloader as _downloader
    _call = _downloader.Downloader.__call__
    def _timed_call(self, row):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        try:
            return _call(self, row)
        finally:
            with open(os.environ["I2D_CPU_LOG"], "a") as log:
                log.write(json.dumps({"cpu": time.process_time() - cpu0,
                                      "wall": time.perf_counter() - wall0}) + "\\n")
    _downloader.Downloader.__call__ = _timed_call
"""


def run_img2dataset(urls: list[str], workdir: Path, threads: int) -> dict:
    """img2dataset in its own venv; whole-run CPU (with children) and in-worker download CPU."""
    workdir.mkdir(parents=True)
    url_list = workdir / "urls.txt"
    url_list.write_text("\n".join(urls) + "\n")
    hook_dir = workdir / "i2d_hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(I2D_SITECUSTOMIZE)
    cpu_log = workdir / "i2d_cpu.jsonl"
    env = dict(os.environ, PYTHONPATH=str(hook_dir), I2D_CPU_LOG=str(cpu_log))
    out = workdir / "i2d_out"
    proc = subprocess.run([str(BENCH_PYTHON), "-c", I2D_SCRIPT, str(url_list), str(out), str(threads)],
                          capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"img2dataset failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["ok"] = len(list(out.rglob("*.jpg")))
    shards = [json.loads(line) for line in cpu_log.read_text().splitlines()]
    result["worker_cpu"] = sum(s["cpu"] for s in shards)
    result["worker_wall"] = sum(s["wall"] for s in shards)
    return result


def decode_alone(root: Path, hashes: list[str]) -> float:
    payloads = [(root / "data" / "images" / h[:3] / h[3:6] / f"{h}.jpg").read_bytes() for h in hashes]
    cpu0 = time.process_time()
    for payload in payloads:
        decode_image(payload)
    return (time.process_time() - cpu0) / len(payloads) * 1000


def _cpu_ms_per_call(function, items: list, repeat: int = 3) -> float:
    """Best-of-`repeat` CPU ms per call of `function` over `items`."""
    best = float("inf")
    for _ in range(repeat):
        cpu0 = time.process_time()
        for item in items:
            function(item)
        best = min(best, (time.process_time() - cpu0) / len(items) * 1000)
    return best


def guard_costs(root: Path, hashes: list[str], fetch_ms: float) -> None:
    """Print what each issue-10 guard costs per image (see the module docstring)."""
    from tests.factories import make_record

    payloads = [(root / "data" / "images" / h[:3] / h[3:6] / f"{h}.jpg").read_bytes() for h in hashes]
    decode_ms = _cpu_ms_per_call(decode_image, payloads)
    quick_ms = _cpu_ms_per_call(quick_check, payloads)
    entropy_ms = _cpu_ms_per_call(check_jpeg_entropy, payloads)
    print(f"decode_image: {decode_ms:.2f} ms CPU/img with the JPEG entropy check, "
          f"{decode_ms - entropy_ms:.2f} without: ratio {decode_ms / (decode_ms - entropy_ms):.2f}x")
    print(f"quick_check:  {quick_ms:.2f} ms CPU/img with it, {quick_ms - entropy_ms:.2f} without: "
          f"ratio {quick_ms / (quick_ms - entropy_ms):.2f}x (entropy check {entropy_ms:.2f} ms)")
    watchdog = DeadlineWatchdog()
    deadline = time.monotonic() + 3600

    def arm_and_cancel(_):
        DeadlineWatchdog.cancel(watchdog.arm(None, deadline))

    headers = [["noarchive, nofollow"], [], ["otherbot: noai"]] * 100
    records = [make_record(i, photo_hash=h) for i, h in enumerate(hashes)]
    costs = {"deadline watchdog (arm + cancel)": _cpu_ms_per_call(arm_and_cancel, list(range(3000))),
             "X-Robots-Tag check": _cpu_ms_per_call(
                 lambda v: robots_refusal(v, DEFAULT_X_ROBOTS_TAG_DIRECTIVES), headers),
             "mirror hash check": _cpu_ms_per_call(mirror_hash, records)}
    for name, ms in costs.items():
        print(f"{name:<34} {1000 * ms:6.2f} us/request = {100 * ms / fetch_ms:5.2f} % of "
              f"fetch + decode ({fetch_ms:.2f} ms CPU/img)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--threads", type=int, default=64, help="threads, ours and img2dataset")
    parser.add_argument("--server", choices=("auto", "nginx", "python"), default="auto")
    parser.add_argument("--repeat", type=int, default=3,
                        help="alternate runs of each; the run with the median CPU is reported")
    parser.add_argument("--no-beam", action="store_true", help="skip the Beam pipeline run")
    parser.add_argument("--guards", action="store_true", help="only the issue-10 guard costs")
    args = parser.parse_args()
    if args.guards:
        with tempfile.TemporaryDirectory(prefix="bench_guards_") as tmp:
            workdir = Path(tmp)
            hashes = make_images(workdir / "mirror", args.images)
            server, port, _ = start_server(workdir / "mirror", workdir, "python")
            try:
                ours = [run_ours(f"http://127.0.0.1:{port}", hashes, args.threads)
                        for _ in range(args.repeat)]
            finally:
                server.terminate()
                server.wait(timeout=10)
            fetch_ms = 1000 * min(run["cpu"] for run in ours) / args.images
            guard_costs(workdir / "mirror", hashes, fetch_ms)
        return
    if not BENCH_PYTHON.exists():
        raise SystemExit(f"{BENCH_PYTHON} missing: python3 -m venv .venv-bench && "
                         ".venv-bench/bin/pip install img2dataset==1.47.0")
    with tempfile.TemporaryDirectory(prefix="bench_fetch_") as tmp:
        workdir = Path(tmp)
        root = workdir / "mirror"
        hashes = make_images(root, args.images)
        mean_kb = np.mean([p.stat().st_size for p in root.rglob("*.jpg")]) / 1024
        server, port, server_name = start_server(root, workdir, args.server)
        base_url = f"http://127.0.0.1:{port}"
        urls = [f"{base_url}/data/images/{h[:3]}/{h[3:6]}/{h}.jpg" for h in hashes]
        runs: dict[str, list[dict]] = {"ours": [], "beam": [], "i2d": []}
        try:
            for attempt in range(args.repeat):
                runs["ours"].append(run_ours(base_url, hashes, args.threads))
                if not args.no_beam and attempt == 0:
                    runs["beam"].append(run_ours_beam(base_url, hashes, args.threads))
                runs["i2d"].append(run_img2dataset(urls, workdir / f"i2d_{attempt}", args.threads))
        finally:
            server.terminate()
            server.wait(timeout=10)
        decode_ms = decode_alone(root, hashes)

    n = args.images

    def median(results: list[dict], key: str = "cpu") -> dict:
        return sorted(results, key=lambda r: r[key])[len(results) // 2]

    ours, i2d = median(runs["ours"]), median(runs["i2d"], "worker_cpu")
    beam_run = runs["beam"][0] if runs["beam"] else None
    print(f"{n} JPEGs, mean {mean_kb:.0f} KiB, ~500 px, server: {server_name}, threads: {args.threads}, "
          f"cores on this machine: {os.cpu_count()}, median of {args.repeat} alternating runs")

    def line(name: str, result: dict, images: int, cpu: float) -> float:
        per_core = images / cpu
        print(f"  {name:<34} ok {result['ok']:>4}/{n}  wall {result['wall']:6.2f} s "
              f"({images / result['wall']:7.1f} img/s)  CPU {cpu:6.2f} s  -> {per_core:7.1f} img/s per core "
              f"({1000 * cpu / images:5.2f} ms CPU/img)")
        return per_core

    ours_rate = line("ours (fetch pool + decode)", ours, n, ours["cpu"])
    if beam_run:
        line("ours via Beam FetchImages|Decode", beam_run, n, beam_run["cpu"])
    i2d_rate = line("img2dataset 1.47 (whole run)", i2d, n, i2d["cpu"])
    i2d_worker = line("img2dataset 1.47 (in its worker)", dict(i2d, wall=i2d["worker_wall"]), n,
                      i2d["worker_cpu"])
    print(f"ratio ours / img2dataset, img/s per core: {ours_rate / i2d_rate:.2f}x vs its whole run, "
          f"{ours_rate / i2d_worker:.2f}x vs its download work alone (target >= 1.2x)")
    print(f"decode alone (decode_image, 1 thread): {decode_ms:.2f} ms CPU per image")


if __name__ == "__main__":
    main()
