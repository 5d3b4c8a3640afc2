"""Stage 1, read: YFCC100M metadata files -> `YfccRecord`s (+ rejects for malformed lines).

Files are matched and opened through Beam's fileio / FileSystems (local, gs://, ...), plain or
compressed (CompressionTypes.AUTO: .gz, .bz2 by extension) and read as a stream, so that every
line's number in its file is known (`source='file:line'`, 1-based) and memory stays flat. One
file is read by one worker: split a big plain file, or use the ten 10M-line split files, to
spread the read over many workers (bz2/gzip cannot be split anyway).

The pure core is `iter_lines` (bytes stream -> lines) and `parse_numbered_lines` (lines ->
records or rejects); `transforms.yfcc_format.parse_line` parses one line.
"""
from __future__ import annotations

import bz2
import contextlib
import dataclasses
import functools
import gzip
import operator
import os
import zlib
from typing import Any, BinaryIO, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from apache_beam import coders
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms import live_counts
from transforms.records import METRICS_NAMESPACE, REJECTS_TAG, Rejected, YfccRecord
from transforms.rejects import reject
from transforms.stage import StageDoFn
from transforms.yfcc_format import COLUMNS_23, COLUMNS_25, LineError, build_record, parse_line

STAGE = "read"
# Side output with one (file path, number of lines) per file read: the "lines read" total that
# the accounting invariant lines_read = kept + rejected is checked against.
LINE_COUNTS_TAG = "line_counts"
READ_CHUNK_BYTES = 1 << 20
# The block path's read size: each block costs a fixed few dozen Arrow calls, so bigger blocks
# are faster (1 MiB -> 4 MiB: +20 % lines/s) while memory stays a few blocks' worth.
BLOCK_READ_BYTES = 4 << 20
# Per-file reject reasons: the file is recorded (record id = its path) on top of its lines, so
# that the accounting lines_read = kept + rejected fails loudly as well.
INPUT_REASONS = ("truncated_input", "corrupt_input")


# A YfccRecord as the plain tuple of its fields (in dataclass order) and back: the compact form
# that Beam's C FastPrimitivesCoder encodes without pickling (records in a shuffled batch).
RECORD_FIELDS = tuple(field.name for field in dataclasses.fields(YfccRecord))
record_to_fields = operator.attrgetter(*RECORD_FIELDS)


def record_from_fields(values: tuple) -> YfccRecord:
    """Inverse of `record_to_fields`."""
    return build_record(dict(zip(RECORD_FIELDS, values)))


class YfccRecordCoder(coders.Coder):
    """Encode a YfccRecord as the tuple of its fields with Beam's C FastPrimitivesCoder.

    About 2x faster and 40% smaller than the default (pickling) coder; used wherever a
    PCollection is typed as YfccRecord.
    """

    def __init__(self):
        self._tuple_coder = coders.FastPrimitivesCoder()

    def encode(self, record: YfccRecord) -> bytes:
        return self._tuple_coder.encode(record_to_fields(record))

    def decode(self, encoded: bytes) -> YfccRecord:
        return record_from_fields(self._tuple_coder.decode(encoded))

    def is_deterministic(self) -> bool:
        return True

    def to_type_hint(self):
        return YfccRecord

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))


coders.registry.register_coder(YfccRecord, YfccRecordCoder)


def iter_lines(stream: BinaryIO, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
    """Yield the lines of a binary stream without their '\\n' (nor a '\\r' before it).

    Reads fixed-size chunks (works on Beam's CompressedFile, which has no fast iterator). The
    newline that ends the last line does not start another, empty, line.
    """
    pending = b""
    while True:
        chunk = stream.read(chunk_bytes)
        if not chunk:
            break
        lines = (pending + chunk).split(b"\n") if pending else chunk.split(b"\n")
        pending = lines.pop()
        for line in lines:
            yield line[:-1] if line.endswith(b"\r") else line
    if pending:
        yield pending[:-1] if pending.endswith(b"\r") else pending


def parse_numbered_line(raw: bytes, source: str) -> Union[YfccRecord, Rejected]:
    """Parse one line (bytes, no newline) read at `source` ('file:line'): a record or a reject.

    Bytes that are not UTF-8 decode with replacement; a blank line is rejected ('blank_line').
    """
    if not raw or raw.isspace():
        return Rejected(record_id=source, stage=STAGE, reason="blank_line")
    parsed = parse_line(raw.decode("utf-8", "replace"), source)
    if type(parsed) is LineError:
        return Rejected(record_id=source, stage=STAGE, reason=parsed.reason,
                        detail=parsed.detail)
    return parsed


def parse_numbered_lines(lines: Iterable[bytes], path: str
                         ) -> Iterator[Union[YfccRecord, Rejected]]:
    """Parse the lines of file `path`: a `YfccRecord` per good line, a `Rejected` per bad one."""
    for number, raw in enumerate(lines, start=1):
        yield parse_numbered_line(raw, f"{path}:{number}")


def iter_blocks(stream: BinaryIO, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
    """Yield the stream in blocks of whole lines, each read chunk's complete lines in one block
    (so that a read error strikes after the same lines as with `iter_lines`)."""
    pending = b""
    while True:
        chunk = stream.read(chunk_bytes)
        if not chunk:
            break
        data = pending + chunk if pending else chunk
        cut = data.rfind(b"\n") + 1
        pending = data[cut:]
        if cut:
            yield data[:cut]
    if pending:
        yield pending


# Columns a line of a block must match to skip the per-row parser: then `parse_line` would
# accept it (numbers that are plain ASCII digits / decimals); any other line takes that parser.
_DIGITS, _OPTIONAL_DIGITS = r"^[0-9]{1,18}$", r"^([0-9]{1,18})?$"
_OPTIONAL_DECIMAL = r"^(-?[0-9]{1,20}(\.[0-9]{1,20})?)?$"
_SIMPLE_NUMBERS = (("photo_id", _DIGITS), ("date_uploaded", _DIGITS), ("marker", r"^[01]$"),
                   ("longitude", _OPTIONAL_DECIMAL), ("latitude", _OPTIONAL_DECIMAL),
                   ("accuracy", _OPTIONAL_DIGITS))
BLOCK_COLUMNS = ("photo_id", "user_nsid", "user_tags", "license_name", "marker")


def _matches(column: pa.Array, pattern: str) -> pa.Array:
    """`pattern` (one of _SIMPLE_NUMBERS') matched against each value; digit checks without
    the regex engine (3x faster)."""
    if pattern in (_DIGITS, _OPTIONAL_DIGITS):
        digits = pc.and_(pc.ascii_is_decimal(column), pc.less_equal(pc.binary_length(column), 18))
        if pattern == _DIGITS:
            return digits
        return pc.or_(digits, pc.equal(column, ""))
    return pc.match_substring_regex(column, pattern)


class BlockSplit(NamedTuple):
    """A block cut into lines (as `iter_lines` cuts them), and the lines Arrow split and found
    simple: `parse_line` would accept them (`split_block`)."""

    data: bytes  # the block, '\r\n' read as '\n'
    starts: np.ndarray  # offset of each line in `data`
    ends: np.ndarray  # offset of each line's end (its newline, or the end of `data`)
    rows: np.ndarray  # indexes of the simple lines
    columns: dict[str, pa.Array]  # their BLOCK_COLUMNS (raw text, photo_id as int64)

    def __len__(self) -> int:
        return len(self.starts)

    def line(self, index: int) -> bytes:
        return self.data[self.starts[index]:self.ends[index]]


def split_block(block: bytes, all_columns: bool = False) -> Optional[BlockSplit]:
    """Cut a block into lines and its simple lines into BLOCK_COLUMNS with Arrow's CSV reader
    (tab-separated, no quoting; one C++ pass instead of a split per line). None when the block
    is not valid UTF-8 or holds a lone carriage return: the caller parses it line by line.
    With `all_columns`, `columns` holds every column of the block's layout (23 or 25; the
    scan's candidate tables are built from them)."""
    data = block.replace(b"\r\n", b"\n") if b"\r" in block else block
    size = len(data) - data.endswith(b"\n")
    if not size or b"\r" in data:
        return None
    try:
        data.decode("utf-8")  # about 1 % of the block's time: ASCII decodes fast
    except UnicodeDecodeError:
        return None
    body = memoryview(data)[:size]
    newlines = np.flatnonzero(np.frombuffer(body, np.uint8) == 0x0A)
    starts = np.concatenate(([0], newlines + 1))
    ends = np.append(newlines, size)
    layout = COLUMNS_25 if body[:ends[0]].tobytes().count(b"\t") == len(COLUMNS_25) - 1 \
        else COLUMNS_23
    table, other_layout = _read_tab_separated(body, layout, all_columns)
    line_of_row = np.delete(np.arange(len(starts)), np.asarray(other_layout, np.int64) - 1)
    if table.num_rows != len(line_of_row):  # never seen; the per-row parser is always right
        return None
    checks = _SIMPLE_NUMBERS + ((("line_idx", _DIGITS),) if "line_idx" in layout else ())
    simple = functools.reduce(pc.and_, (_matches(table.column(name).combine_chunks(), pattern)
                                        for name, pattern in checks))
    simple = pc.fill_null(simple, False)
    names = layout if all_columns else BLOCK_COLUMNS
    columns = {name: table.column(name).combine_chunks().filter(simple) for name in names}
    columns["photo_id"] = pc.cast(columns["photo_id"], pa.int64())
    return BlockSplit(data, starts, ends, line_of_row[simple.to_numpy(zero_copy_only=False)],
                      columns)


def _read_tab_separated(data: memoryview, layout: Sequence[str], all_columns: bool = False
                        ) -> tuple[pa.Table, list[int]]:
    """The lines of `data` with `len(layout)` fields as a table of the columns the block checks
    need (or with `all_columns` of every column; strings), and the 1-based numbers of the lines with another field count (skipped).
    Blank lines come out as rows of empty fields (they fail the photo_id check)."""
    other_layout: list[int] = []

    def skip(row) -> str:
        other_layout.append(row.number)
        return "skip"

    wanted = tuple(layout) if all_columns else BLOCK_COLUMNS + tuple(
        name for name, _ in _SIMPLE_NUMBERS) + (("line_idx",) if "line_idx" in layout else ())
    table = pa_csv.read_csv(
        pa.BufferReader(pa.py_buffer(data)),
        read_options=pa_csv.ReadOptions(column_names=list(layout), use_threads=False,
                                        block_size=len(data) + 1),
        parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False,
                                          escape_char=False, newlines_in_values=False,
                                          ignore_empty_lines=False, invalid_row_handler=skip),
        convert_options=pa_csv.ConvertOptions(
            column_types={name: pa.string() for name in wanted}, include_columns=list(
                dict.fromkeys(wanted)), strings_can_be_null=False, null_values=[]))
    return table, other_layout


@contextlib.contextmanager
def open_checked(readable_file: fileio.ReadableFile, compression_type: str) -> Iterator[BinaryIO]:
    """Open a matched file for reading, decompressing .gz/.bz2 with Python's gzip/bz2 modules.

    Beam's CompressedFile stops quietly at a truncated stream and never checks the gzip trailer
    (CRC-32, length); gzip.GzipFile and bz2.BZ2File raise EOFError / BadGzipFile / OSError
    instead, so a cut or corrupt file cannot pass as a shorter good one. Other compressions
    (deflate, zstd, ...) still go through Beam.
    """
    kind = compression_type
    if kind == CompressionTypes.AUTO:
        kind = CompressionTypes.detect_compression_type(readable_file.metadata.path)
    if kind not in (CompressionTypes.GZIP, CompressionTypes.BZIP2):
        with readable_file.open(mime_type="application/octet-stream",
                                compression_type=kind) as stream:
            yield stream
        return
    with readable_file.open(mime_type="application/octet-stream",
                            compression_type=CompressionTypes.UNCOMPRESSED) as raw:
        stream = (gzip.GzipFile(fileobj=raw, mode="rb") if kind == CompressionTypes.GZIP
                  else bz2.BZ2File(raw, "rb"))
        with stream:
            yield stream


def input_error_reason(error: BaseException) -> str:
    """The per-file reject reason for an error raised while decompressing a file."""
    return "truncated_input" if isinstance(error, EOFError) else "corrupt_input"


def _first(values: Iterable):
    """Combine function that keeps one of equal values."""
    return next(iter(values))


def split_patterns(patterns: Union[str, Sequence[str]]) -> list[str]:
    """The file patterns of a comma-separated string or a sequence; ValueError when none."""
    if isinstance(patterns, str):
        patterns = [part for part in patterns.split(",") if part]
    patterns = [str(pattern) for pattern in patterns]
    if not patterns:
        raise ValueError("ReadYfcc needs at least one file or glob")
    return patterns


YFCC_FIELD_COUNTS = (23, 25)  # the dataset file's columns; 25 with the hash layout
SNIFF_BYTES = 1 << 16  # of the first line: a YFCC line is about 1-2 KB, a description up to 64 KB
SNIFF_FILES = 64  # per pattern: the files whose first line is checked at launch


def check_patterns_match(patterns: Sequence[str]) -> None:
    """Refuse, before the pipeline runs, input that is not YFCC100M metadata (issue 10, finding
    10): FileNotFoundError for a pattern that matches no file, IsADirectoryError for a folder,
    ValueError for a file whose first line (decompressed) is not 23 or 25 TAB-separated fields,
    such as a Parquet file or a URL list. A file that cannot be decompressed at all is left to the
    read stage, which records it as a per-file reject."""
    for pattern, result in zip(patterns, FileSystems.match(list(patterns))):
        if not result.metadata_list:
            raise FileNotFoundError(f"no YFCC metadata file matches {pattern!r}")
        for metadata in result.metadata_list[:SNIFF_FILES]:
            check_yfcc_file(metadata.path)


def check_yfcc_file(path: str) -> None:
    """Raise (one line) when `path` is a folder or its first line is not a YFCC100M line."""
    if "://" not in path and os.path.isdir(path):
        raise IsADirectoryError(f"--yfcc {path!r} is a folder: give the YFCC100M metadata files "
                                f"(or a glob such as {path.rstrip('/')}/yfcc100m_dataset-*.bz2)")
    try:
        with FileSystems.open(path, mime_type="application/octet-stream",
                              compression_type=CompressionTypes.AUTO) as handle:
            head = handle.read(SNIFF_BYTES)
    except (OSError, EOFError, zlib.error, ValueError):
        return  # unreadable: the read stage rejects the file with the reason
    first, newline, _ = head.lstrip(b"\r\n").partition(b"\n")
    if not first.strip() or not (newline or len(head) < SNIFF_BYTES):
        return  # empty, or a first line longer than the sniff: the read stage judges it
    fields = first.rstrip(b"\r").count(b"\t") + 1
    if fields not in YFCC_FIELD_COUNTS:
        raise ValueError(f"{path} is not YFCC100M metadata: its first line has {fields} "
                         f"TAB-separated fields, expected 23 or 25 (a Parquet file, a URL list?)")


def open_matched_files(pbegin: beam.pvalue.PBegin, patterns: Sequence[str],
                       compression_type: str) -> beam.PCollection:
    """The files the patterns match, each once, as `fileio.ReadableFile`s (applied in the
    caller's composite, so that the steps keep their labels)."""
    return (
        pbegin
        | "Patterns" >> beam.Create(list(patterns))
        | "Match" >> fileio.MatchAll()
        # Two patterns may match one file: read it once. The grouping also spreads the
        # files over workers before the long per-file read.
        | "KeyByPath" >> beam.Map(lambda metadata: (metadata.path, metadata))
        | "UniqueFiles" >> beam.CombinePerKey(_first)
        | "Metadata" >> beam.Values()
        | "Open" >> fileio.ReadMatches(compression=compression_type))


class ReadCounters:
    """The read stage's counters: files, lines and records read."""

    def __init__(self):
        self._lines = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.lines")
        self._records = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.records")
        self._files = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.files")

    def count_file(self, lines: int, records: int) -> None:
        self._files.inc()
        self._lines.inc(lines)
        self._records.inc(records)


def _raw_position(stream: Any) -> int:
    """How far into the file (compressed bytes) a stream has read, for progress; 0 if unknown."""
    raw = getattr(stream, "fileobj", None) or getattr(stream, "_fp", None) or stream
    try:
        return raw.tell()
    except (AttributeError, OSError, ValueError):
        return 0


# A block parser: (block of whole lines, file path, lines before it) -> (items to emit, lines in
# the block, records in the block); see `read_file`.
BlockParser = Callable[[bytes, str, int], tuple[list, int, int]]


def parse_block_per_row(block: bytes, path: str, lines_before: int) -> tuple[list, int, int]:
    """The default `BlockParser`: each line through `parse_numbered_line` (records and
    rejects, counted)."""
    raw_lines = (block[:-1] if block.endswith(b"\n") else block).split(b"\n")
    items = [as_output(parse_numbered_line(raw[:-1] if raw.endswith(b"\r") else raw,
                                           f"{path}:{number}"))
             for number, raw in enumerate(raw_lines, start=lines_before + 1)]
    return items, len(raw_lines), sum(type(item) is YfccRecord for item in items)


def as_output(item: Union[YfccRecord, Rejected]) -> Any:
    """A parsed line as a DoFn output: the record, or the reject counted and tagged."""
    if type(item) is Rejected:
        return reject(STAGE, item.reason, item.record_id, item.detail)
    return item


def read_file(readable_file: fileio.ReadableFile, compression_type: str,
              counters: ReadCounters, parse_block: Optional[BlockParser] = None
              ) -> Iterator[Union[YfccRecord, beam.pvalue.TaggedOutput]]:
    """Stream one matched file: its records, its rejects (TaggedOutput), then its line count
    (TaggedOutput LINE_COUNTS_TAG). Shared by `ReadYfcc` and the fused read + prefilter step.

    A truncated or corrupt .gz/.bz2 file ends in one reject of the whole file
    (`truncated_input` / `corrupt_input`, naming it) that on purpose breaks the accounting: the
    lines after the damage are unknown, so the run must not look complete. Any other failure
    part-way counts the lines so far plus one and is raised on: the caller's 'read.error' reject
    stands for the rest of the file, so that lines read = records + rejects still holds."""
    path = readable_file.metadata.path
    lines = records = 0
    try:
        with open_checked(readable_file, compression_type) as stream:
            if parse_block is not None:
                position = _raw_position(stream)
                for block in iter_blocks(stream, BLOCK_READ_BYTES):
                    items, block_lines_read, block_records = parse_block(block, path, lines)
                    yield from items
                    lines += block_lines_read
                    records += block_records
                    read_bytes, position = position, _raw_position(stream)
                    live_counts.add_all({"read.lines": block_lines_read,
                                         "read.bytes": position - read_bytes,
                                         "rejects.read": block_lines_read - block_records})
            else:
                for item in parse_numbered_lines(iter_lines(stream), path):
                    lines += 1
                    if type(item) is Rejected:
                        # reject() builds the Rejected and bumps its counter.
                        yield reject(STAGE, item.reason, item.record_id, item.detail)
                    else:
                        records += 1
                        yield item
    except (EOFError, OSError, zlib.error) as error:  # truncated / bad CRC / not gzip
        yield reject(STAGE, input_error_reason(error), path,
                     f"{path}: {type(error).__name__}: {error} (after line {lines})"[:300])
    except Exception:
        counters.count_file(lines + 1, records)
        yield beam.pvalue.TaggedOutput(LINE_COUNTS_TAG, (path, lines + 1))
        raise
    counters.count_file(lines, records)
    yield beam.pvalue.TaggedOutput(LINE_COUNTS_TAG, (path, lines))


def file_path(readable_file: Any) -> str:
    """The path of a `fileio.ReadableFile` (the record id of an error reading it)."""
    metadata = getattr(readable_file, "metadata", None)
    return str(getattr(metadata, "path", "unknown"))


class ReadYfccFileFn(StageDoFn):
    """Stream one matched file; emit records, rejects and the file's line count."""

    stage = STAGE

    def __init__(self, compression_type: str):
        self._compression_type = compression_type
        self._counters = ReadCounters()

    def element_id(self, readable_file: Any) -> str:
        return file_path(readable_file)

    def process_element(self, readable_file: fileio.ReadableFile):
        return read_file(readable_file, self._compression_type, self._counters)


class ReadOutput(NamedTuple):
    """What reading YFCC files yields: records (`main`), `rejects`, and one (path, lines) per
    file in `line_counts` (the "lines read" total of the accounting invariant)."""

    main: beam.PCollection
    rejects: beam.PCollection
    line_counts: beam.PCollection


class ReadYfcc(beam.PTransform):
    """Read YFCC100M metadata files (23- or 25-column lines, plain / .gz / .bz2, globs).

    Returns `ReadOutput(main=YfccRecord, rejects=Rejected, line_counts=(path, lines))`.
    With `validate` (default) every pattern must match at least one file when the pipeline is
    built, so a typo fails early instead of producing an empty run.
    """

    def __init__(self, patterns: Union[str, Sequence[str]],
                 compression_type: str = CompressionTypes.AUTO, validate: bool = True):
        super().__init__()
        self._patterns = split_patterns(patterns)
        self._compression_type = compression_type
        self._validate = validate

    def expand(self, pbegin: beam.pvalue.PBegin) -> ReadOutput:
        if self._validate:
            check_patterns_match(self._patterns)
        outputs = (
            open_matched_files(pbegin, self._patterns, self._compression_type)
            | "ReadLines" >> beam.ParDo(ReadYfccFileFn(self._compression_type))
            .with_output_types(YfccRecord).with_outputs(REJECTS_TAG, LINE_COUNTS_TAG, main="main"))
        return ReadOutput(main=outputs.main, rejects=outputs[REJECTS_TAG],
                          line_counts=outputs[LINE_COUNTS_TAG])
