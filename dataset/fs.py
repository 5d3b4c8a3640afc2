"""The one filesystem layer: Apache Beam's `FileSystems` (local paths and gs:// alike).

gs:// goes through Beam's GCS client, which honours STORAGE_EMULATOR_HOST (the tests' emulator).
Every write of a dataset file is atomic: bytes go to a hidden temporary name in the same
directory (`.NAME.tmp-<hex>`, never matching `out-*.tar`), then are renamed onto the final name,
so a killed writer never leaves a partial file under a real name. Every JSON file of a dataset
is `json.dumps(obj, sort_keys=True, indent=1)` + newline, so re-runs give the same bytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from typing import IO, Any, Iterator, Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

TEMP_MARKER = ".tmp-"  # temporary names: `.NAME.tmp-<hex>`
JSON_INDENT = 1


def join(root: str, relative: str) -> str:
    """`root`/`relative` for a local path or a URI (the root's trailing slash ignored)."""
    return FileSystems.join(root.rstrip("/"), relative)


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def open_read(path: str) -> IO[bytes]:
    """A binary reader (never decompressed by extension)."""
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_bytes(path: str) -> bytes:
    with open_read(path) as handle:
        return handle.read()


def read_text(path: str) -> Optional[str]:
    """The UTF-8 text of `path`, or None when it does not exist."""
    return read_bytes(path).decode("utf-8") if exists(path) else None


def glob(pattern: str) -> list[str]:
    """Paths matching a FileSystems pattern (`*` within a directory, `**` across), sorted."""
    return sorted(meta.path for result in FileSystems.match([pattern]) for meta in result.metadata_list)


def relative_to(root: str, path: str) -> str:
    """`path` relative to `root` (unchanged when it is not under it)."""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path


def rename(source: str, destination: str) -> None:
    FileSystems.rename([source], [destination])


def delete(paths: list[str]) -> None:
    FileSystems.delete(paths)


def temp_path(path: str) -> str:
    """A fresh temporary name in the same directory as `path` (hidden, never `out-*.tar`)."""
    directory, name = FileSystems.split(path)
    return FileSystems.join(directory, f".{name}{TEMP_MARKER}{uuid.uuid4().hex}")


@contextlib.contextmanager
def atomic_create(path: str) -> Iterator[IO[bytes]]:
    """Open a writer on a temporary name; on success rename it onto `path`, on error delete it."""
    temporary = temp_path(path)
    handle = FileSystems.create(temporary, compression_type=CompressionTypes.UNCOMPRESSED)
    try:
        yield handle
        handle.close()
    except BaseException:
        handle.close()
        with contextlib.suppress(Exception):
            FileSystems.delete([temporary])
        raise
    FileSystems.rename([temporary], [path])


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary name and a rename."""
    with atomic_create(path) as handle:
        handle.write(data)


def copy_file(source: str, destination: str) -> bytes:
    """Copy one file (atomically at the destination); returns its bytes."""
    data = read_bytes(source)
    write_bytes_atomic(destination, data)
    return data


def sha256_of_stream(handle: IO[bytes], chunk_size: int = 1 << 20) -> tuple[str, int]:
    """(hex sha256, size) of everything left in a binary file handle."""
    digest = hashlib.sha256()
    size = 0
    while chunk := handle.read(chunk_size):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def dumps(obj: Any) -> str:
    """The one JSON layout of every dataset file and job report."""
    return json.dumps(obj, sort_keys=True, indent=JSON_INDENT) + "\n"


def read_json(path: str) -> Any:
    """Parse the JSON file at `path` (local or URI) in one read."""
    return json.loads(read_bytes(path).decode("utf-8"))


def write_json(path: str, obj: Any) -> None:
    """Write `obj` as JSON (`dumps` layout) to `path`, atomically."""
    write_bytes_atomic(path, dumps(obj).encode("utf-8"))


def load_json(dataset: str, name: str) -> Any:
    """Read DATASET/NAME as JSON."""
    return read_json(join(dataset, name))


def save_json(dataset: str, name: str, obj: Any) -> None:
    """Write DATASET/NAME as JSON (sorted keys, fixed indent), to a temporary name then renamed."""
    write_json(join(dataset, name), obj)
