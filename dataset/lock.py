"""A run lock on an output folder: one rebuild or takedown at a time (issue 10, finding 2).

A lease file `OUTPUT/.fdh-run.lock` (JSON: job, run id, host, pid, expiry as unix time) is
created at launch and deleted at the end; a thread renews the expiry while the job runs, so a
killed launcher's lease goes stale after `lease_seconds`. A second job on the same output fails
at launch (`RunLockHeld`, a ValueError: one line and exit 2 through `run_main`) naming the holder
and the expiry. A stale lease is taken over: past its expiry, or written by a process on this
host that no longer exists.

Atomicity: on a local filesystem the lease is created with O_CREAT|O_EXCL, so of two launchers
exactly one wins. Through Beam's FileSystems (gs://) there is no create-if-absent: the lease is
written only when none exists, then read back after a short pause and kept only if it still
holds this run's id. Two launchers racing inside that window (about a second) on gs:// can both
start; the read-back catches the common case where one write lands before the other's check.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

from dataset import fs
from dataset.ownership import LOCK_FILE

DEFAULT_LEASE_SECONDS = 900.0  # renewed every third of it while the job runs
READ_BACK_PAUSE_SECONDS = 1.0  # gs://: how long to wait before checking the lease is still ours


class RunLockHeld(ValueError):
    """Another live job holds the output's lease (a user error: one line, exit 2)."""


@dataclass(frozen=True)
class Lease:
    """What a lease file holds."""

    job: str
    run_id: str
    host: str
    pid: int
    expires: float

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.expires))
        return f"{self.job} run {self.run_id} (host {self.host}, pid {self.pid}) until {when}"

    def is_stale(self, now: float) -> bool:
        """Past its expiry, or held by a process of this host that has gone."""
        return now >= self.expires or (self.host == socket.gethostname() and not _alive(self.pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(output: str) -> str:
    return fs.join(output.rstrip("/"), LOCK_FILE)


def read_lease(output: str) -> Optional[Lease]:
    """The lease on `output`, or None (no file, or one that does not parse: treated as stale)."""
    try:
        text = fs.read_text(lock_path(output))
        return None if text is None else Lease(**json.loads(text))
    except (OSError, ValueError, TypeError):
        return None


def _is_local(path: str) -> bool:
    return "://" not in path


def _create(path: str, lease: Lease) -> bool:
    """Create the lease file if none exists; False when another one is there."""
    data = json.dumps(asdict(lease), sort_keys=True).encode("utf-8")
    if _is_local(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        return True
    if fs.exists(path):
        return False
    fs.write_bytes_atomic(path, data)
    time.sleep(READ_BACK_PAUSE_SECONDS)
    held = read_lease(os.path.dirname(path))
    return held is not None and held.run_id == lease.run_id


def acquire(output: str, job: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> Lease:
    """Take the lease on `output` for `job`; RunLockHeld when a live one is there."""
    path = lock_path(output)
    for _ in range(3):
        lease = Lease(job, uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(),
                      time.time() + lease_seconds)
        if _create(path, lease):
            return lease
        held = read_lease(output)
        if held is not None and not held.is_stale(time.time()):
            raise RunLockHeld(f"{output} is in use by {held.describe()}; wait for it, or delete "
                              f"{path} if that job is gone")
        with contextlib.suppress(OSError):  # stale (or unreadable): take it over
            fs.delete([path])
    raise RunLockHeld(f"{output}: could not take the run lock {path} (another job keeps taking it)")


def release(output: str, lease: Lease) -> None:
    """Delete the lease file if it is still this run's."""
    held = read_lease(output)
    if held is not None and held.run_id == lease.run_id:
        with contextlib.suppress(OSError):
            fs.delete([lock_path(output)])


def _renew(output: str, lease: Lease, lease_seconds: float, stop: threading.Event) -> None:
    while not stop.wait(lease_seconds / 3):
        held = read_lease(output)
        if held is None or held.run_id != lease.run_id:
            return  # taken over (we were presumed dead): do not fight over it
        renewed = Lease(**{**asdict(lease), "expires": time.time() + lease_seconds})
        fs.write_bytes_atomic(lock_path(output), json.dumps(asdict(renewed), sort_keys=True).encode())


@contextlib.contextmanager
def run_lock(output: str, job: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> Iterator[Lease]:
    """Hold the output's lease for the body (renewed in the background, released at the end)."""
    lease = acquire(output, job, lease_seconds)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(output, lease, lease_seconds, stop),
                               name=f"run-lock-{lease.run_id}", daemon=True)
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join()
        release(output, lease)
