"""Progress of a local run on stderr: input read of total with ETA, lines, candidates, rejects.

    with report_progress("scan", total_bytes=input_size(patterns)):
        pipeline.run().wait_until_finish()

A thread reads `transforms.live_counts` (the running totals the read and prefilter steps keep
in this process) every few seconds and prints one line, or drives a tqdm bar when stderr is a
terminal. Multi-process and remote runners do not share those totals: on Dataflow watch the
job's counters instead (namespace 'fdh': read.lines, prefilter.passed_rules,
prefilter.candidates, fetch.*, annotate.*, write.samples, and <stage>.<reason> per reject).
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import IO, Iterator, Optional, Sequence

from apache_beam.io.filesystems import FileSystems

from transforms import live_counts

DEFAULT_INTERVAL_S = 5.0


def input_size(patterns: Sequence[str]) -> int:
    """Total bytes of the files the patterns match (as stored: compressed size); 0 if none."""
    return sum(metadata.size_in_bytes for result in FileSystems.match(list(patterns))
               for metadata in result.metadata_list)


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(label: str, totals: dict[str, int], total_bytes: int, elapsed_s: float) -> str:
    """One progress line from the running totals (see `transforms.live_counts`)."""
    read, lines = totals.get("read.bytes", 0), totals.get("read.lines", 0)
    parts = [f"{label}: {_duration(elapsed_s)}"]
    if total_bytes:
        share = min(read / total_bytes, 1.0)
        eta = f", ETA {_duration(elapsed_s * (1 - share) / share)}" if 0 < share < 1 else ""
        parts.append(f"read {_size(read)} of {_size(total_bytes)} ({100 * share:.0f}%{eta})")
    parts.append(f"{lines:,} lines ({lines / elapsed_s if elapsed_s else 0:,.0f}/s)")
    parts.append(f"{totals.get('prefilter.passed', 0):,} candidates")
    for name in ("fetch.fetched", "annotate.photos", "write.samples"):
        if name in totals:
            parts.append(f"{totals[name]:,} {name.split('.')[1]}")
    rates = [f"{stage} {100 * count / lines:.1f}%" for stage, count in sorted(
        (name.split(".", 1)[1], count) for name, count in totals.items()
        if name.startswith("rejects.")) if lines]
    if rates:
        parts.append("rejected " + ", ".join(rates))
    return ", ".join(parts)


class ProgressReporter:
    """Print `progress_line` every `interval_s` seconds from a daemon thread until stopped."""

    def __init__(self, label: str, total_bytes: int = 0, interval_s: float = DEFAULT_INTERVAL_S,
                 stream: Optional[IO[str]] = None, use_tqdm: Optional[bool] = None):
        self._label, self._total_bytes, self._interval_s = label, total_bytes, interval_s
        self._stream = stream or sys.stderr
        isatty = getattr(self._stream, "isatty", lambda: False)()
        self._use_tqdm = isatty if use_tqdm is None else use_tqdm
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._start = 0.0
        self._bar = None
        self._reports = 0

    def start(self) -> "ProgressReporter":
        live_counts.reset()
        self._start = time.monotonic()
        if self._use_tqdm:
            from tqdm import tqdm
            self._bar = tqdm(total=self._total_bytes or None, unit="B", unit_scale=True,
                             desc=self._label, file=self._stream)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.report()

    def report(self) -> None:
        """Print (or draw) the progress now."""
        self._reports += 1
        totals, elapsed = live_counts.snapshot(), time.monotonic() - self._start
        if self._bar is not None:
            self._bar.n = totals.get("read.bytes", 0)
            self._bar.set_postfix_str(progress_line("", totals, 0, elapsed).split(", ", 1)[-1],
                                      refresh=True)
        else:
            print(progress_line(self._label, totals, self._total_bytes, elapsed),
                  file=self._stream, flush=True)

    def stop(self) -> None:
        """Stop the thread; print the final totals when progress was shown (a run shorter
        than one interval stays quiet)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._reports:
            self.report()
        if self._bar is not None:
            self._bar.close()


@contextlib.contextmanager
def report_progress(label: str, total_bytes: int = 0, interval_s: Optional[float] = None,
                    stream: Optional[IO[str]] = None) -> Iterator[ProgressReporter]:
    """Report progress while the body runs (a local pipeline's run + wait_until_finish),
    every `interval_s` seconds (default DEFAULT_INTERVAL_S)."""
    reporter = ProgressReporter(label, total_bytes, interval_s or DEFAULT_INTERVAL_S,
                                stream).start()
    try:
        yield reporter
    finally:
        reporter.stop()
