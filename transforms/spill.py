"""Spilled shuffles: stage data in files and send only references through a GroupByKey
(or a Flatten).

Beam's in-process runner holds a whole PCollection at each GroupByKey, so what crosses one
decides local memory. A step that must group much data by bucket (the duplicate check of the
scan) stages its rows instead: `spill_by_bucket` sorts a table by bucket and appends one Arrow
IPC stream per bucket to a new file under a staging folder (local or gs://), returning
(bucket, SpillRef) pairs of a few dozen bytes; after the GroupByKey, `read_spilled` reads a
bucket's slices back. Memory then holds one bucket at a time, not the input.

`SpilledGroupByKey` and `SpilledReshuffle` do the same for any picklable values: each bundle's
values are appended to one staging file and only (key, `Spilled`) pairs cross the shuffle; the
values are loaded lazily after it, one at a time. On the local runner they keep memory flat;
on Dataflow the shuffle service holds data on disk anyway, so jobs use them locally only.
A spilled value must be read after the GroupByKey (its file is closed when the bundle ends).

`SpilledFlatten` does it for a Flatten, which that runner also holds whole when it has several
inputs (the rejects of a rebuild: tens of millions at YFCC scale): each bundle's elements are
appended to a staging file in pickled batches and one `SpilledBatch` per batch crosses; inputs
that already are SpilledBatches (an inner SpilledFlatten) pass as they are, so nested Flattens
stay small. `LoadSpilled`, once at the final consumer, gives the elements back.
`flatten_spilling_to(None)` is Beam's Flatten, for remote runners.

The staging folder belongs to one run (`new_staging_dir`, `local_staging_dir`); `remove_staging`
deletes the files this module wrote there (`*.arrows`, `*.pickles`) and nothing else.
"""
from __future__ import annotations

import collections
import os
import pickle
import random
import tempfile
import uuid
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

SUFFIX = ".arrows"
VALUES_SUFFIX = ".pickles"
STAGING_FOLDER = "_staging"
OPEN_FILES = 16  # staging files a process keeps open for reading
RESHUFFLE_KEYS = 1024
# Elements per staged batch of a SpilledReshuffle: small enough to spread the work that follows
# (the rebuild's fetches) over bundles, big enough that a reference per batch stays small.
RESHUFFLE_BATCH = 64
SPILL_BATCH = 1024  # elements per staged batch of a SpilledFlatten


class SpillRef(NamedTuple):
    """Where one bucket's slice of a staged table lies: a file, a byte offset and a length."""

    path: str
    offset: int
    length: int


def new_staging_dir(output: str, job: str) -> str:
    """A fresh staging folder for one run of `job` under `output` (OUTPUT/_staging/JOB-HEX)."""
    return f"{output.rstrip('/')}/{STAGING_FOLDER}/{job}-{uuid.uuid4().hex[:16]}"


def local_staging_dir(job: str) -> str:
    """A fresh staging folder for one local run of `job` in the system's temporary folder."""
    return tempfile.mkdtemp(prefix=f"fdh-{job}-")


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def spill_by_bucket(table: pa.Table, buckets: np.ndarray, staging_dir: str
                    ) -> Iterator[tuple[int, SpillRef]]:
    """Write `table`'s rows to a new file in `staging_dir`, grouped by `buckets` (one int per
    row), and yield (bucket, SpillRef) for each bucket present, in bucket order."""
    if not len(buckets):
        return
    order = np.argsort(buckets, kind="stable")
    table, buckets = table.take(pa.array(order)), buckets[order]
    starts = np.flatnonzero(np.diff(buckets, prepend=buckets[0] - 1)).tolist()
    path = f"{staging_dir}/{uuid.uuid4().hex}{SUFFIX}"
    refs, offset = [], 0
    with FileSystems.create(path) as handle:
        for start, end in zip(starts, starts[1:] + [len(buckets)]):
            data = _ipc_bytes(table.slice(start, end - start))
            handle.write(data)
            refs.append((int(buckets[start]), SpillRef(path, offset, len(data))))
            offset += len(data)
    yield from refs


def read_spilled(refs: Iterable[SpillRef]) -> pa.Table:
    """The rows of `refs` (one bucket's slices) as one table, in the order of the refs."""
    return pa.concat_tables([pa.ipc.open_stream(_Reader.read(ref)).read_all() for ref in refs])


class Spilled(NamedTuple):
    """A value waiting in a staging file, and a small summary of it kept beside the reference."""

    ref: SpillRef
    summary: Any = None


class _Reader:
    """Read staged byte ranges, keeping the last OPEN_FILES files of this process open."""

    _handles: "collections.OrderedDict[str, Any]" = collections.OrderedDict()

    @classmethod
    def read(cls, ref: SpillRef) -> bytes:
        handle = cls._handles.pop(ref.path, None)
        if handle is None:
            handle = FileSystems.open(ref.path, mime_type="application/octet-stream",
                                      compression_type="uncompressed")
        cls._handles[ref.path] = handle
        while len(cls._handles) > OPEN_FILES:
            cls._handles.popitem(last=False)[1].close()
        handle.seek(ref.offset)
        return handle.read(ref.length)

    @classmethod
    def close_all(cls) -> None:
        while cls._handles:
            cls._handles.popitem()[1].close()


def load(spilled: Spilled) -> Any:
    """The value a `Spilled` stands for."""
    return pickle.loads(_Reader.read(spilled.ref))


class _StagingFile:
    """One new staging file of pickled values, opened at the first append, closed by `close`."""

    def __init__(self, staging_dir: str):
        self._staging_dir, self._handle, self._path, self._offset = staging_dir, None, "", 0

    def append(self, value: Any) -> SpillRef:
        """Pickle `value` onto the end of the file; where it lies."""
        if self._handle is None:
            self._path = f"{self._staging_dir}/{uuid.uuid4().hex}{VALUES_SUFFIX}"
            self._handle = FileSystems.create(self._path)
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        self._handle.write(data)
        ref = SpillRef(self._path, self._offset, len(data))
        self._offset += len(data)
        return ref

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class _SpillValuesFn(beam.DoFn):
    """(key, value) -> (key, Spilled): each bundle's values appended to one new staging file."""

    def __init__(self, staging_dir: str, summarize: Optional[Callable[[Any], Any]] = None):
        self._staging_dir, self._summarize = staging_dir, summarize

    def start_bundle(self):
        self._file = _StagingFile(self._staging_dir)

    def process(self, element):
        key, value = element
        ref = self._file.append(value)
        yield key, Spilled(ref, self._summarize(value) if self._summarize else None)

    def finish_bundle(self):
        self._file.close()


class SpillValues(beam.PTransform):
    """(key, value) -> (key, Spilled(ref, summarize(value))): the values go to staging files."""

    def __init__(self, staging_dir: str, summarize: Optional[Callable[[Any], Any]] = None):
        super().__init__()
        self._staging_dir, self._summarize = staging_dir, summarize

    def expand(self, pairs):
        return pairs | "Spill" >> beam.ParDo(_SpillValuesFn(self._staging_dir, self._summarize))


class LoadedValues:
    """The values of spilled references, loaded one at a time when iterated (file order)."""

    def __init__(self, spilled: Iterable[Spilled]):
        self._refs = sorted(item.ref for item in spilled)

    def __len__(self) -> int:
        return len(self._refs)

    def __iter__(self) -> Iterator[Any]:
        return (pickle.loads(_Reader.read(ref)) for ref in self._refs)


class SpilledGroupByKey(beam.PTransform):
    """GroupByKey whose values wait in staging files: (key, value) -> (key, iterable of values),
    only references crossing the shuffle. Without a staging folder, a plain GroupByKey."""

    def __init__(self, staging_dir: Optional[str]):
        super().__init__()
        self._staging_dir = staging_dir

    def expand(self, pairs):
        if not self._staging_dir:
            return pairs | "GroupByKey" >> beam.GroupByKey()
        return (pairs
                | "Spill" >> SpillValues(self._staging_dir)
                | "GroupByKey" >> beam.GroupByKey()
                | "Load" >> beam.MapTuple(lambda key, spilled: (key, LoadedValues(spilled))))


class SpilledReshuffle(beam.PTransform):
    """Reshuffle (redistribute elements, break fusion) through staging files: each bundle's
    elements are staged in batches of up to `batch_size`, and only a random key and a
    `SpilledBatch` per batch cross the GroupByKey. Without a staging folder, Beam's Reshuffle.
    Global window only (a bundle's last batch leaves from finish_bundle)."""

    def __init__(self, staging_dir: Optional[str], batch_size: int = RESHUFFLE_BATCH):
        super().__init__()
        self._staging_dir, self._batch_size = staging_dir, batch_size

    def expand(self, elements):
        if not self._staging_dir:
            return elements | "Reshuffle" >> beam.Reshuffle()
        return (elements
                | "SpillBatches" >> beam.ParDo(_SpillBatchesFn(self._staging_dir, self._batch_size))
                | "RandomKey" >> beam.Map(lambda batch: (random.randrange(RESHUFFLE_KEYS), batch))
                | "GroupByKey" >> beam.GroupByKey()
                | "Values" >> beam.FlatMapTuple(lambda _, batches: (
                    element for batch in batches for element in _elements_of(batch))))


class SpilledBatch(NamedTuple):
    """Up to a batch of elements waiting in a staging file, pickled as one list."""

    ref: SpillRef
    count: int


class _SpillBatchesFn(beam.DoFn):
    """element -> SpilledBatch: each bundle's elements appended to one new staging file in
    pickled lists of up to `batch_size`; a SpilledBatch passes through as it is."""

    def __init__(self, staging_dir: str, batch_size: int):
        self._staging_dir, self._batch_size = staging_dir, batch_size

    def start_bundle(self):
        self._file, self._batch = _StagingFile(self._staging_dir), []

    def process(self, element):
        if isinstance(element, SpilledBatch):
            yield element
            return
        self._batch.append(element)
        if len(self._batch) >= self._batch_size:
            yield self._spill_batch()

    def finish_bundle(self):
        if self._batch:
            yield GlobalWindows.windowed_value(self._spill_batch())
        self._file.close()

    def _spill_batch(self) -> SpilledBatch:
        batch, self._batch = self._batch, []
        return SpilledBatch(self._file.append(batch), len(batch))


class SpilledFlatten(beam.PTransform):
    """Flatten whose elements wait in staging files: only a SpilledBatch per batch of up to
    `batch_size` elements crosses it (inputs already SpilledBatches, e.g. from an inner
    SpilledFlatten, pass as they are). `LoadSpilled` gives the elements back, after it: the
    in-process runner holds both inputs of a multi-input Flatten whole. Global window only
    (a batch job), as a bundle's last batch leaves from finish_bundle."""

    def __init__(self, staging_dir: str, batch_size: int = SPILL_BATCH):
        super().__init__()
        if not staging_dir or batch_size < 1:
            raise ValueError("SpilledFlatten needs a staging folder and a positive batch size")
        self._staging_dir, self._batch_size = staging_dir, batch_size

    def expand(self, pcolls):
        pcolls = tuple(pcolls)
        if any(not isinstance(pcoll.windowing.windowfn, GlobalWindows) for pcoll in pcolls):
            raise ValueError("SpilledFlatten needs its inputs in the global window (a batch job)")
        spilled = tuple(pcoll | f"Spill{index}" >> beam.ParDo(
                            _SpillBatchesFn(self._staging_dir, self._batch_size))
                        for index, pcoll in enumerate(pcolls))
        return spilled | "Flatten" >> beam.Flatten()


def flatten_spilling_to(staging_dir: Optional[str], batch_size: int = SPILL_BATCH) -> beam.PTransform:
    """A SpilledFlatten into `staging_dir` (local runs), else Beam's Flatten (the graph a remote
    runner gets is unchanged: its shuffle holds data on disk anyway)."""
    return SpilledFlatten(staging_dir, batch_size) if staging_dir else beam.Flatten()


def _elements_of(element: Any) -> Iterable[Any]:
    if isinstance(element, SpilledBatch):
        return pickle.loads(_Reader.read(element.ref))
    return (element,)


class LoadSpilled(beam.PTransform):
    """SpilledBatch -> its elements, one batch in memory at a time; any other element as it is.
    Apply once, at the final consumer of (nested) SpilledFlattens: after it the elements are
    in memory again wherever a runner holds a PCollection."""

    def expand(self, elements):
        return elements | "Load" >> beam.FlatMap(_elements_of)


def remove_staging(staging_dir: str) -> int:
    """Delete the staged files of a run (and its folder when local and then empty); the number
    of files deleted. Files this module did not name are left alone."""
    _Reader.close_all()
    matched = [metadata for result in FileSystems.match(
        [f"{staging_dir}/*{SUFFIX}", f"{staging_dir}/*{VALUES_SUFFIX}"])
        for metadata in result.metadata_list]
    paths = [metadata.path for metadata in matched]
    if paths:
        FileSystems.delete(paths)
    folders = [staging_dir] + ([os.path.dirname(staging_dir)]
                               if os.path.basename(os.path.dirname(staging_dir)) == STAGING_FOLDER
                               else [])
    for folder in folders:
        if "://" not in folder and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
    return len(paths)
