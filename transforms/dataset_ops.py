"""Pure cores of the jobs that work on a built dataset: search_user, takedown, verify, stats.

A dataset is what `transforms.s8_write` writes: OUT/{licence}/{split}/out-NNNNNN.tar with a
Parquet file of the same stem beside each tar, and manifest.json, metadata.json, stats.json and
opt_out.txt in the root. Everything here is plain Python (no Beam pipeline), so the jobs'
Beam wrappers stay thin and these functions are tested directly.

Searching reads files through pyarrow's filesystems (local paths and gs://), so the
`search_user` command line starts fast without importing Beam; the functions that rewrite or
verify shards do their I/O through `transforms.s8_write` (Beam FileSystems).
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from transforms.funnel import TAKEDOWN_KEY, funnel_rows
from transforms.opt_out import OptOut
from transforms.records import CROP_HEIGHT, CROP_WIDTH, NUM_CSE_VERTICES

# Parquet columns the search needs (the writer's PARQUET_SCHEMA has many more).
KEY_COLUMN = "key"
USER_COLUMN = "user_nsid"
PHOTO_COLUMN = "photo_id"
SEARCH_COLUMNS = (KEY_COLUMN, USER_COLUMN, PHOTO_COLUMN)

# Shard names inside a dataset: {licence}/{split}/out-NNNNNN.tar (+ .parquet of the same stem).
SHARD_NAME_RE = re.compile(r"^(?P<license>[^/]+)/(?P<split>[^/]+)/out-(?P<index>\d{6})\.(?P<ext>tar|parquet)$")

# Tar members every FDH sample must have; the embeddings pair unless the dataset has none.
REQUIRED_MEMBERS = ("image.png", "mask.png", "maskrcnn_mask.png", "keypoints.npy")
EMBEDDING_MEMBERS = ("e_mask.png", "vertices.npy")


def match_line(key: str) -> str:
    """The line FDH's search_user.py prints for a matching sample (kept byte for byte)."""
    return f"Image {key} includes your username"


@dataclass(frozen=True)
class Match:
    """A sample that belongs to a searched user or photo."""

    key: str
    user_nsid: Optional[str]
    photo_id: Optional[int]


def photo_id_of(key: str, entry: Mapping[str, Any]) -> Optional[int]:
    """The Flickr photo id of a metadata.json entry: its `id` field, else the key's prefix.

    Our keys are `{photo_id}_{person_index}` (records.sample_key); FDH's `id` is the photo id.
    """
    for candidate in (entry.get("id"), key.split("_", 1)[0]):
        try:
            return int(candidate)
        except (TypeError, ValueError):
            continue
    return None


def metadata_matches(metadata: Mapping[str, Mapping[str, Any]], query: OptOut) -> list[Match]:
    """Samples of metadata.json ({key: FDH entry}) that `query` selects, in the file's order."""
    found = []
    for key, entry in metadata.items():
        user = entry.get("user_nsid")
        photo = photo_id_of(key, entry) if query.photo_ids else None
        if query.excludes(user, photo):
            found.append(Match(key, user, photo))
    return found


# ---------------------------------------------------------------- files through pyarrow ---

# How long pyarrow's GCS client retries before it gives up (its default retries for minutes).
GCS_RETRY_SECONDS = 30


def _filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for a local path or a gs:// / s3:// URI.

    gs:// honours STORAGE_EMULATOR_HOST like Beam and google-cloud-storage do (pyarrow itself
    reads only CLOUD_STORAGE_EMULATOR_ENDPOINT) and gives up after GCS_RETRY_SECONDS.
    """
    import datetime
    import os

    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), posixpath.abspath(uri)
    if uri.startswith("gs://"):
        emulator = os.environ.get("STORAGE_EMULATOR_HOST", "").split("://")[-1] or None
        options = {"endpoint_override": emulator, "scheme": "http"} if emulator else {}
        filesystem = fs.GcsFileSystem(
            anonymous=bool(emulator), retry_time_limit=datetime.timedelta(seconds=GCS_RETRY_SECONDS),
            **options)
        return filesystem, uri[len("gs://"):]
    return fs.FileSystem.from_uri(uri)


def read_json_file(uri: str) -> Any:
    """Parse a JSON file (local path or URI) in one read, as FDH's script does."""
    filesystem, path = _filesystem(uri)
    with filesystem.open_input_stream(path) as handle:
        return json.loads(handle.read())


def parquet_files(source: str) -> list[str]:
    """The shard Parquet files of `source`: a dataset dir, one .parquet file, or a glob
    (`*` and `?` within a directory, `**` across directories).

    A dataset dir lists the files named in its manifest.json (never rejects/*.parquet, which
    has another schema); without a manifest, every `*/*/out-NNNNNN.parquet` under it.
    Raises FileNotFoundError when nothing matches.
    """
    from pyarrow import fs

    filesystem, path = _filesystem(source)
    scheme = source.split("://", 1)[0] + "://" if "://" in source else ""

    if any(ch in path for ch in "*?"):
        base = path.split("*", 1)[0].split("?", 1)[0].rsplit("/", 1)[0] or "/"
        selector = fs.FileSelector(base, recursive=True, allow_not_found=True)
        regex = re.compile(_glob_to_regex(path))
        found = sorted(info.path for info in filesystem.get_file_info(selector)
                       if info.type == fs.FileType.File and regex.match(info.path))
    else:
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.File:
            found = [path]
        elif info.type == fs.FileType.Directory:
            manifest = path.rstrip("/") + "/manifest.json"
            if filesystem.get_file_info(manifest).type == fs.FileType.File:
                with filesystem.open_input_stream(manifest) as handle:
                    shards = json.loads(handle.read()).get("shards", [])
                found = [path.rstrip("/") + "/" + shard_parquet_path(s) for s in shards]
            else:
                selector = fs.FileSelector(path, recursive=True)
                root = path.rstrip("/") + "/"
                found = sorted(i.path for i in filesystem.get_file_info(selector)
                               if i.type == fs.FileType.File and i.path.startswith(root)
                               and SHARD_NAME_RE.match(i.path[len(root):])
                               and i.path.endswith(".parquet"))
        else:
            found = []
    if not found:
        raise FileNotFoundError(f"no Parquet shard files at {source}")
    return [scheme + p for p in found]


def _glob_to_regex(pattern: str) -> str:
    """fnmatch-like, with `**` crossing directories and `*` / `?` staying inside one."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "^" + "".join(out) + "$"


def parquet_matches(files: Sequence[str], query: OptOut) -> list[Match]:
    """Rows of the shard Parquet `files` that `query` selects, sorted by key.

    One pyarrow dataset scan that reads only the key / user / photo columns and pushes the
    filter down (row groups whose statistics rule the values out are skipped), so 1.87M rows
    take about a second instead of parsing a whole metadata.json.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    if not query:
        return []
    filesystem, _ = _filesystem(files[0])
    paths = [_filesystem(f)[1] for f in files]
    dataset = ds.dataset(paths, format="parquet", filesystem=filesystem)
    condition = None
    if query.user_nsids:
        condition = pc.field(USER_COLUMN).isin(sorted(query.user_nsids))
    if query.photo_ids:
        by_photo = pc.field(PHOTO_COLUMN).isin(sorted(query.photo_ids))
        condition = by_photo if condition is None else (condition | by_photo)
    table = dataset.to_table(columns=list(SEARCH_COLUMNS), filter=condition)
    return table_matches(table, query)


def table_matches(table, query: OptOut) -> list[Match]:
    """Rows of a pyarrow Table with the SEARCH_COLUMNS that `query` selects, sorted by key."""
    import pyarrow.compute as pc

    keep = None
    if query.user_nsids:
        keep = pc.is_in(table[USER_COLUMN], value_set=_pa_array(sorted(query.user_nsids)))
    if query.photo_ids:
        by_photo = pc.is_in(table[PHOTO_COLUMN], value_set=_pa_array(sorted(query.photo_ids),
                                                                     table.schema.field(PHOTO_COLUMN).type))
        keep = by_photo if keep is None else pc.or_(keep, by_photo)
    if keep is None:
        return []
    rows = table.filter(pc.fill_null(keep, False)).to_pydict()
    found = [Match(k, u, None if p is None else int(p))
             for k, u, p in zip(rows[KEY_COLUMN], rows[USER_COLUMN], rows[PHOTO_COLUMN])]
    return sorted(found, key=lambda m: m.key)


def _pa_array(values: list, type_=None):
    import pyarrow as pa

    return pa.array(values, type=type_)


def search(source: str, query: OptOut) -> list[Match]:
    """Search a metadata.json file (FDH's way), or Parquet (a dataset dir, a file or a glob)."""
    if source.endswith(".json"):
        return metadata_matches(read_json_file(source), query)
    return parquet_matches(parquet_files(source), query)


# ------------------------------------------------------------------------ manifest helpers ---

def shard_parquet_path(entry: Mapping[str, Any]) -> str:
    """The Parquet path (relative to the dataset root) of a manifest shard entry."""
    return entry.get("parquet") or entry["path"][: -len(".tar")] + ".parquet"


def shard_location(entry_path: str) -> tuple[str, str, int]:
    """(licence, split, index) parsed from a shard's relative path; ValueError if malformed."""
    found = SHARD_NAME_RE.match(entry_path)
    if not found:
        raise ValueError(f"not a shard path: {entry_path!r}")
    return found["license"], found["split"], int(found["index"])


def counts_by_license_split(shards: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
    """{licence: {split: {"samples", "bytes", "shards"}}} over manifest shard entries (the
    writer's stats.json "written" block, computed by its own `build_stats`)."""
    from transforms.s8_write.run_outputs import build_stats

    return build_stats(list(shards))["written"]


# ------------------------------------------------------------------------------ takedown ---

@dataclass
class ShardFilter:
    """The result of dropping samples from one shard's raw members."""

    kept: list[dict[str, Any]]
    removed: list[str]


def filter_members(members: Iterable[Mapping[str, Any]], drop_keys: Iterable[str]) -> ShardFilter:
    """Keep the raw member dicts whose `__key__` is not in `drop_keys`, in file order.

    The members' bytes are passed through untouched, so the kept samples are byte-identical
    after the shard is written again.
    """
    drop = set(drop_keys)
    kept, removed = [], []
    for member in members:
        (removed.append(member["__key__"]) if member["__key__"] in drop else kept.append(dict(member)))
    return ShardFilter(kept, removed)


def filter_rows(rows: Iterable[Mapping[str, Any]], drop_keys: Iterable[str]) -> list[dict[str, Any]]:
    """Parquet rows whose key is not in `drop_keys`, in their order."""
    drop = set(drop_keys)
    return [dict(row) for row in rows if row[KEY_COLUMN] not in drop]


def new_opt_out_lines(existing: OptOut, request: OptOut) -> str:
    """Opt-out file text for the entries of `request` that `existing` does not hold yet."""
    from transforms.opt_out import format_opt_out

    return format_opt_out(request.user_nsids - existing.user_nsids,
                          request.photo_ids - existing.photo_ids)


def opt_out_entries(request: OptOut) -> list[str]:
    """The opt-out file lines of `request` (`user:NSID`, `photo:ID`), sorted."""
    from transforms.opt_out import format_opt_out

    return format_opt_out(request.user_nsids, request.photo_ids).splitlines()


# -------------------------------------------------------------------------------- verify ---

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


def sha256_of_stream(handle, chunk_size: int = 1 << 20) -> tuple[str, int]:
    """(hex sha256, size) of everything left in a binary file handle."""
    digest = hashlib.sha256()
    size = 0
    while True:
        chunk = handle.read(chunk_size)
        if not chunk:
            break
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def expected_shard_files(shards: Iterable[Mapping[str, Any]]) -> set[str]:
    """Relative paths of every tar and Parquet file the manifest names."""
    names = set()
    for entry in shards:
        names.add(entry["path"])
        names.add(shard_parquet_path(entry))
    return names


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


# --------------------------------------------------------------------------------- stats ---

def funnel_steps(stats: Mapping[str, Any]) -> list[tuple[str, int]]:
    """The funnel of stats.json as (label, count) rows, top-down (transforms.funnel.funnel_rows),
    closed by the samples in the dataset now (its "totals", after any takedown)."""
    steps = [(label, count) for label, count, _ in funnel_rows(stats.get("funnel") or {})]
    totals = stats.get("totals") or {}
    if "samples" in totals:
        steps.append(("samples in the dataset", int(totals["samples"])))
    return steps


def stats_count_problems(stats: Mapping[str, Any], shards: Sequence[Mapping[str, Any]]) -> list[str]:
    """Where stats.json's per licence x split and total counts disagree with the manifest."""
    from transforms.s8_write.run_outputs import build_stats

    expected = build_stats(list(shards))
    problems = []
    if stats.get("written") != expected["written"]:
        problems.append(f"per licence x split counts {stats.get('written')} != manifest "
                        f"{expected['written']}")
    if stats.get("totals") != expected["totals"]:
        problems.append(f"totals {stats.get('totals')} != manifest {expected['totals']}")
    return problems


def updated_stats(stats: Mapping[str, Any], shards: Sequence[Mapping[str, Any]],
                  removed: int) -> dict[str, Any]:
    """stats.json after a takedown: counts recomputed from the manifest, and the removed
    samples added to the funnel under "takedown.samples_removed" (cumulative)."""
    from transforms.s8_write.run_outputs import build_stats

    funnel = dict(stats.get("funnel") or {})
    if removed:
        funnel[TAKEDOWN_KEY] = int(funnel.get(TAKEDOWN_KEY, 0)) + int(removed)
    return {**stats, **build_stats(list(shards), funnel)}

def license_rows(shards: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the licence table: licence, split, shards, samples, bytes, % of all samples.

    Each licence has one row per split and an 'all' row; a last row totals the dataset.
    """
    table = counts_by_license_split(shards)
    total_samples = sum(c["samples"] for splits in table.values() for c in splits.values())
    total_bytes = sum(c["bytes"] for splits in table.values() for c in splits.values())

    def row(license_: str, split: str, shards_: int, samples: int, size: int) -> dict[str, Any]:
        share = 100.0 * samples / total_samples if total_samples else 0.0
        return {"license": license_, "split": split, "shards": shards_, "samples": samples,
                "bytes": size, "percent": share}

    rows = []
    for license_, splits in table.items():
        for split, cell in splits.items():
            rows.append(row(license_, split, cell["shards"], cell["samples"], cell["bytes"]))
        rows.append(row(license_, "all", sum(c["shards"] for c in splits.values()),
                        sum(c["samples"] for c in splits.values()),
                        sum(c["bytes"] for c in splits.values())))
    rows.append(row("total", "all", sum(r["shards"] for r in rows if r["split"] == "all"),
                    total_samples, total_bytes))
    return rows


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table, numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_numberish(r[i]) for r in cells[1:]) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(r, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _numberish(text: str) -> bool:
    return bool(re.match(r"^[-+]?[\d,.]+( ?%| [KMGT]?i?B)?$", text))
