"""Check a built dataset end to end: the core of `beam_jobs.verify`.

`verify_shard` re-reads one shard (tar sha256 and size against the manifest, every sample
decoded with FDH's members and shapes by `check_sample`, the tar's keys against its Parquet
rows); `verify_run_files` checks across shards (no shard file missing or extra, names
contiguous per licence and split, metadata.json keys equal to the shards' keys, stats.json
counts equal to the manifest's) and folds everything into the final report.

`check_sample` is the one check of a written sample (its raw tar members, what DeepPrivacy2's
FDH loader reads); `transforms.s8_write.encode.check_writable` is the writer's precondition on
an in-memory `FdhSample` before it is encoded.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from dataset import fs
from dataset.annotations import default_store, verify_store
from dataset.layout import (EMBEDDING_MEMBERS, METADATA_FILE, OPT_OUT_FILE, REQUIRED_MEMBERS, STAGED_SUFFIX,
                            STATS_FILE, shard_glob, shard_location, shard_parquet_path)
from dataset.manifest import expected_shard_files
from dataset.ownership import BEAM_TEMP_PREFIX, empty_beam_temp_folders, is_temp_file
from dataset.schema import CONSENT_COLUMNS, KEY_COLUMN, PARQUET_SCHEMA, build_stats
from dataset.shards import read_parquet_table, read_tar_shard
from transforms.opt_out import parse_opt_out
from transforms.records import CROP_HEIGHT, CROP_WIDTH, NUM_CSE_VERTICES

MAX_SAMPLE_PROBLEMS = 20  # per shard; the rest are counted


def _png(data: bytes, name: str, mode: str, problems: list[str]) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                problems.append(f"{name}: not a PNG ({image.format})")
            if image.mode != mode:
                problems.append(f"{name}: mode {image.mode}, expected {mode}")
            if image.size != (CROP_WIDTH, CROP_HEIGHT):
                problems.append(f"{name}: size {image.size[0]}x{image.size[1]} (WxH), "
                                f"expected {CROP_WIDTH}x{CROP_HEIGHT}")
            image.load()
    except Exception as error:  # any decoder error is a finding, not a crash
        problems.append(f"{name}: does not decode: {type(error).__name__}: {error}")


def _npy(data: bytes, name: str, problems: list[str]) -> Optional[np.ndarray]:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as error:
        problems.append(f"{name}: does not decode: {type(error).__name__}: {error}")
        return None


def check_sample(members: Mapping[str, Any], no_embeddings: bool = False) -> list[str]:
    """What is wrong with one sample's raw members (empty when it loads like FDH's).

    Checks what DeepPrivacy2's FDH loader relies on: every key present, the image an 8-bit RGB
    PNG of 288x160, masks 1-bit PNGs of that size, keypoints float32 (17, 3), vertices int16
    (288, 160) or (1, 288, 160) with ids in [0, 27554). A no-embeddings dataset must not carry
    vertices / e_mask.
    """
    key = str(members.get("__key__", "?"))
    problems: list[str] = []
    if "." in key:
        problems.append("key contains a dot")
    expected = REQUIRED_MEMBERS + (() if no_embeddings else EMBEDDING_MEMBERS)
    for name in expected:
        if name not in members:
            problems.append(f"{name}: missing")
    if no_embeddings:
        problems += [f"{name}: present in a no-embeddings dataset"
                     for name in EMBEDDING_MEMBERS if name in members]
    if "image.png" in members:
        _png(members["image.png"], "image.png", "RGB", problems)
    for name in ("mask.png", "maskrcnn_mask.png", "e_mask.png"):
        if name in members and name in expected:
            _png(members[name], name, "1", problems)
    if "keypoints.npy" in members:
        keypoints = _npy(members["keypoints.npy"], "keypoints.npy", problems)
        if keypoints is not None and (keypoints.dtype != np.float32 or keypoints.shape != (17, 3)):
            problems.append(f"keypoints.npy: {keypoints.dtype} {keypoints.shape}, expected float32 (17, 3)")
    if "vertices.npy" in members and not no_embeddings:
        vertices = _npy(members["vertices.npy"], "vertices.npy", problems)
        if vertices is not None:
            if vertices.dtype != np.int16 or vertices.shape not in (
                    (CROP_HEIGHT, CROP_WIDTH), (1, CROP_HEIGHT, CROP_WIDTH)):
                problems.append(f"vertices.npy: {vertices.dtype} {vertices.shape}, expected int16 "
                                f"({CROP_HEIGHT}, {CROP_WIDTH}) or (1, {CROP_HEIGHT}, {CROP_WIDTH})")
            elif vertices.size and (vertices.min() < 0 or vertices.max() >= NUM_CSE_VERTICES):
                problems.append(f"vertices.npy: ids in [{vertices.min()}, {vertices.max()}], "
                                f"expected [0, {NUM_CSE_VERTICES})")
    if "json" in members:
        try:
            json.loads(members["json"])
        except Exception as error:
            problems.append(f"json: does not parse: {error}")
    return [f"{key}: {problem}" for problem in problems]


@dataclass
class ShardReport:
    """What verify found in one shard."""

    path: str
    samples: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "samples": self.samples, "bytes": self.bytes,
                "problems": list(self.problems)}


def naming_problems(shards: Iterable[Mapping[str, Any]]) -> list[str]:
    """Shard paths that are malformed, duplicated, or not contiguous from 000000 per licence/split."""
    problems = []
    indices: dict[tuple[str, str], list[int]] = {}
    seen = set()
    for entry in shards:
        path = entry["path"]
        if path in seen:
            problems.append(f"{path}: listed twice in the manifest")
        seen.add(path)
        try:
            license_, split, index = shard_location(path)
        except ValueError as error:
            problems.append(str(error))
            continue
        if entry.get("license", license_) != license_ or entry.get("split", split) != split:
            problems.append(f"{path}: manifest says licence {entry.get('license')!r} split "
                            f"{entry.get('split')!r}")
        indices.setdefault((license_, split), []).append(index)
    for (license_, split), found in sorted(indices.items()):
        if sorted(found) != list(range(len(found))):
            problems.append(f"{license_}/{split}: shard numbers not contiguous from 000000: "
                            f"{sorted(found)[:10]}")
    return problems


def key_problems(metadata_keys: Iterable[str], parquet_keys: Sequence[str]) -> list[str]:
    """metadata.json keys vs the keys of every Parquet row: duplicates and either-side extras."""
    problems = []
    counts: dict[str, int] = {}
    for key in parquet_keys:
        counts[key] = counts.get(key, 0) + 1
    duplicates = sorted(k for k, n in counts.items() if n > 1)
    if duplicates:
        problems.append(f"{len(duplicates)} keys appear in more than one Parquet row: {duplicates[:5]}")
    meta = set(metadata_keys)
    only_meta = sorted(meta - counts.keys())
    only_parquet = sorted(counts.keys() - meta)
    if only_meta:
        problems.append(f"{len(only_meta)} metadata.json keys are in no shard: {only_meta[:5]}")
    if only_parquet:
        problems.append(f"{len(only_parquet)} shard samples are missing from metadata.json: "
                        f"{only_parquet[:5]}")
    return problems


def stats_count_problems(stats: Mapping[str, Any], shards: Sequence[Mapping[str, Any]]) -> list[str]:
    """Where stats.json's per licence x split and total counts disagree with the manifest."""
    expected = build_stats(list(shards))
    problems = []
    if stats.get("written") != expected["written"]:
        problems.append(f"per licence x split counts {stats.get('written')} != manifest "
                        f"{expected['written']}")
    if stats.get("totals") != expected["totals"]:
        problems.append(f"totals {stats.get('totals')} != manifest {expected['totals']}")
    return problems


IDENTITY_FIELDS = ("id", "user_nsid", "license")  # what a takedown and a licence rely on


def identity(values: Mapping[str, Any]) -> list[Any]:
    """The values that say whose photo a sample is and under which licence (`IDENTITY_FIELDS`)."""
    return [values.get(name) for name in IDENTITY_FIELDS]


def _json_identity(members: Mapping[str, Any]) -> Optional[list[Any]]:
    try:
        return identity(json.loads(members["json"]))
    except Exception:  # reported by check_sample
        return None


def identity_problems(where: str, expected: Mapping[str, list[Any]],
                      found: Mapping[str, list[Any]]) -> list[str]:
    """`KEY: where FIELD X != Parquet Y` for each sample whose identity values differ."""
    problems = []
    for key in sorted(expected.keys() & found.keys()):
        for name, want, got in zip(IDENTITY_FIELDS, expected[key], found[key]):
            if want != got:
                problems.append(f"{key}: {where} {name} {got!r} != Parquet {want!r}")
    return problems


def parquet_schema_problems(schema: Any) -> list[str]:
    """How a shard's Parquet columns differ from PARQUET_SCHEMA: a column missing, of another
    type, or unknown. The consent columns may be missing: a dataset written before them (issue
    15) is still valid, its rows simply hold no consent check."""
    problems = []
    found = {field.name: field.type for field in schema}
    for expected in PARQUET_SCHEMA:
        if expected.name not in found:
            if expected.name not in CONSENT_COLUMNS:
                problems.append(f"column {expected.name} missing")
        elif found[expected.name] != expected.type:
            problems.append(f"column {expected.name} is {found[expected.name]}, "
                            f"expected {expected.type}")
    unknown = sorted(found.keys() - set(PARQUET_SCHEMA.names))
    if unknown:
        problems.append(f"unknown columns {unknown}")
    return problems


def parquet_row_problems(entry: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Rows whose photo_id column differs from their id, or whose licence is not the shard's."""
    license_ = entry.get("license")
    problems = []
    for row in rows:
        if row.get("photo_id") != row.get("id"):
            problems.append(f"{row[KEY_COLUMN]}: Parquet photo_id {row.get('photo_id')!r} != id "
                            f"{row.get('id')!r}")
        if license_ is not None and row.get("license_slug") != license_:
            problems.append(f"{row[KEY_COLUMN]}: Parquet license_slug {row.get('license_slug')!r} "
                            f"in a {license_!r} shard")
    return problems


def verify_shard(dataset: str, entry: dict, no_embeddings: bool) -> dict[str, Any]:
    """Everything verify checks inside one shard; returns its report with the tar's keys."""
    report = ShardReport(entry["path"])
    problems = report.problems
    tar_path = fs.join(dataset, entry["path"])
    keys: list[str] = []
    tar_identity: dict[str, list[Any]] = {}
    parquet_identity: dict[str, list[Any]] = {}
    if not fs.exists(tar_path):
        problems.append("missing")
    else:
        with fs.open_read(tar_path) as handle:
            digest, report.bytes = fs.sha256_of_stream(handle)
        if digest != entry.get("sha256"):
            problems.append(f"sha256 {digest} != manifest {entry.get('sha256')}")
        if report.bytes != entry.get("bytes", report.bytes):
            problems.append(f"{report.bytes} bytes != manifest {entry.get('bytes')}")
        sample_problems: list[str] = []
        try:
            for members in read_tar_shard(tar_path):
                keys.append(str(members.get("__key__")))
                sample_problems += check_sample(members, no_embeddings)
                found = _json_identity(members) if "json" in members else None
                if found is not None:
                    tar_identity[keys[-1]] = found
        except Exception as error:  # a damaged tar is a finding, not a crash
            problems.append(f"unreadable after {len(keys)} samples: {type(error).__name__}: {error}")
        problems += _first(sample_problems)
        report.samples = len(keys)
        if len(keys) != entry.get("samples"):
            problems.append(f"{len(keys)} samples != manifest {entry.get('samples')}")
        if len(set(keys)) != len(keys):
            problems.append("a key appears twice in the tar")
    parquet = shard_parquet_path(entry)
    parquet_keys: list[str] = []
    if not fs.exists(fs.join(dataset, parquet)):
        problems.append(f"{parquet}: missing")
    else:
        try:
            table = read_parquet_table(fs.join(dataset, parquet))
            problems += [f"{parquet}: {problem}"
                         for problem in parquet_schema_problems(table.schema)]
            rows = table.to_pylist()
            del table
            parquet_keys = [row[KEY_COLUMN] for row in rows]
            parquet_identity = {row[KEY_COLUMN]: identity(row) for row in rows}
            problems += _first(parquet_row_problems(entry, rows))
            del rows  # the identities are what the run-level check needs
        except Exception as error:
            problems.append(f"{parquet}: unreadable: {type(error).__name__}: {error}")
        else:
            if entry.get("parquet_sha256"):
                with fs.open_read(fs.join(dataset, parquet)) as handle:
                    parquet_digest, _ = fs.sha256_of_stream(handle)
                if parquet_digest != entry["parquet_sha256"]:
                    problems.append(f"{parquet}: sha256 {parquet_digest} != manifest "
                                    f"{entry['parquet_sha256']}")
            if fs.exists(tar_path) and sorted(parquet_keys) != sorted(keys):
                only_tar = sorted(set(keys) - set(parquet_keys))
                only_parquet = sorted(set(parquet_keys) - set(keys))
                problems.append(f"{parquet}: {len(parquet_keys)} rows vs {len(keys)} tar samples; "
                                f"only in tar {only_tar[:5]}, only in Parquet {only_parquet[:5]}")
    problems += _first(identity_problems("tar json", parquet_identity, tar_identity))
    result = report.to_dict()
    result["parquet_keys"] = parquet_keys
    result["parquet_identity"] = parquet_identity
    return result


def _first(problems: list[str]) -> list[str]:
    """At most MAX_SAMPLE_PROBLEMS of `problems`, then a count of the rest."""
    if len(problems) <= MAX_SAMPLE_PROBLEMS:
        return problems
    return problems[:MAX_SAMPLE_PROBLEMS] + [
        f"... and {len(problems) - MAX_SAMPLE_PROBLEMS} more sample problems"]


def leftover_problems(dataset: str) -> list[str]:
    """Leftovers anywhere in the dataset: staged takedown Parquet, writers' temporary files
    (`.NAME.tmp-*`, the root's `.metadata.json.tmp-*` included) and Beam's temp folders."""
    problems = []
    for path in fs.glob(fs.join(dataset, "**")):
        relative = fs.relative_to(dataset, path)
        if relative.endswith(STAGED_SUFFIX):
            problems.append(f"{relative}: leftover of an unfinished takedown: run it again")
        elif is_temp_file(relative):
            problems.append(f"{relative}: leftover of a writer's temporary file: a killed run?")
        elif f"/{BEAM_TEMP_PREFIX}" in f"/{relative}":
            problems.append(f"{relative}: leftover of Beam's temporary files: a killed run?")
    problems += [f"{folder}/: an empty folder Beam left" for folder in empty_beam_temp_folders(dataset)]
    return problems


def verify_run_files(dataset: str, manifest: dict, shard_reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The checks across shards, folded with the shard reports into the final report."""
    shards = manifest.get("shards", [])
    problems = naming_problems(shards)
    for report in sorted(shard_reports, key=lambda r: r["path"]):
        problems += [f"{report['path']}: {p}" for p in report["problems"]]

    expected = expected_shard_files(shards)
    for ext in ("tar", "parquet"):
        for path in fs.glob(fs.join(dataset, shard_glob(ext))):
            if fs.relative_to(dataset, path) not in expected:
                problems.append(f"{fs.relative_to(dataset, path)}: shard file not in the manifest")

    problems += leftover_problems(dataset)

    parquet_keys = [k for r in shard_reports for k in r["parquet_keys"]]
    if fs.exists(fs.join(dataset, METADATA_FILE)):
        metadata = fs.load_json(dataset, METADATA_FILE)
        problems += [f"{METADATA_FILE}: {p}"
                     for p in key_problems(metadata.keys(), parquet_keys)]
        parquet_identity = {k: v for r in shard_reports for k, v in r.get("parquet_identity", {}).items()}
        problems += [f"{METADATA_FILE}: {p}" for p in _first(identity_problems(
            METADATA_FILE, parquet_identity,
            {key: identity(entry) for key, entry in metadata.items() if isinstance(entry, dict)}))]
        del metadata, parquet_identity
    else:
        problems.append(f"{METADATA_FILE}: missing")

    if fs.exists(fs.join(dataset, STATS_FILE)):
        stats = fs.load_json(dataset, STATS_FILE)
        problems += [f"{STATS_FILE}: {p}" for p in stats_count_problems(stats, shards)]
    else:
        problems.append(f"{STATS_FILE}: missing")

    problems += annotation_store_problems(dataset)
    return {"dataset": dataset, "ok": not problems, "problems": problems, "shards": len(shards),
            "samples": sum(r["samples"] for r in shard_reports),
            "bytes": sum(r["bytes"] for r in shard_reports)}


def annotation_store_problems(dataset: str, store: Optional[str] = None) -> list[str]:
    """Problems of the annotation store (default DATASET/annotations): files against their
    content-hash names, and entries of users / photos in DATASET/opt_out.txt."""
    opt_out_path = fs.join(dataset, OPT_OUT_FILE)
    opt_out = parse_opt_out(fs.read_text(opt_out_path) or "", opt_out_path)
    return [f"annotation store: {p}" for p in verify_store(store or default_store(dataset),
                                                         opt_out.user_nsids, opt_out.photo_ids)]
