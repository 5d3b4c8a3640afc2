"""A model dir (local or gs://): what it must hold, how to fill it, how to check it.

Shared helper (not a job) of `beam_jobs.assets`, `beam_jobs.part_table` and the launch checks
(`beam_jobs.launch_checks`). A model dir holds the registry's assets (transforms/assets.py), their
trust-on-first-use `assets.lock.json`, and `part_table.npy` (+ part_table.json), which is built
from the two DensePose .mat assets rather than downloaded; its sha256 goes into the lock file
under `part_table` when it is built, and is enforced afterwards like the other unpinned files.
"""
from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from apache_beam.io.filesystems import FileSystems

from transforms import assets
from transforms.s5_annotate.cse import CSE_MODEL_ASSET, PHI_ASSET
from transforms.s6_select import parts

PART_TABLE = "part_table"  # entry name (and lock-file key) of the built part table
PART_TABLE_INPUTS = (parts.SUBDIV_ASSET, parts.SUBDIV_TRANSFORM_ASSET)
# Only runs with DensePose CSE need these (`--no_embeddings` leaves them out).
EMBEDDING_ENTRIES = (CSE_MODEL_ASSET, PHI_ASSET, *PART_TABLE_INPUTS, PART_TABLE)
# Needs detectron2 and is not used by default: fetched only when named.
OPTIONAL_ASSETS = ("mask_rcnn_X_101_32x8d_FPN_3x",)
OK, MISSING, BAD = "ok", "MISSING", "BAD"


@dataclass(frozen=True)
class EntryStatus:
    """The state of one file of a model dir: ok, MISSING or BAD, with a human detail."""

    name: str
    path: str
    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK

    def line(self) -> str:
        """One tab-separated line: STATUS, name, path, detail."""
        return "\t".join(part for part in (self.status, self.name, self.path, self.detail) if part)


def entry_names(names: Optional[Iterable[str]] = None, no_embeddings: bool = False) -> list[str]:
    """The entries to fetch / verify: `names` (checked against the registry), else every
    registered asset but the optional ones, plus the part table; `no_embeddings` drops the CSE
    model, its phi basis and the part table with its inputs."""
    if names is not None:
        chosen = [name for name in names if name]
        for name in chosen:
            if name != PART_TABLE:
                assets.get_asset(name)  # KeyError naming the registered ones
        return chosen
    skip = set(OPTIONAL_ASSETS) | (set(EMBEDDING_ENTRIES) if no_embeddings else set())
    every = [asset.name for asset in assets.ASSETS] + [PART_TABLE]
    return [name for name in every if name not in skip]


def entry_path(name: str, model_dir: str) -> str:
    """Where entry `name` lives in `model_dir`."""
    if name == PART_TABLE:
        return FileSystems.join(model_dir, parts.PART_TABLE_FILENAME)
    return assets.locate(name, model_dir)


def _check_part_table(path: str, lock: dict[str, str]) -> EntryStatus:
    try:
        parts.load_part_table(path)
    except (ValueError, OSError) as error:
        return EntryStatus(PART_TABLE, path, BAD, f"not a valid part table: {error}")
    digest = assets.sha256_file(path)
    if PART_TABLE in lock and lock[PART_TABLE] != digest:
        return EntryStatus(PART_TABLE, path, BAD,
                           f"sha256 {digest} does not match the lock file's {lock[PART_TABLE]}")
    return EntryStatus(PART_TABLE, path, OK, digest)


def check_entry(name: str, model_dir: str, lock: dict[str, str]) -> EntryStatus:
    """Whether entry `name` is in `model_dir` and matches its checksum (registry or lock file)."""
    path = entry_path(name, model_dir)
    if not FileSystems.exists(path):
        return EntryStatus(name, path, MISSING, "not in the model dir")
    if name == PART_TABLE:
        return _check_part_table(path, lock)
    try:
        digest, unpinned = assets.verify(assets.get_asset(name), path, lock)
    except assets.ChecksumMismatchError as error:
        return EntryStatus(name, path, BAD, str(error))
    return EntryStatus(name, path, OK, digest + ("  (not pinned yet: run fetch to record it)"
                                                 if unpinned else ""))


def check_model_dir(model_dir: str, names: Sequence[str]) -> list[EntryStatus]:
    """Check every entry of `names` in `model_dir` (reads each file once for its sha256)."""
    lock = assets.read_lock(model_dir)
    return [check_entry(name, model_dir, lock) for name in names]


def read_source(source: str, timeout_s: float = 120.0) -> bytes:
    """Bytes of an http(s) URL or of a path Beam's FileSystems can open (local, gs://)."""
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=timeout_s) as response:
            return response.read()
    with FileSystems.open(source) as handle:
        return handle.read()


def build_part_table(output: str, subdiv: str, transform: str, meshcapade: Optional[str] = None,
                     neck_distance: Optional[float] = None) -> str:
    """Build part_table.npy (+ .json with provenance) in `output` from the DensePose .mat files
    (URLs or paths), or by lifting a user-supplied Meshcapade segmentation; records its sha256
    in output's lock file. Returns the .npy path."""
    inputs = {"subdiv": subdiv, "transform": transform}
    if meshcapade:
        inputs["meshcapade"] = meshcapade
    data = {name: read_source(source) for name, source in inputs.items()}
    if meshcapade:
        table, info = parts.build_from_meshcapade(data["meshcapade"], data["subdiv"], data["transform"])
    else:
        table, info = parts.build_from_densepose(data["subdiv"], data["transform"], neck_distance)
    info["inputs"] = {name: {"source": inputs[name], "sha256": hashlib.sha256(blob).hexdigest()}
                      for name, blob in data.items()}
    path = parts.save_part_table(table, output, info)
    lock = assets.read_lock(output)
    lock[PART_TABLE] = assets.sha256_file(path)
    assets.write_lock(output, lock)
    logging.info("wrote %s: %s", path, {k: v for k, v in info.items() if k.startswith("count_")})
    return path


def _fetch_each(names: Sequence[str], model_dir: str, timeout_s: float,
                retries: int) -> dict[str, str]:
    """Download every asset of `names` that is not there yet; {name: why it failed}."""
    failures: dict[str, str] = {}
    for name in names:
        if name == PART_TABLE:
            continue
        try:
            assets.fetch([name], model_dir, timeout_s=timeout_s, retries=retries)
        except Exception as error:  # noqa: BLE001 offline, HTTP error, bad checksum: report, go on
            failures[name] = f"{type(error).__name__}: {error}"
    return failures


def _build_missing_part_table(model_dir: str) -> Optional[str]:
    """Build the part table from the .mat assets in `model_dir` when it is absent; returns why it
    could not be built (None when built or already there)."""
    if FileSystems.exists(entry_path(PART_TABLE, model_dir)):
        return None
    inputs = [entry_path(name, model_dir) for name in PART_TABLE_INPUTS]
    absent = [path for path in inputs if not FileSystems.exists(path)]
    if absent:
        return "built from " + " and ".join(inputs) + ", but " + ", ".join(absent) + " is missing"
    try:
        build_part_table(model_dir, *inputs)
    except (ValueError, OSError) as error:
        return f"could not build it from {' and '.join(inputs)}: {error}"
    return None


def prepare(model_dir: str, names: Sequence[str], timeout_s: float = 60.0,
            retries: int = 4) -> list[EntryStatus]:
    """Fill `model_dir` with `names` (download the assets, build the part table from the .mat
    assets), then check every entry. A download that fails does not stop the others: the entry
    comes back MISSING/BAD with the reason and the URL to fetch it from by hand."""
    if "://" not in model_dir:
        os.makedirs(model_dir, exist_ok=True)
    why = _fetch_each(names, model_dir, timeout_s, retries)
    if PART_TABLE in names:
        reason = _build_missing_part_table(model_dir)
        if reason:
            why[PART_TABLE] = reason
    statuses = check_model_dir(model_dir, names)
    return [_explain(status, why.get(status.name)) for status in statuses]


def _explain(status: EntryStatus, reason: Optional[str]) -> EntryStatus:
    if status.ok or not reason:
        return status
    hint = ("" if status.name == PART_TABLE else
            f"; put {assets.get_asset(status.name).url} there by hand")
    return EntryStatus(status.name, status.path, status.status, f"{reason}{hint}")
