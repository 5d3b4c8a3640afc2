"""Tar and Parquet shard files: deterministic bytes, written to a temporary name then renamed.

A tar shard holds the WebDataset members of its samples in the given order (sorted by key by the
writers); every header has the same mtime, owner, group and mode, so the same members always give
the same bytes. The temporary name (`.out-000000.tar.tmp-<random>`) never matches `out-*.tar`, so a
writer killed midway leaves no partial shard visible, and a re-run simply overwrites the shard
(rename replaces the destination). Parquet files sit beside their tar (same stem, `.parquet`).
All I/O goes through `dataset.fs` (Beam FileSystems), so gs:// paths work wherever local ones do.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import tarfile
from dataclasses import asdict, dataclass
from typing import IO, Any, Iterable, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from dataset import fs
from dataset.layout import parquet_path_for, relative_shard_path
from dataset.schema import PARQUET_SCHEMA

TAR_MTIME = 0  # fixed header fields: reproducible tars (like SOURCE_DATE_EPOCH builds)
TAR_MODE = 0o444
TAR_FORMAT = tarfile.USTAR_FORMAT  # plain headers only; member names are short (KEY.ext)
PARQUET_COMPRESSION = "zstd"


@dataclass(frozen=True)
class ShardInfo:
    """A written tar shard: its path relative to the dataset root, sha256, sample count and size."""

    path: str
    sha256: str
    samples: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _HashingWriter(io.RawIOBase):
    """Forwards writes to `sink` while counting bytes and hashing them (sha256)."""

    def __init__(self, sink: IO[bytes]):
        super().__init__()
        self._sink = sink
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.bytes

    def write(self, data) -> int:
        view = memoryview(data)
        self._sink.write(view)
        self.sha256.update(view)
        self.bytes += len(view)
        return len(view)


def _member_bytes(data: bytes | str) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


class TarShardWriter:
    """Append samples (WebDataset member dicts) to one tar shard; `close()` renames it into place.

    Use as a context manager; an exception inside the block deletes the temporary file and leaves
    any previous shard at `path` untouched.
    """

    def __init__(self, path: str, root: Optional[str] = None, check_unique: bool = True):
        self.path = path
        self._check_unique = check_unique
        self._samples = 0
        self._relative = relative_shard_path(path, root)
        self._context = fs.atomic_create(path)
        self._hashing = _HashingWriter(self._context.__enter__())
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=TAR_FORMAT)
        self._keys: set[str] = set()
        self.info: Optional[ShardInfo] = None

    def write(self, members: dict[str, bytes | str]) -> None:
        key = members["__key__"]
        if not isinstance(key, str) or not key or "." in key or "/" in key:
            raise ValueError(f"bad sample key {key!r}")
        if self._check_unique:
            if key in self._keys:
                raise ValueError(f"duplicate sample key {key} in {self.path}")
            self._keys.add(key)
        self._samples += 1
        for extension, data in members.items():
            if extension.startswith("__"):
                continue
            payload = _member_bytes(data)
            header = tarfile.TarInfo(f"{key}.{extension}")
            header.size = len(payload)
            header.mtime = TAR_MTIME
            header.mode = TAR_MODE
            header.uid = header.gid = 0
            header.uname = header.gname = ""
            self._tar.addfile(header, io.BytesIO(payload))
        # tarfile keeps a TarInfo per member for getmembers(); a writer never needs them, and they
        # are ~0.3-1 KB of heap per member: memory growing with the stream, not the sample.
        self._tar.members.clear()

    def close(self) -> ShardInfo:
        self._tar.close()
        self._context.__exit__(None, None, None)
        self.info = ShardInfo(self._relative, self._hashing.sha256.hexdigest(), self._samples,
                              self._hashing.bytes)
        return self.info

    def abort(self, error: BaseException) -> None:
        with contextlib.suppress(Exception):
            self._tar.close()
        with contextlib.suppress(BaseException):
            self._context.__exit__(type(error), error, error.__traceback__)

    def __enter__(self) -> "TarShardWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc is not None:
            self.abort(exc)
        elif self.info is None:
            self.close()


def write_tar_shard(path: str, samples: Iterable[dict[str, bytes | str]],
                    root: Optional[str] = None) -> ShardInfo:
    """Write member dicts, in the given order, as one tar shard at `path` (atomically).

    Returns its `ShardInfo`; `path` in it is relative to `root` (default: the last three parts,
    licence/split/name). `write_tar_shard(p, read_tar_shard(p))` reproduces the same bytes.
    """
    with TarShardWriter(path, root) as writer:
        for members in samples:
            writer.write(members)
        return writer.close()


def read_tar_shard(path: str) -> Iterator[dict[str, bytes]]:
    """Raw member dicts {"__key__": key, ext: bytes, ...} grouped by key, in file order (streamed)."""
    with fs.open_read(path) as handle:
        with tarfile.open(fileobj=handle, mode="r|") as tar:
            current: Optional[dict[str, bytes]] = None
            # `tar.next()` rather than iterating: forget each TarInfo once read, so a long tar
            # streams in constant memory (tarfile would keep every member's TarInfo).
            for info in iter(tar.next, None):
                tar.members.clear()
                if not info.isfile():
                    continue
                name = info.name.rsplit("/", 1)[-1]
                key, dot, extension = name.partition(".")
                if not dot:
                    raise ValueError(f"{path}: member {info.name!r} has no extension")
                data = tar.extractfile(info).read()
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                current[extension] = data
            if current is not None:
                yield current


def parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    """Deterministic Parquet bytes of `rows` (PARQUET_SCHEMA, one row group)."""
    table = pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression=PARQUET_COMPRESSION, row_group_size=max(len(rows), 1))
    return buffer.getvalue()


def write_parquet_shard(path: str, rows: list[dict[str, Any]]) -> str:
    """Write `rows` (PARQUET_SCHEMA) to `path` atomically; returns the file's sha256."""
    data = parquet_bytes(rows)
    fs.write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def read_parquet_table(path: str, columns: Optional[list[str]] = None) -> pa.Table:
    """A Parquet shard as a pyarrow Table (its schema is the file's: a dataset written before a
    column was added lacks it)."""
    with fs.open_read(path) as handle:
        return pq.read_table(handle, columns=columns)


def read_parquet_rows(path: str, columns: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """All rows of a Parquet shard as dicts."""
    return read_parquet_table(path, columns).to_pylist()


def iter_parquet_rows(path: str, columns: Optional[list[str]] = None,
                      batch_size: int = 512) -> Iterator[dict[str, Any]]:
    """Stream the rows of a Parquet shard in file order, `batch_size` rows in memory at a time."""
    with fs.open_read(path) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=columns):
            yield from batch.to_pylist()


def shard_entry(info: ShardInfo, parquet_sha256: str) -> dict[str, Any]:
    """The manifest entry of a tar shard and its Parquet file."""
    license, split, _ = info.path.split("/")
    return {**info.to_dict(), "license": license, "split": split,
            "parquet": parquet_path_for(info.path), "parquet_sha256": parquet_sha256}


def write_shard_items(output_dir: str, relative_path: str,
                      items: Iterable[tuple[dict[str, bytes | str], dict[str, Any]]]) -> dict[str, Any]:
    """Write one tar shard and its Parquet file under `output_dir` from (members, row) pairs.

    The pairs are consumed one at a time (members go straight to the tar), so only the shard's
    Parquet rows are held; each row's `shard` field is set to `relative_path`. Returns the
    manifest entry.
    """
    root = output_dir.rstrip("/")
    rows: list[dict[str, Any]] = []

    def members() -> Iterator[dict[str, bytes | str]]:
        for sample, row in items:
            rows.append({**row, "shard": relative_path})
            yield sample

    info = write_tar_shard(fs.join(root, relative_path), members(), root=root)
    parquet_sha = write_parquet_shard(fs.join(root, parquet_path_for(relative_path)), rows)
    return shard_entry(info, parquet_sha)


def write_shard(output_dir: str, relative_path: str, samples: Iterable[dict[str, bytes | str]],
                rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Write one tar shard and its Parquet file under `output_dir`; returns the manifest entry.

    `rows` must be the Parquet rows of the same samples in the same order; their `shard` field is
    set to `relative_path`.
    """
    missing = object()

    def pairs():
        for sample, row in itertools.zip_longest(samples, rows, fillvalue=missing):
            if sample is missing or row is missing:
                raise ValueError(f"{relative_path}: not as many samples as Parquet rows")
            yield sample, row

    return write_shard_items(output_dir, relative_path, pairs())
