"""Peak memory of a local rebuild as the input grows: flat means what crosses the shuffles is small.

    .venv/bin/python bench/bench_rebuild_memory.py [--photos 500,5000] [--no_spill]
    .venv/bin/python bench/bench_rebuild_memory.py --reject_lines 100000,1000000 [--no_spill]

For each count, a world of that many photos (the demo's three people and two non-people, each a
distinct JPEG in a local mirror, bench_store.build_world) and its YFCC lines; then
`python -m beam_jobs.rebuild --annotator=lite` in a fresh process (the in-process runner, one
worker) whose peak RSS (VmHWM) is read when it ends. Prints each peak and last/first (target
<= 1.2x for 500 vs 5,000 photos). `--no_spill` runs the same rebuilds with the in-memory
shuffles (the baseline before transforms.spill), to show what spilling changes.

`--reject_lines` measures the rejects instead: YFCC lines (bench_scan's generator, unique ids)
of which only one licence (~9 %) is kept, so most lines are prefilter rejects and the
candidates fetch.not_found rejects (an empty local mirror); no photo is decoded. Before
SpilledFlatten every reject was held at the rejects' Flattens (~0.3 GB per million).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_scan import write_first_lines  # noqa: E402
from bench.bench_store import build_world  # noqa: E402
from tests.yfcc_lines import random_records, write_lines  # noqa: E402
from transforms.yfcc_format import format_line  # noqa: E402

CHILD = """
import sys
from beam_jobs import rebuild
if sys.argv[1] == "no_spill":
    rebuild.local_staging_dir = lambda job: ""
stats = rebuild.run(sys.argv[2:])
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print("PEAK_KIB", peak, "SAMPLES", stats["totals"]["samples"])
"""
REJECT_POOL = 2000  # distinct generated lines, repeated with unique photo ids


def photo_world(root: str, count: int) -> list[str]:
    """The rebuild flags for a world of `count` photos (built once under `root`)."""
    world = os.path.join(root, f"world-{count}")
    yfcc = os.path.join(world, "yfcc.txt")
    if not os.path.exists(yfcc):
        records = build_world(os.path.join(world, "mirror"), count)
        write_lines(yfcc, [format_line(record, 25) for record in records])
    return [f"--yfcc={yfcc}", f"--image_source=mirror:{os.path.join(world, 'mirror')}"]


def reject_world(root: str, count: int) -> list[str]:
    """The rebuild flags for `count` YFCC lines that nearly all end as rejects (see the doc)."""
    yfcc = os.path.join(root, f"rejects-{count}.txt")
    if not os.path.exists(yfcc):
        pool = [format_line(record, 23) for record in random_records(REJECT_POOL, seed=1)]
        write_first_lines(yfcc, pool, count, unique_ids=True)
    mirror = os.path.join(root, "empty-mirror")
    os.makedirs(mirror, exist_ok=True)
    return [f"--yfcc={yfcc}", f"--image_source=mirror:{mirror}", "--licenses=cc-by-sa-2",
            "--max_reject_rate=none"]


def peak_of_rebuild(root: str, name: str, flags: list[str], spill: bool) -> tuple[float, int, float]:
    """(peak RSS MiB, samples written, wall seconds) of a lite rebuild with `flags`."""
    output = os.path.join(root, f"out-{name}-{spill}")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "spill" if spill else "no_spill", *flags,
         f"--output={output}", "--annotator=lite", "--crawl_time=0"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    words = done.stdout.split("PEAK_KIB", 1)[1].split()
    shutil.rmtree(output, ignore_errors=True)
    return int(words[0]) / 1024, int(words[2]), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", default="500,5000")
    parser.add_argument("--reject_lines", default=None,
                        help="e.g. 100000,1000000: reject-heavy YFCC lines instead of photos")
    parser.add_argument("--no_spill", action="store_true",
                        help="also run without spilling (the in-memory shuffles)")
    args = parser.parse_args()
    world, unit = (reject_world, "lines") if args.reject_lines else (photo_world, "photos")
    counts = [int(part) for part in (args.reject_lines or args.photos).split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_rebuild_memory_") as root:
        for spill in (True, False)[:2 if args.no_spill else 1]:
            label = "spilled" if spill else "in-memory"
            peaks = []
            for count in counts:
                peak, samples, seconds = peak_of_rebuild(root, f"{unit}-{count}", world(root, count),
                                                         spill)
                peaks.append(peak)
                print(f"{label} rebuild, {count:,} {unit}: peak RSS {peak:,.0f} MiB, "
                      f"{samples:,} samples, {seconds:.0f} s", flush=True)
            print(f"{label}: last/first peak RSS {peaks[-1] / peaks[0]:.2f}x (target <= 1.2x)",
                  flush=True)

if __name__ == "__main__":
    main()
