"""A job-wide request rate split into per-process shares (one token bucket per worker process).

Flickr limits requests per API key, for the whole job; Beam runs the job's DoFns in
`max_num_workers x processes_per_worker` processes that do not talk to each other, so each
process throttles itself to its share. Used by the consent check; the fetch stage can use it for
its Flickr cap too.
"""
from __future__ import annotations


def process_rate_share(requests_per_second: float, max_num_workers: int = 1,
                       processes_per_worker: int = 1) -> float:
    """Requests per second one process may make so that the whole job stays at
    `requests_per_second` (job rate / (workers x processes per worker))."""
    if requests_per_second <= 0:
        raise ValueError(f"requests_per_second must be > 0, got {requests_per_second}")
    if max_num_workers < 1 or processes_per_worker < 1:
        raise ValueError(f"max_num_workers ({max_num_workers}) and processes_per_worker "
                         f"({processes_per_worker}) must be >= 1")
    return requests_per_second / (max_num_workers * processes_per_worker)
