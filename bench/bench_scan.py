"""Bench the metadata scan: our line parser (and the Beam scan job) against pandas.read_csv.

    .venv/bin/python bench/bench_scan.py [--lines 200000] [--pipeline_lines 50000]

Generates plausible YFCC lines (tests/yfcc_lines.py: descriptions of varied length, tags,
geotags, six licences, both layouts) into one plain file, then times on one core, in this run:

* baseline: `pandas.read_csv(sep='\\t', header=None, quoting=QUOTE_NONE, dtype=str)` of the file
  (splits fields only: no URL decoding, no numbers, no records);
* core: `iter_lines` + `parse_numbered_lines` (stream the file, decode UTF-8, split, URL-decode,
  check numbers, build YfccRecord or Rejected), i.e. all of stage 1 but Beam;
* pipeline: the whole scan job (read + prefilter + Parquet + counts) on the in-process runner,
  one worker, on the first --pipeline_lines lines (0 skips it).

Prints lines/s and the ratio to pandas (target >= 1.0 for the core).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pandas as pd  # noqa: E402

from tests.yfcc_lines import random_records, write_lines  # noqa: E402
from transforms.s1_read import iter_lines, parse_numbered_lines  # noqa: E402
from transforms.yfcc_format import format_line  # noqa: E402


BENCH_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench_out")


def _best_of(repeats: int, function) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def time_pandas(path: str) -> float:
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


def time_pipeline(path: str, output: str) -> float:
    from beam_jobs import scan

    start = time.perf_counter()
    counts = scan.run([f"--yfcc={path}", f"--output={output}", "--num_shards=1"])
    elapsed = time.perf_counter() - start
    assert counts["lines_read"] == counts["candidates"] + counts["rejects"]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--pipeline_lines", type=int, default=50_000)
    parser.add_argument("--columns", type=int, choices=(23, 25), default=23,
                        help="one layout per file, as YFCC ships it (pandas needs one)")
    args = parser.parse_args()

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
            small = write_lines(os.path.join(workdir, "small.txt"), lines[:args.pipeline_lines])
            pipeline_s = time_pipeline(small, os.path.join(workdir, "out"))
            rate = min(args.pipeline_lines, len(lines)) / pipeline_s
            print(f"scan pipeline, 1 worker         {rate:>10,.0f} lines/s   "
                  f"ratio vs pandas {rate / pandas_rate:.2f}x   (read+prefilter+parquet+counts, "
                  f"incl. ~1-2 s pipeline start)")


if __name__ == "__main__":
    main()
