"""The annotation store: the models' outputs per photo, so a rerun or a re-derive skips the models.

Layout (local or gs://; default OUT/annotations/, shareable by several outputs):

    STORE/<model_key>/models.json                 the model versions the key hashes (sorted JSON)
    STORE/<model_key>/part-<sha256[:32]>.parquet  one file per flushed bundle, named by its content

`model_key` is the first 16 hex digits of the sha256 of the model versions' sorted JSON (annotator,
asset checksums, settings): entries of other models are never looked at. One Parquet row per
photo: the key columns (photo_id, sha256 of the source file, user_nsid), then height/width,
annotator, and either `status="annotated"` with a `payload` (the AnnotatedPhoto's detections) and
`detections` (how many, all sets together) or `status="rejected"` with the annotate-stage reject
(reason, detail). `read_index` reads the columns other than the payload into a `StoreIndex`:
numpy arrays sorted by (photo_id, sha256), about 90 bytes per entry, point lookups by binary
search (by photo id, or by photo id and sha256). Part files written before the `detections`
column read as -1 there (unknown).

Payload: the arrays of each detection set (keypoint_dets, mask_dets, cse_dets) in `.npy` form,
each (H, W) plane (masks, CSE vertex ids) cut to the bounding box of its non-zero pixels (masks
as packbits), so decoding gives the very same arrays and select / crop / encode reproduce the
samples byte for byte. The file is zstd-compressed Parquet written with `fs.atomic_create`
(write, then rename), named by the sha256 of its bytes: a killed writer leaves nothing partial,
and writing the same entries twice gives the same file. The store does NOT keep the source
bytes: a re-derive fetches the photo again and uses an entry only when the refetched file's
sha256 matches (a changed or deleted photo is not re-derived); see README / NOTES.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import io
import json
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Optional

import numpy as np

from dataset import fs

STORE_DIRNAME = "annotations"
MODELS_FILE = "models.json"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
KEY_COLUMNS = ("photo_id", "sha256", "user_nsid")
DET_SETS = ("keypoint_dets", "mask_dets", "cse_dets")
PLANE_FIELDS = ("masks", "vertices")  # (N, H, W) arrays stored cut to their non-zero box
ANNOTATED = "annotated"
REJECTED = "rejected"


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([("photo_id", pa.int64()), ("sha256", pa.string()), ("user_nsid", pa.string()),
                      ("height", pa.int32()), ("width", pa.int32()), ("annotator", pa.string()),
                      ("status", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
                      ("payload", pa.binary()), ("detections", pa.int32())])


def default_store(output: str) -> str:
    """OUTPUT/annotations: where a rebuild keeps its store unless --annotation_store says otherwise."""
    return fs.join(output, STORE_DIRNAME)


def model_key(versions: Mapping[str, Any]) -> str:
    """16 hex digits naming a set of model versions (sha256 of their sorted JSON)."""
    return hashlib.sha256(json.dumps(versions, sort_keys=True).encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Entry:
    """One photo's stored annotate result: `arrays` (status annotated) or a reject reason."""

    photo_id: int
    sha256: str
    user_nsid: str
    height: int
    width: int
    annotator: str
    status: str  # ANNOTATED or REJECTED
    reason: str = ""
    detail: str = ""
    payload: bytes = b""
    detections: int = -1  # detections in every set together (0 for a reject; -1 unknown)

    @property
    def key(self) -> tuple[int, str]:
        return (self.photo_id, self.sha256)


# ---- payload: named arrays, (H, W) planes cut to their non-zero box ----

def _plane_box(plane: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of the non-zero pixels of a 2-D array ((0, 0, 0, 0) when all zero)."""
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    return (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def encode_planes(planes: np.ndarray) -> dict[str, np.ndarray]:
    """(N, H, W) bool or integer planes -> {"boxes", "data"}: each cut to its non-zero box,
    concatenated (bool as packbits per plane); lossless with `decode_planes`."""
    boxes = np.array([_plane_box(p) for p in planes], np.int32).reshape(-1, 4)
    chunks = []
    for plane, (y0, x0, y1, x1) in zip(planes, boxes):
        cut = np.ascontiguousarray(plane[y0:y1, x0:x1])
        chunks.append(np.packbits(cut.ravel()) if plane.dtype == bool else cut.ravel().view(np.uint8))
    data = np.concatenate(chunks) if chunks else np.zeros((0,), np.uint8)
    return {"boxes": boxes, "data": data}


def decode_planes(boxes: np.ndarray, data: np.ndarray, height: int, width: int, dtype: np.dtype) -> np.ndarray:
    """The (N, H, W) array `encode_planes` encoded."""
    dtype = np.dtype(dtype)
    planes = np.zeros((len(boxes), height, width), dtype)
    offset = 0
    for plane, (y0, x0, y1, x1) in zip(planes, boxes):
        count = int((y1 - y0) * (x1 - x0))
        if dtype == bool:
            size = (count + 7) // 8
            cut = np.unpackbits(data[offset:offset + size], count=count).astype(bool)
        else:
            size = count * dtype.itemsize
            cut = data[offset:offset + size].view(dtype)
        plane[y0:y1, x0:x1] = cut.reshape(y1 - y0, x1 - x0)
        offset += size
    return planes


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Named arrays -> bytes (sorted names, each `name length, npy length, name, npy`); deterministic."""
    out = io.BytesIO()
    for name in sorted(arrays):
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(arrays[name]), allow_pickle=False)
        encoded, data = name.encode("utf-8"), buffer.getvalue()
        out.write(struct.pack("<HI", len(encoded), len(data)) + encoded + data)
    return out.getvalue()


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    """The arrays `pack_arrays` packed."""
    arrays, offset = {}, 0
    while offset < len(blob):
        name_len, data_len = struct.unpack_from("<HI", blob, offset)
        offset += 6
        name = blob[offset:offset + name_len].decode("utf-8")
        offset += name_len
        arrays[name] = _load_npy(blob[offset:offset + data_len])
        offset += data_len
    return arrays


def _load_npy(data: bytes) -> np.ndarray:
    """np.load of one .npy (no pickles), with its header parsed once per distinct header: np.load
    spends ~0.17 ms per array in `ast.literal_eval`, most of a re-derived photo's lookup."""
    if data[:8] != b"\x93NUMPY\x01\x00":  # not format 1.0 (np.save writes 1.0 when it can)
        return np.load(io.BytesIO(data), allow_pickle=False)
    (header_len,) = struct.unpack_from("<H", data, 8)
    dtype, shape, fortran_order = _npy_header(bytes(data[10:10 + header_len]))
    array = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=10 + header_len).copy()
    return array.reshape(shape[::-1]).transpose() if fortran_order else array.reshape(shape)


@functools.lru_cache(maxsize=4096)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """(dtype, shape, fortran_order) of a .npy 1.0 header; object dtypes are refused, as np.load
    with allow_pickle=False would."""
    fields = ast.literal_eval(header.decode("latin1"))
    dtype = np.lib.format.descr_to_dtype(fields["descr"])
    if dtype.hasobject:
        raise ValueError("stored array holds Python objects: refused (no pickles)")
    return dtype, tuple(int(n) for n in fields["shape"]), bool(fields["fortran_order"])


def detections_to_arrays(det_sets: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{"keypoint_dets": Detections or None, ...} -> named arrays (planes cut to their boxes)."""
    arrays: dict[str, np.ndarray] = {}
    for set_name, dets in det_sets.items():
        if dets is None:
            continue
        arrays[f"{set_name}.boxes"], arrays[f"{set_name}.scores"] = dets.boxes, dets.scores
        if dets.keypoints is not None:
            arrays[f"{set_name}.keypoints"] = dets.keypoints
        for field_name in PLANE_FIELDS:
            planes = getattr(dets, field_name)
            if planes is not None:
                for part, value in encode_planes(planes).items():
                    arrays[f"{set_name}.{field_name}.{part}"] = value
                arrays[f"{set_name}.{field_name}.dtype"] = np.array(planes.dtype.str)
    return arrays


def arrays_to_fields(arrays: Mapping[str, np.ndarray], height: int, width: int) -> dict[str, dict[str, np.ndarray]]:
    """Named arrays -> {set name: {field: array}} with the (N, H, W) planes restored."""
    fields: dict[str, dict[str, np.ndarray]] = {}
    for name, value in arrays.items():
        set_name, field_name, *part = name.split(".")
        if not part:
            fields.setdefault(set_name, {})[field_name] = value
        elif part == ["boxes"]:
            dtype = np.dtype(str(arrays[f"{set_name}.{field_name}.dtype"]))
            fields.setdefault(set_name, {})[field_name] = decode_planes(
                value, arrays[f"{set_name}.{field_name}.data"], height, width, dtype)
    return fields


# ---- files ----

def entries_table(entries: Iterable[Entry]) -> Any:
    """A pyarrow Table of entries, sorted by (photo_id, sha256) so a file's bytes depend only on
    which entries it holds."""
    import pyarrow as pa

    rows = sorted(entries, key=lambda e: e.key)
    columns = {name: [getattr(e, name) for e in rows] for name in _schema().names}
    return pa.table(columns, schema=_schema())


def table_bytes(table) -> bytes:
    """Parquet bytes of an entries table (zstd, no dictionary on the payload)."""
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", use_dictionary=list(KEY_COLUMNS) + ["annotator", "status"])
    return sink.getvalue()


def part_name(data: bytes) -> str:
    """The name of a part file holding `data`: its content hash."""
    return f"{PART_PREFIX}{hashlib.sha256(data).hexdigest()[:32]}{PART_SUFFIX}"


def model_dir(store: str, key: str) -> str:
    """STORE/<key>: where the entries of one set of model versions live."""
    return fs.join(store, key)


def ensure_models_file(store: str, versions: Mapping[str, Any]) -> str:
    """Write STORE/<key>/models.json (once; same bytes every time); returns the key's directory."""
    directory = model_dir(store, model_key(versions))
    path = fs.join(directory, MODELS_FILE)
    if not fs.exists(path):
        fs.write_json(path, dict(versions))
    return directory


def write_part(directory: str, entries: Iterable[Entry]) -> Optional[str]:
    """Write entries as one part file named by its content (atomic); None when there are none."""
    entries = list(entries)
    if not entries:
        return None
    data = table_bytes(entries_table(entries))
    path = fs.join(directory, part_name(data))
    if not fs.exists(path):
        fs.write_bytes_atomic(path, data)
    return path


def part_paths(directory: str) -> list[str]:
    """The finished part files of a model directory (never a writer's temporary file), sorted."""
    return [p for p in fs.glob(fs.join(directory, f"{PART_PREFIX}*{PART_SUFFIX}"))
            if fs.TEMP_MARKER not in p]


def model_dirs(store: str) -> list[str]:
    """Every model-key directory of a store (those holding a models.json)."""
    return [p.rsplit("/", 1)[0] for p in fs.glob(fs.join(store, f"*/{MODELS_FILE}"))]


def read_table(path: str, columns: Optional[list[str]] = None) -> Any:
    """One part file as a pyarrow Table (only `columns` when given: the index reads no payload)."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(fs.read_bytes(path)), columns=columns)


INDEX_COLUMNS = ("photo_id", "sha256", "height", "width", "status", "detections")


class IndexRow(NamedTuple):
    """What the index knows of one entry (no payload)."""

    photo_id: int
    sha256: str
    part: str  # the part file that holds it
    row: int  # its row in that file (`entry_at`)
    height: int
    width: int
    status: str
    detections: int  # -1: unknown (a part file written before the column)

    @property
    def yields_no_sample(self) -> bool:
        """True when no selection rule can keep a person of it: an annotate-stage reject, or no
        detection at all (select rejects it 'no_person' from the stored arrays alone)."""
        return self.status == REJECTED or self.detections == 0


class StoreIndex:
    """The index of one model key's entries: sorted numpy arrays, point lookups by binary search.

    Built by `read_index`; the first part file (in path order) holding a (photo_id, sha256) wins.
    """

    def __init__(self, paths: list[str], columns: Mapping[str, np.ndarray], parts: np.ndarray):
        order = np.lexsort((parts, columns["sha256"], columns["photo_id"]))
        ids, shas = columns["photo_id"][order], columns["sha256"][order]
        first = np.ones(len(order), bool)
        first[1:] = (ids[1:] != ids[:-1]) | (shas[1:] != shas[:-1])
        keep = order[first]
        self._paths = paths
        self._ids, self._shas, self._parts = ids[first], shas[first], parts[keep]
        self._rows = columns["row"][keep]
        self._heights, self._widths = columns["height"][keep], columns["width"][keep]
        self._rejected, self._detections = columns["rejected"][keep], columns["detections"][keep]

    def __len__(self) -> int:
        return len(self._ids)

    def _range(self, photo_id: int) -> range:
        return range(int(np.searchsorted(self._ids, photo_id, "left")),
                     int(np.searchsorted(self._ids, photo_id, "right")))

    def _row(self, i: int) -> IndexRow:
        return IndexRow(int(self._ids[i]), self._shas[i].decode("ascii"), self._paths[self._parts[i]],
                        int(self._rows[i]), int(self._heights[i]), int(self._widths[i]),
                        REJECTED if self._rejected[i] else ANNOTATED, int(self._detections[i]))

    def rows_of(self, photo_id: int) -> list[IndexRow]:
        """Every entry of a photo id (one per distinct source sha256)."""
        return [self._row(i) for i in self._range(photo_id)]

    def find(self, photo_id: int, sha256: str) -> Optional[IndexRow]:
        """The entry of (photo_id, sha256), or None."""
        wanted = sha256.encode("ascii")
        for i in self._range(photo_id):
            if self._shas[i] == wanted:
                return self._row(i)
        return None

    def __contains__(self, key: tuple[int, str]) -> bool:
        return self.find(*key) is not None


def _index_columns(path: str) -> dict[str, np.ndarray]:
    """The index columns of one part file as numpy arrays ('detections' -1 where the file has none)."""
    import pyarrow.parquet as pq

    handle = pq.ParquetFile(io.BytesIO(fs.read_bytes(path)))
    names = [c for c in INDEX_COLUMNS if c in handle.schema_arrow.names]
    table = handle.read(columns=names)
    count = table.num_rows
    detections = (table.column("detections").to_numpy(zero_copy_only=False).astype(np.int32)
                  if "detections" in names else np.full(count, -1, np.int32))
    return {"photo_id": table.column("photo_id").to_numpy(zero_copy_only=False).astype(np.int64),
            "sha256": np.array(table.column("sha256").to_pylist(), dtype="S64"),
            "height": table.column("height").to_numpy(zero_copy_only=False).astype(np.int32),
            "width": table.column("width").to_numpy(zero_copy_only=False).astype(np.int32),
            "rejected": np.array([s == REJECTED for s in table.column("status").to_pylist()], bool),
            "detections": detections, "row": np.arange(count, dtype=np.int32)}


def read_index(directory: str) -> StoreIndex:
    """The `StoreIndex` of one model key's entries (every column but the payload)."""
    paths = part_paths(directory)
    per_file = [_index_columns(path) for path in paths]
    empty = _empty_index_columns()
    columns = {name: np.concatenate([f[name] for f in per_file] or [empty[name]]) for name in empty}
    parts = np.concatenate([np.full(len(f["photo_id"]), i, np.int32) for i, f in enumerate(per_file)]
                           or [np.zeros(0, np.int32)])
    return StoreIndex(paths, columns, parts)


def _empty_index_columns() -> dict[str, np.ndarray]:
    return {"photo_id": np.zeros(0, np.int64), "sha256": np.zeros(0, "S64"), "height": np.zeros(0, np.int32),
            "width": np.zeros(0, np.int32), "rejected": np.zeros(0, bool), "detections": np.zeros(0, np.int32),
            "row": np.zeros(0, np.int32)}


def read_entries(path: str) -> dict[tuple[int, str], Entry]:
    """Every entry of one part file by (photo_id, sha256)."""
    rows = read_table(path).to_pylist()
    return {(row["photo_id"], row["sha256"]): _entry_of_row(row) for row in rows}


def entry_at(table: Any, row: int) -> Entry:
    """The entry in row `row` of a part file's Table (`read_table(path)`), converting that row only
    (a lookup reads a file once and keeps the Arrow table, not 64 Python entries)."""
    return _entry_of_row({name: table.column(name)[row].as_py() for name in table.column_names})


def _entry_of_row(row: Mapping[str, Any]) -> Entry:
    """An Entry from a Parquet row (a file written before the `detections` column: -1, unknown)."""
    row = dict(row)
    if row.get("detections") is None:
        row["detections"] = -1
    return Entry(**row)


# ---- privacy, verify, stats: called by dataset.takedown / verify / stats ----

def remove_entries(store: str, user_nsids: Iterable[str] = (), photo_ids: Iterable[int] = ()) -> dict[str, int]:
    """Drop every entry of these users / photos from the store: each part file holding one is
    rewritten without it (new content name) and the old file deleted, so no trace is left.
    Returns {"entries_removed", "files_rewritten"}."""
    users, photos = set(user_nsids), {int(p) for p in photo_ids}
    removed = rewritten = 0
    if not (users or photos):
        return {"entries_removed": 0, "files_rewritten": 0}
    for directory in model_dirs(store):
        for path in part_paths(directory):
            table = read_table(path)
            keep = [not (u in users or p in photos) for u, p in
                    zip(table.column("user_nsid").to_pylist(), table.column("photo_id").to_pylist())]
            if all(keep):
                continue
            removed += keep.count(False)
            kept = [_entry_of_row(row) for row, k in zip(table.to_pylist(), keep) if k]
            new_path = write_part(directory, kept)
            if new_path != path:
                fs.delete([path])
            rewritten += 1
    return {"entries_removed": removed, "files_rewritten": rewritten}


def verify_store(store: str, user_nsids: Iterable[str] = (), photo_ids: Iterable[int] = ()) -> list[str]:
    """Problems of a store: a part file whose name is not its content hash, that does not read,
    with rows out of order or holding an entry of one of these (opted-out) users / photos; a
    model directory whose models.json does not hash to its name."""
    problems, users, photos = [], set(user_nsids), {int(p) for p in photo_ids}
    for directory in model_dirs(store):
        name = directory.rsplit("/", 1)[1]
        try:
            if model_key(fs.read_json(fs.join(directory, MODELS_FILE))) != name:
                problems.append(f"{directory}: models.json does not hash to {name}")
        except ValueError as error:
            problems.append(f"{directory}/{MODELS_FILE}: {error}")
        for path in part_paths(directory):
            data = fs.read_bytes(path)
            if part_name(data) != path.rsplit("/", 1)[1]:
                problems.append(f"{path}: content does not match its name (sha256 {hashlib.sha256(data).hexdigest()})")
                continue
            try:
                table = read_table(path, list(KEY_COLUMNS))
            except Exception as error:  # a corrupt file is a finding, not a crash
                problems.append(f"{path}: does not read: {type(error).__name__}: {error}")
                continue
            ids, shas, nsids = (table.column(c).to_pylist() for c in KEY_COLUMNS)
            keys = list(zip(ids, shas))
            if keys != sorted(keys):
                problems.append(f"{path}: rows not sorted by (photo_id, sha256)")
            opted_out = sorted({p for p, u in zip(ids, nsids) if p in photos or u in users})
            if opted_out:
                problems.append(f"{path}: holds entries of opted-out photos {opted_out[:10]}: run takedown")
    return problems


def store_stats(store: str) -> dict[str, Any]:
    """{"models": {key: {"versions", "entries", "annotated", "rejected", "files", "bytes"}}} of a store."""
    models = {}
    for directory in model_dirs(store):
        keys, rejected, size, paths = set(), set(), 0, part_paths(directory)
        for path in paths:
            table = read_table(path, ["photo_id", "sha256", "status"])
            size += len(fs.read_bytes(path))
            for pid, sha, status in zip(*(table.column(c).to_pylist() for c in ("photo_id", "sha256", "status"))):
                keys.add((pid, sha))
                if status == REJECTED:
                    rejected.add((pid, sha))
        models[directory.rsplit("/", 1)[1]] = {
            "versions": fs.read_json(fs.join(directory, MODELS_FILE)), "entries": len(keys),
            "annotated": len(keys - rejected), "rejected": len(rejected), "files": len(paths), "bytes": size}
    return {"store": store, "models": models}
