"""Which files in an output folder belong to the dataset there, and which a rebuild may delete.

A rebuild only ever deletes files that a previous run of this dataset listed in its
manifest.json (issue 10, finding 2): `removable_leftovers` is that rule, applied when the run
finishes (the previous manifest is still on disk then: the new one is written last).
`check_output_ownership` runs at launch: a folder holding another dataset (other licences or
other content configuration) or files no run of this job wrote is refused with one line unless
`--overwrite` is given. Even with `--overwrite` a file no manifest listed is never deleted.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Any, Iterable, Mapping, Optional

from dataset import fs
from dataset.annotations import STORE_DIRNAME
from dataset.layout import (MANIFEST_FILE, METADATA_FILE, OPT_OUT_FILE, REJECTS_DIR,
                            STAGED_SUFFIX, STATS_FILE, is_shard_file, shard_parquet_path)

# manifest "config" keys that decide which samples a dataset holds: a rebuild that differs in one
# of them builds another dataset. (--image_source, --opt_out, --crawl_time, throughput flags:
# the same dataset, so a rebuild may change them.)
CONTENT_CONFIG_KEYS = ("licenses", "annotator", "no_embeddings", "val_fraction", "split_by",
                       "yfcc")
# Files at the root that a run of the job (rebuild, takedown, verify, lock) writes.
RUN_FILES = (MANIFEST_FILE, METADATA_FILE, STATS_FILE, OPT_OUT_FILE, "takedown_report.json",
             "verify_report.json")
LOCK_FILE = ".fdh-run.lock"
BEAM_TEMP_PREFIX = "beam-temp-"  # Beam's file sinks' temporary folders (OUT/rejects/beam-temp-*)
OVERWRITE_FLAG = "--overwrite"
OVERWRITE_HELP = ("build into an output that holds another dataset (other licences or content "
                  "flags) or files this job did not write: the other dataset's shards that the new "
                  "manifest does not list are removed when the run finishes; files no manifest "
                  "listed are never deleted")


class OutputOwnershipError(ValueError):
    """The output folder holds something this rebuild must not build over (a user error: one
    line, exit 2, through beam_jobs.cli.run_main)."""


def is_temp_file(relative: str) -> bool:
    """A writer's hidden temporary file (`.NAME.tmp-<hex>`, `dataset.fs`) anywhere in the dataset."""
    return relative.rsplit("/", 1)[-1].startswith(".") and fs.TEMP_MARKER in relative


def manifest_files(manifest: Mapping[str, Any]) -> set[str]:
    """The shard files (tar and Parquet) a manifest lists, relative to the root; entries that are
    not shard paths (absolute, `..`, another name) are left out: never ours to delete."""
    files = set()
    for entry in manifest.get("shards", []):
        for path in (entry.get("path", ""), shard_parquet_path(entry) if entry.get("path") else ""):
            if is_shard_file(str(path)):
                files.add(str(path))
    return files


def _is_run_file(relative: str) -> bool:
    """A file some run of the project's jobs writes in a dataset (not a shard)."""
    return (relative in RUN_FILES or relative == LOCK_FILE or is_temp_file(relative)
            or relative.startswith((REJECTS_DIR + "/", STORE_DIRNAME + "/"))
            or relative.endswith(STAGED_SUFFIX))


def foreign_files(output: str, manifest: Optional[Mapping[str, Any]]) -> list[str]:
    """Files under `output` (relative) that neither the manifest lists nor a job run writes."""
    listed = manifest_files(manifest or {})
    found = [fs.relative_to(output, path) for path in fs.glob(fs.join(output, "**"))]
    return sorted(path for path in found if path not in listed and not _is_run_file(path))


def config_differences(previous: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """`key: old -> new` for each content key (`CONTENT_CONFIG_KEYS`) both configs hold and that differs."""
    return [f"{key}: {previous[key]!r} -> {config[key]!r}" for key in CONTENT_CONFIG_KEYS
            if key in previous and key in config and previous[key] != config[key]]


def check_output_ownership(output: str, config: Mapping[str, Any], overwrite: bool = False) -> None:
    """Refuse (OutputOwnershipError, one line) to rebuild into a folder holding another dataset or
    files no run of this dataset wrote, unless `overwrite`. Call it at launch, before the pipeline.

    `config` is the manifest "config" the rebuild will record. With `overwrite` the run goes on:
    the previous dataset's shards the new manifest does not list are removed when it finishes,
    files no manifest listed stay untouched.
    """
    output = output.rstrip("/")
    manifest = fs.load_json(output, MANIFEST_FILE) if fs.exists(fs.join(output, MANIFEST_FILE)) else None
    problems = []
    if manifest is not None:
        changed = config_differences(manifest.get("config") or {}, config)
        if changed:
            problems.append(f"holds another dataset ({'; '.join(changed)}); its files not in the "
                            f"new manifest would be removed")
    foreign = foreign_files(output, manifest)
    if foreign:
        why = "no manifest.json lists them" if manifest is None else "its manifest.json does not list them"
        problems.append(f"holds {len(foreign)} files this job did not write ({why}), e.g. "
                        f"{', '.join(foreign[:3])}; they are never deleted")
    if not problems:
        return
    if overwrite:
        logging.warning("%s: %s; building over it (%s)", output, "; ".join(problems), OVERWRITE_FLAG)
        return
    raise OutputOwnershipError(f"{output} {'; '.join(problems)}: choose another --output, or pass "
                               f"{OVERWRITE_FLAG} to build there anyway")


def removable_leftovers(output: str, new_shards: Iterable[Mapping[str, Any]]) -> list[str]:
    """Paths a finishing rebuild deletes: the writers' temporary files in the shard folders, and the
    shard files the previous manifest (still on disk) lists and the new one does not. Nothing else."""
    output = output.rstrip("/")
    keep = manifest_files({"shards": list(new_shards)})
    previous: set[str] = set()
    if fs.exists(fs.join(output, MANIFEST_FILE)):
        previous = manifest_files(fs.load_json(output, MANIFEST_FILE))
    stale = [fs.join(output, path) for path in sorted(previous - keep)
             if fs.exists(fs.join(output, path))]
    temporary = [path for path in fs.glob(fs.join(output, f"*/*/.*{fs.TEMP_MARKER}*"))
                 if is_temp_file(fs.relative_to(output, path))]
    return sorted(stale + temporary)


def remove_leftovers(output: str, new_shards: Iterable[Mapping[str, Any]]) -> list[str]:
    """Delete `removable_leftovers` (logged); returns what was deleted."""
    found = removable_leftovers(output, new_shards)
    if found:
        logging.info("removing %d leftover files under %s", len(found), output)
        fs.delete(found)
    return found


def empty_beam_temp_folders(output: str) -> list[str]:
    """Empty `beam-temp-*` folders under a local `output` (relative), which Beam's WriteToParquet
    leaves behind after a successful run; none on object stores, which have no folders."""
    if "://" in output:
        return []
    pattern = os.path.join(glob.escape(output.rstrip("/")), "**", BEAM_TEMP_PREFIX + "*")
    return sorted(os.path.relpath(folder, output) for folder in glob.glob(pattern, recursive=True)
                  if os.path.isdir(folder) and not os.listdir(folder))


def remove_empty_beam_temp_folders(output: str) -> list[str]:
    """Remove `empty_beam_temp_folders` (never one holding a file); call it after a successful run."""
    removed = []
    for folder in empty_beam_temp_folders(output):
        try:
            os.rmdir(os.path.join(output, folder))  # fails, and is kept, if a file appeared
        except OSError:
            continue
        removed.append(folder)
    return removed
