"""Process-local running totals that a progress reporter reads while a local pipeline runs.

Beam's metrics are only readable once a local (in-process) pipeline has finished, so the read
and prefilter steps also add their totals here, per block or batch (cheap), for
`beam_jobs.progress` to print. On a remote or multi-process runner nothing reads them: watch the
Beam counters (namespace 'fdh') in the runner's UI instead.
"""
from __future__ import annotations

import threading
from collections import Counter

_LOCK = threading.Lock()
_TOTALS: Counter = Counter()


def add(name: str, amount: int = 1) -> None:
    """Add `amount` to the running total `name` (e.g. 'read.lines', 'rejects.prefilter')."""
    with _LOCK:
        _TOTALS[name] += amount


def add_all(amounts: dict[str, int]) -> None:
    """Add several totals at once."""
    with _LOCK:
        _TOTALS.update(amounts)


def snapshot() -> dict[str, int]:
    """A copy of the running totals."""
    with _LOCK:
        return dict(_TOTALS)


def reset() -> None:
    """Forget every total (at the start of a run)."""
    with _LOCK:
        _TOTALS.clear()
