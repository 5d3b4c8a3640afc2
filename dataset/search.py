"""Find the samples of Flickr users or photos in a dataset: the core of `beam_jobs.search_user`.

Searches FDH's metadata.json (its own way: one JSON parse) or the shards' Parquet files (a
dataset dir, one .parquet file, or a glob), reading only the key / user / photo columns and
pushing the filter down, so a row group whose statistics rule the values out is skipped. Files
are read through `dataset.fs` (Beam FileSystems): local paths and gs:// alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from dataset import fs
from dataset.layout import MANIFEST_FILE, is_shard_file, shard_glob, shard_parquet_path
from dataset.schema import KEY_COLUMN, PHOTO_COLUMN, SEARCH_COLUMNS, USER_COLUMN
from transforms.opt_out import OptOut

GLOB_CHARS = "*?["
READ_THREADS = 8  # Parquet files read at once by `parquet_matches`


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

    Our keys are the integers photo_id * 1000 + person_index (records.sample_key); FDH's `id` is the photo id.
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


def parquet_files(source: str) -> list[str]:
    """The shard Parquet files of `source`: a dataset dir, one .parquet file, or a glob
    (`*` and `?` within a directory, `**` across directories).

    A dataset dir lists the files named in its manifest.json (never rejects/*.parquet, which
    has another schema); without a manifest, every `*/*/out-NNNNNN.parquet` under it.
    Raises FileNotFoundError when nothing matches.
    """
    if any(ch in source for ch in GLOB_CHARS):
        found = fs.glob(source)
    elif source.endswith(".parquet") and fs.exists(source):
        found = [source]
    elif fs.exists(fs.join(source, MANIFEST_FILE)):
        shards = fs.load_json(source, MANIFEST_FILE).get("shards", [])
        found = [fs.join(source, shard_parquet_path(entry)) for entry in shards]
    else:
        found = [path for path in fs.glob(fs.join(source, shard_glob("parquet")))
                 if is_shard_file(fs.relative_to(source, path), "parquet")]
    if not found:
        raise FileNotFoundError(f"no Parquet shard files at {source}")
    return found


def _filter_expression(query: OptOut):
    """The pyarrow filter selecting `query`'s users or photos (None for an empty query)."""
    import pyarrow.compute as pc

    condition = None
    if query.user_nsids:
        condition = pc.field(USER_COLUMN).isin(sorted(query.user_nsids))
    if query.photo_ids:
        by_photo = pc.field(PHOTO_COLUMN).isin(sorted(query.photo_ids))
        condition = by_photo if condition is None else (condition | by_photo)
    return condition


def read_search_table(path: str, query: Optional[OptOut] = None):
    """The SEARCH_COLUMNS of one Parquet file (only `query`'s rows when given), as a pyarrow Table.

    Read in this thread (no pre-buffering, no thread pool): pyarrow's IO threads calling back
    into a Python file object (Beam's GCS reader) abort the interpreter at exit.
    """
    import pyarrow.parquet as pq

    with fs.open_read(path) as handle:
        return pq.read_table(handle, columns=list(SEARCH_COLUMNS),
                             filters=None if query is None else _filter_expression(query),
                             use_threads=False, pre_buffer=False)


def parquet_matches(files: Sequence[str], query: OptOut) -> list[Match]:
    """Rows of the shard Parquet `files` that `query` selects, sorted by key.

    READ_THREADS files are read at once (Python threads: on gs:// each file costs round trips).
    """
    from concurrent.futures import ThreadPoolExecutor

    if not query:
        return []
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        tables = pool.map(lambda path: read_search_table(path, query), files)
        found = [match for table in tables for match in table_matches(table, query)]
    return sorted(found, key=lambda m: m.key)


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
        return metadata_matches(fs.read_json(source), query)
    return parquet_matches(parquet_files(source), query)
