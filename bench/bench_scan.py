"""Bench the metadata scan: our line parser and the Beam scan job, each against a baseline.

    .venv/bin/python bench/bench_scan.py [--lines 200000] [--pipeline_lines 100000]
                                         [--rss_lines 100000,400000]

Generates plausible YFCC lines (tests/yfcc_lines.py: descriptions of varied length, tags,
geotags, six licences, both layouts) into one plain file (cached in bench_out/), then measures
on one core, in this run:

* core vs pandas: `iter_lines` + `parse_numbered_lines` (stream the file, decode UTF-8, split,
  URL-decode, check numbers, build YfccRecord or Rejected), i.e. all of stage 1 but Beam,
  against `pandas.read_csv(sep='\\t', header=None, quoting=QUOTE_NONE, dtype=str)` (splits
  fields only: no URL decoding, no numbers, no records). Target >= 1.0x.
* pipeline vs Beam floor: the whole scan job (read + prefilter + duplicate check + Parquet +
  counts) on the in-process runner, one worker, on the first --pipeline_lines lines, against
  the cheapest Beam job over the same lines (ReadFromText | Map(len) | sum), and against pandas;
  also "less start-up": the rate once running (the time of a 1,000-line run subtracted), which
  is what a long Dataflow job sees per worker core.
* the same for `scan --counts_only` (Arrow blocks, only counts written): target >= 2x pandas.
* with --scale_lines N: the whole scan job (counts-only and full) on N lines (the generated
  lines repeated, unique ids) against pandas on the same file, start-up included: what a
  worker core sees on a large input.
* peak RSS of the core in a fresh process for each of --rss_lines (must stay flat: streaming),
  and of the scan job for each of --scan_rss_lines (counts-only; with --scan_rss_full also the
  full scan): target last/first <= 1.2x.
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.yfcc_lines import random_records, write_lines  # noqa: E402
from transforms.s1_read import iter_lines, parse_numbered_lines  # noqa: E402
from transforms.yfcc_format import format_line  # noqa: E402


STARTUP_LINES = 1000  # a run this small measures the fixed start-up cost of a pipeline
BENCH_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench_out")


def _best_of(repeats: int, function) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def time_pandas(path: str) -> float:
    import pandas as pd  # here, so that the peak RSS children do not load it

    def read():
        frame = pd.read_csv(path, sep="\t", header=None, quoting=csv.QUOTE_NONE, dtype=str,
                            keep_default_na=False)
        assert frame.shape[1] in (23, 25)
    return _best_of(3, read)


def time_core(path: str) -> float:
    def parse():
        with open(path, "rb") as stream:
            for item in parse_numbered_lines(iter_lines(stream), path):
                assert item.source if hasattr(item, "source") else True
    return _best_of(3, parse)


def time_pipeline(path: str, output: str, counts_only: bool = False,
                  one_shard: bool = False) -> float:
    """Seconds of one scan run, with the runner's choice of Parquet files (the default: each
    bundle writes its own); `one_shard` writes one per output (Beam then groups every row in
    one place first)."""
    from beam_jobs import scan

    start = time.perf_counter()
    counts = scan.run([f"--yfcc={path}", f"--output={output}"]
                      + (["--num_shards=1"] if one_shard else [])
                      + (["--counts_only"] if counts_only else []))
    elapsed = time.perf_counter() - start
    assert counts["lines_read"] == counts["candidates"] + counts["rejects"]
    return elapsed


def time_beam_floor(path: str) -> float:
    """The cheapest one-worker Beam job over the same lines: read them, sum their lengths."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_jobs.common import make_pipeline

    start = time.perf_counter()
    with make_pipeline(PipelineOptions([])) as pipeline:
        _ = (pipeline | beam.io.ReadFromText(path) | beam.Map(len)
             | beam.CombineGlobally(sum))
    return time.perf_counter() - start


def parse_file(path: str) -> int:
    """Parse every line of `path` with the core; the number of lines."""
    count = 0
    with open(path, "rb") as stream:
        for _ in parse_numbered_lines(iter_lines(stream), path):
            count += 1
    return count


def peak_rss_mib() -> float:
    """This process's peak RSS in MiB. VmHWM, not getrusage's ru_maxrss: Linux carries a
    parent's ru_maxrss over fork + exec into the child, which would hide a small child."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mib_of_core(path: str) -> float:
    """Peak RSS (MiB) of a fresh process that parses `path` with the core."""
    done = subprocess.run([sys.executable, __file__, "--rss_child", path],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def write_first_lines(path: str, lines: list[str], count: int, unique_ids: bool = False) -> str:
    """A file of `count` lines: `lines` repeated as needed (ids repeat unless `unique_ids`: then
    the photo id of a 23-column line is its line number)."""
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(count):
            line = lines[index % len(lines)]
            if unique_ids:
                line = f"{index + 1}\t{line.partition(chr(9))[2]}"
            handle.write(line)
            handle.write("\n")
    return path


def peak_rss_mib_of_scan(path: str, output: str, counts_only: bool) -> float:
    """Peak RSS (MiB) of a fresh process that runs the scan job on `path` (one worker)."""
    done = subprocess.run([sys.executable, __file__, "--rss_scan_child", path, output]
                          + (["--counts_only"] if counts_only else []),
                          capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def print_scan_rss(workdir: str, lines: list[str], counts: list[int], full: bool) -> None:
    """The scan job's peak RSS at each line count, counts-only and with `full` also writing
    candidates and rejects (flat = bounded)."""
    paths = [write_first_lines(os.path.join(workdir, f"scan-rss-{count}.txt"), lines, count,
                               unique_ids=True) for count in counts]
    for counts_only in (True, False)[:2 if full else 1]:
        peaks = [peak_rss_mib_of_scan(path, os.path.join(workdir, "rss-out"), counts_only)
                 for path in paths]
        print(f"scan{' --counts_only' if counts_only else ''} peak RSS: " + ", ".join(
            f"{count:,} lines {peak:.0f} MiB" for count, peak in zip(counts, peaks))
            + f"   (last/first {peaks[-1] / peaks[0]:.2f}x; target <= 1.2x)")


def print_scale_rates(workdir: str, lines: list[str], count: int) -> None:
    """Whole-run lines/s of the scan (counts-only, then full) on `count` lines, each against
    pandas.read_csv on the same file in this run (one run each: the file is large)."""
    path = write_first_lines(os.path.join(workdir, f"scale-{count}.txt"), lines, count,
                             unique_ids=True)
    import pandas as pd

    start = time.perf_counter()
    pd.read_csv(path, sep="\t", header=None, quoting=csv.QUOTE_NONE, dtype=str,
                keep_default_na=False)
    pandas_rate = count / (time.perf_counter() - start)
    print(f"{count:,} lines: pandas.read_csv {pandas_rate:,.0f} lines/s")
    for counts_only in (True, False):
        rate = count / time_pipeline(path, os.path.join(workdir, "scale-out"), counts_only)
        note = "target >= 2x" if counts_only else "also URL-decodes and writes every row"
        print(f"  scan{' --counts_only' if counts_only else ''}, whole run {rate:>10,.0f} lines/s"
              f"   ratio vs pandas {rate / pandas_rate:.2f}x   ({note})")
    os.remove(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--pipeline_lines", type=int, default=100_000)
    parser.add_argument("--columns", type=int, choices=(23, 25), default=23,
                        help="one layout per file, as YFCC ships it (pandas needs one)")
    parser.add_argument("--rss_lines", default="100000,400000",
                        help="comma-separated line counts for the peak RSS check ('' skips it)")
    parser.add_argument("--scan_rss_lines", default="200000,2000000",
                        help="comma-separated line counts for the scan job's peak RSS check "
                             "('' skips it)")
    parser.add_argument("--scale_lines", type=int, default=0,
                        help="also time whole scan runs on this many lines vs pandas (0 skips)")
    parser.add_argument("--scan_rss_full", action="store_true",
                        help="also measure the full scan's peak RSS (slow)")
    parser.add_argument("--rss_child", help=argparse.SUPPRESS)
    parser.add_argument("--rss_scan_child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--counts_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:  # child process of peak_rss_mib_of_core
        parse_file(args.rss_child)
        print(peak_rss_mib())
        return
    if args.rss_scan_child:  # child process of peak_rss_mib_of_scan
        time_pipeline(*args.rss_scan_child, counts_only=args.counts_only)
        print(peak_rss_mib())
        return

    with tempfile.TemporaryDirectory(prefix="bench_scan_") as workdir:
        start = time.perf_counter()
        # Generating is slower than parsing (quote_plus per character): cache the file.
        path = os.path.join(BENCH_OUT, f"yfcc-{args.lines}-{args.columns}.txt")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        else:
            os.makedirs(BENCH_OUT, exist_ok=True)
            lines = [format_line(record, args.columns)
                     for record in random_records(args.lines, seed=1)]
            write_lines(path + ".tmp", lines)
            os.replace(path + ".tmp", path)
        size = os.path.getsize(path)
        print(f"generated {len(lines):,} lines of {args.columns} columns, "
              f"{size / len(lines):.0f} bytes/line on average, "
              f"max {max(map(len, lines)):,} chars, made/loaded in {time.perf_counter() - start:.1f} s")

        pandas_s = time_pandas(path)
        core_s = time_core(path)
        pandas_rate, core_rate = len(lines) / pandas_s, len(lines) / core_s
        print(f"pandas.read_csv (split only)    {pandas_rate:>10,.0f} lines/s")
        print(f"fdh parse core (full decode)    {core_rate:>10,.0f} lines/s   "
              f"ratio vs pandas {core_rate / pandas_rate:.2f}x   "
              f"({1e6 / core_rate:.1f} us/line)")
        if args.pipeline_lines:
            count = min(args.pipeline_lines, len(lines))
            small = write_lines(os.path.join(workdir, "small.txt"), lines[:count])
            tiny = write_lines(os.path.join(workdir, "tiny.txt"), lines[:STARTUP_LINES])
            floor_s = time_beam_floor(small)
            floor_start_s = time_beam_floor(tiny)
            pipeline_s = time_pipeline(small, os.path.join(workdir, "out"))
            pipeline_start_s = time_pipeline(tiny, os.path.join(workdir, "out"))
            floor_rate, rate = count / floor_s, count / pipeline_s
            # Lines/s once running: the time of `count` lines less that of STARTUP_LINES lines.
            floor_marginal = (count - STARTUP_LINES) / (floor_s - floor_start_s)
            marginal = (count - STARTUP_LINES) / (pipeline_s - pipeline_start_s)
            print(f"Beam floor (read+len+sum)       {floor_rate:>10,.0f} lines/s   "
                  f"({floor_marginal:,.0f} lines/s less start-up)")
            print(f"scan pipeline, 1 worker         {rate:>10,.0f} lines/s   "
                  f"ratio vs Beam floor {rate / floor_rate:.2f}x, vs pandas "
                  f"{rate / pandas_rate:.2f}x   (read+prefilter+dedupe+parquet+counts)")
            print(f"  less start-up ({pipeline_start_s:.1f} s)        {marginal:>10,.0f} lines/s   "
                  f"ratio vs Beam floor {marginal / floor_marginal:.2f}x, vs pandas "
                  f"{marginal / pandas_rate:.2f}x; 100M lines = "
                  f"{1e8 / marginal / 3600:,.1f} core-hours")
            counts_s = time_pipeline(small, os.path.join(workdir, "out"), counts_only=True)
            counts_start_s = time_pipeline(tiny, os.path.join(workdir, "out"), counts_only=True)
            counts_rate = count / counts_s
            counts_marginal = (count - STARTUP_LINES) / (counts_s - counts_start_s)
            print(f"scan --counts_only, 1 worker    {counts_rate:>10,.0f} lines/s   "
                  f"ratio vs pandas {counts_rate / pandas_rate:.2f}x   (target >= 2x)")
            print(f"  less start-up ({counts_start_s:.1f} s)        {counts_marginal:>10,.0f} "
                  f"lines/s   ratio vs pandas {counts_marginal / pandas_rate:.2f}x")
        if args.scale_lines:
            print_scale_rates(workdir, lines, args.scale_lines)
        scan_rss_counts = [int(part) for part in args.scan_rss_lines.split(",") if part]
        if scan_rss_counts and args.columns == 23:
            print_scan_rss(workdir, lines, scan_rss_counts, args.scan_rss_full)
        rss_counts = [int(part) for part in args.rss_lines.split(",") if part]
        if rss_counts:
            peaks = [peak_rss_mib_of_core(write_first_lines(
                os.path.join(workdir, f"rss-{count}.txt"), lines, count)) for count in rss_counts]
            print("core peak RSS: " + ", ".join(
                f"{count:,} lines {peak:.0f} MiB" for count, peak in zip(rss_counts, peaks))
                + f"   (last/first {peaks[-1] / peaks[0]:.2f}x; flat = streaming)")


if __name__ == "__main__":
    main()
