"""Stage 2, prefilter: keep only the YFCC records that may be used, before any fetching.

A record is dropped (and rejected with a reason) when it is a video ('video'), its licence is
not CC ('license_unknown') or not in the allowlist ('license_not_allowed'), its owner tagged it
with an opt-out tag such as `no_cv` in any spelling Flickr treats as the same tag (`no cv`,
`NOCV`, `no-cv`: compared in Flickr's clean form, `transforms.tags.clean_tag`) ('no_cv_tag'), its owner or the photo is on an opt-out list
('user_opt_out', 'photo_opt_out'), or its photo id was already seen ('duplicate_photo_id': the
record with the lowest source file:line is kept, so the choice does not depend on the runner).

The pure core is `PrefilterRules.check` and `keep_first_of_each_photo` (with
`order_duplicates`); `Prefilter` is the Beam wrapper for a PCollection of records, and
`ReadAndPrefilter` = `ReadYfcc | Prefilter` fused into one step per file (the fast path of the
scan job: no element per record between reading and the rules).

Modules: `rules` (the pure rules and the duplicate choice), `blocks` (the same rules on whole
Arrow blocks, and the scan's candidate tables), this package (the Beam transforms).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from transforms import live_counts
from transforms.opt_out import read_opt_out
from transforms.records import FDH_LICENSES, METRICS_NAMESPACE, REJECTS_TAG, Rejected, YfccRecord
from transforms.rejects import reject, reject_table, rejects_to_table
from transforms.s1_read import STAGE as READ_STAGE
from transforms.s1_read import (LINE_COUNTS_TAG, ReadCounters, ReadOutput, check_patterns_match,
                                file_path, open_matched_files, read_file,
                                record_from_fields, record_to_fields, split_patterns)
from transforms.s2_prefilter.blocks import (BlockChecker, CandidateIds, CandidateRows,
                                            CandidateTableChecker, LOWERING_TO_ASCII,
                                            RejectRows, lowering_to_ascii)
from transforms.s2_prefilter.rules import (BATCH_SIZE, DEFAULT_DROP_TAGS, ID_BUCKETS,
                                           PrefilterRules, REJECTS_BATCH_SIZE, STAGE,
                                           USABLE_LICENSE_SLUGS, VALID_LICENSE_SLUGS, _PHOTO_ID,
                                           keep_first_of_each_photo, order_duplicates,
                                           scan_buckets, validate_licenses)
from transforms.spill import SpilledGroupByKey, SpillRef, read_spilled, spill_by_bucket
from transforms.spill import flatten_spilling_to
from transforms.stage import StageDoFn, StageOutput, stage_output
from transforms import table_coder
from transforms.yfcc_format import records_to_table

__all__ = [
    "BATCH_SIZE", "BlockChecker", "COUNT_CANDIDATES", "COUNT_LINES", "COUNT_REJECTS",
    "CandidateIds", "CandidateRows", "CandidateTableChecker", "CountReadAndPrefilter",
    "DEFAULT_DROP_TAGS", "ID_BUCKETS", "ID_SCHEMA", "ID_SPILL_ROWS", "KEPT_TABLE_ROWS",
    "LINE_COLUMN", "LOWERING_TO_ASCII", "Prefilter", "PrefilterParts", "PrefilterRules",
    "ReadAndPrefilter", "ReadAndPrefilterParts", "RejectRows", "STAGE", "ScanReadAndPrefilter",
    "TABLE_SPILL_ROWS", "USABLE_LICENSE_SLUGS", "VALID_LICENSE_SLUGS", "batch_rejects",
    "scan_buckets",
    "candidate_ids_of", "count_duplicates", "keep_first_of_each_photo", "keep_first_rows",
    "lowering_to_ascii", "order_duplicates", "validate_licenses",
]


class _CandidateBatcher:
    """Apply `PrefilterRules` to records; batch the candidates for the duplicate check.

    `add` returns a reject, a full (bucket, [record fields]) batch, or None; `drain` the
    partial batches. Shared by the per-record and the fused read + rules steps.
    """

    def __init__(self, rules: PrefilterRules):
        self._rules = rules
        self._batches: dict[int, list[tuple]] = {}
        self._passed = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.passed_rules")

    def add(self, record: YfccRecord):
        verdict = self._rules.check(record)
        if verdict is not None:
            reason, detail = verdict
            return reject(STAGE, reason, str(record.photo_id), detail,
                          photo_id=record.photo_id, user_nsid=record.user_nsid)
        bucket = record.photo_id % ID_BUCKETS
        batch = self._batches.setdefault(bucket, [])
        batch.append(record_to_fields(record))
        if len(batch) < BATCH_SIZE:
            return None
        self._passed.inc(len(batch))
        live_counts.add("prefilter.passed", len(batch))
        return bucket, self._batches.pop(bucket)

    def drain(self) -> list[tuple[int, list[tuple]]]:
        batches, self._batches = list(self._batches.items()), {}
        passed = sum(len(batch) for _, batch in batches)
        self._passed.inc(passed)
        live_counts.add("prefilter.passed", passed)
        return batches


class _RulesConfig:
    """The picklable configuration of the rules; `create` reads the opt-out lists."""

    def __init__(self, licenses: Iterable[str], opt_out_paths: Iterable[str],
                 drop_tags: Iterable[str]):
        self.licenses = validate_licenses(licenses)
        self.opt_out_paths = tuple(path for path in opt_out_paths if path)
        self.drop_tags = tuple(drop_tags)

    def create(self) -> PrefilterRules:
        return PrefilterRules.create(self.licenses, self.drop_tags,
                                     read_opt_out(self.opt_out_paths))


class _RulesStep:
    """The rules part of a DoFn (mixin): rules made once per worker in setup() (reading the
    opt-out lists), candidates batched per bundle, partial batches emitted at its end."""

    def __init__(self, config: _RulesConfig):
        self._config = config
        self._rules: Optional[PrefilterRules] = None
        self._batcher: Optional[_CandidateBatcher] = None

    def setup(self):
        self._rules = self._config.create()

    def start_bundle(self):
        self._batcher = _CandidateBatcher(self._rules)

    def on_record(self, record: YfccRecord):
        """A reject, a full batch, or nothing, for one record."""
        output = self._batcher.add(record)
        if output is not None:
            yield output

    def finish_bundle(self):
        # The transforms check that their input is in the global window.
        for bucket_batch in self._batcher.drain():
            yield GlobalWindows.windowed_value(bucket_batch)


class _ApplyRulesFn(_RulesStep, StageDoFn):
    """Apply the rules to each record. Emits the rejects, and the candidates as
    (bucket, [record fields]) batches for the duplicate check."""

    stage = STAGE

    def process_element(self, record: YfccRecord):
        return self.on_record(record)


def batch_rejects(outputs: Iterable[Any], size: int = REJECTS_BATCH_SIZE) -> Iterator[Any]:
    """The outputs, with the `Rejected`s (REJECTS_TAG) gathered in lists of up to `size`."""
    rejects: list[Rejected] = []
    for output in outputs:
        if isinstance(output, beam.pvalue.TaggedOutput) and output.tag == REJECTS_TAG:
            rejects.append(output.value)
            if len(rejects) == size:
                live_counts.add("rejects.prefilter", _prefilter_count(rejects))
                yield beam.pvalue.TaggedOutput(REJECTS_TAG, rejects)
                rejects = []
        else:
            yield output
    if rejects:
        live_counts.add("rejects.prefilter", _prefilter_count(rejects))
        yield beam.pvalue.TaggedOutput(REJECTS_TAG, rejects)


def _prefilter_count(rejects: list[Rejected]) -> int:
    return sum(rejected.stage == STAGE for rejected in rejects)


class _ReadAndApplyRulesFn(_RulesStep, StageDoFn):
    """Read one file and apply the rules to its records in the same step (one step per line
    less than ReadYfcc | Prefilter); emits what both would, the candidates in batches and the
    rejects in lists of up to REJECTS_BATCH_SIZE. An error is a 'read.error' of the file."""

    stage = READ_STAGE

    def __init__(self, compression_type: str, config: _RulesConfig):
        _RulesStep.__init__(self, config)
        self._compression_type = compression_type
        self._counters = ReadCounters()

    def element_id(self, readable_file: Any) -> str:
        return file_path(readable_file)

    def process_element(self, readable_file):
        on_record = self.on_record
        for output in read_file(readable_file, self._compression_type, self._counters,
                                BlockChecker(self._rules)):
            if type(output) is YfccRecord:
                yield from on_record(output)
            else:
                yield output

    def process(self, readable_file):
        return batch_rejects(super().process(readable_file))


class _KeepFirstOfPhotoFn(StageDoFn):
    """Keep one record per photo id of a bucket (lowest source); reject the others.

    Emits each kept record and reject, or with `batch_size` lists of up to that many kept
    records and one list of the bucket's rejects.
    """

    stage = STAGE

    def __init__(self, batch_size: Optional[int] = None):
        self._batch_size = batch_size
        self._kept = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.candidates")

    def element_id(self, bucket_batches: Any) -> str:
        return f"bucket {bucket_batches[0]}"

    def process(self, bucket_batches):
        for output in super().process(bucket_batches):
            if self._batch_size is not None and isinstance(getattr(output, "value", None), Rejected):
                output = beam.pvalue.TaggedOutput(REJECTS_TAG, [output.value])  # an error reject
            yield output

    def process_element(self, bucket_batches):
        _, batches = bucket_batches
        records = _ReiterableRecords(batches)
        kept_records: list[YfccRecord] = []
        rejects: list[beam.pvalue.TaggedOutput] = []
        kept_count = 0
        for kept, duplicates in keep_first_of_each_photo(records, records.photo_id_counts()):
            kept_count += 1
            if self._batch_size is None:
                yield kept
            else:
                kept_records.append(kept)
                if len(kept_records) == self._batch_size:
                    yield kept_records
                    kept_records = []
            rejects.extend(
                reject(STAGE, "duplicate_photo_id", str(kept.photo_id),
                       f"{duplicate.source} repeats {kept.source}",
                       photo_id=kept.photo_id, user_nsid=duplicate.user_nsid)
                for duplicate in duplicates)
        self._kept.inc(kept_count)
        if self._batch_size is None:
            yield from rejects
            return
        if kept_records:
            yield kept_records
        if rejects:
            yield beam.pvalue.TaggedOutput(REJECTS_TAG, [tagged.value for tagged in rejects])


class _ReiterableRecords:
    """The records of a grouped bucket's batches, decoded again on each iteration (so that a
    bucket's records never need to be in memory all at once, as lists of records)."""

    def __init__(self, batches: Iterable[list[tuple]]):
        # Runners give re-iterable GroupByKey values; a one-shot iterator is kept as a list.
        self._batches = batches if iter(batches) is not batches else list(batches)

    def __iter__(self) -> Iterator[YfccRecord]:
        for batch in self._batches:
            yield from map(record_from_fields, batch)

    def photo_id_counts(self) -> Counter:
        """How often each photo id occurs, read off the field tuples (no records built)."""
        return Counter(fields[_PHOTO_ID] for batch in self._batches for fields in batch)


class _DropDuplicates(beam.PTransform):
    """(bucket, [record fields]) batches -> StageOutput(main=YfccRecord per photo id, rejects);
    with `batch_size`, main holds lists of up to that many records instead. With `staging_dir`
    the batches wait in files there during the shuffle (`transforms.spill`)."""

    def __init__(self, batch_size: Optional[int] = None, staging_dir: Optional[str] = None):
        super().__init__()
        self._batch_size = batch_size
        self._staging_dir = staging_dir

    def expand(self, batches: beam.PCollection) -> StageOutput:
        output_type = YfccRecord if self._batch_size is None else list[YfccRecord]
        return stage_output(
            batches
            | "GroupByIdBucket" >> SpilledGroupByKey(self._staging_dir)
            | "KeepFirst" >> beam.ParDo(_KeepFirstOfPhotoFn(self._batch_size))
            .with_output_types(output_type).with_outputs(REJECTS_TAG, main="main"))


class Prefilter(beam.PTransform):
    """Keep the usable photos of a PCollection of `YfccRecord`s (in the global window).

    Returns StageOutput(main=YfccRecord (unique photo ids), rejects=Rejected). The rules run
    first, so only candidates are shuffled, in batches by bucket of photo ids, for the
    duplicate check.
    """

    def __init__(self, licenses: Iterable[str] = FDH_LICENSES,
                 opt_out_paths: Iterable[str] = (),
                 drop_tags: Iterable[str] = DEFAULT_DROP_TAGS):
        super().__init__()
        self._config = _RulesConfig(licenses, opt_out_paths, drop_tags)

    def expand(self, records: beam.PCollection) -> StageOutput:
        if not isinstance(records.windowing.windowfn, GlobalWindows):
            raise ValueError("Prefilter needs its input in the global window (a batch job)")
        self._config.create()  # reads the opt-out lists now: a missing or bad file fails early
        checked = records | "ApplyRules" >> beam.ParDo(
            _ApplyRulesFn(self._config)).with_outputs(REJECTS_TAG, main="main")
        unique = checked.main | "DropDuplicates" >> _DropDuplicates()
        rejects = ((checked[REJECTS_TAG], unique.rejects) | "MergeRejects" >> beam.Flatten())
        return StageOutput(main=unique.main, rejects=rejects)


class ReadAndPrefilter(beam.PTransform):
    """`ReadYfcc(patterns) | Prefilter(...)` fused: the rules run in the read step.

    Same outputs as the two in a row: ReadOutput(main=YfccRecord (unique photo ids),
    rejects=Rejected of both stages, line_counts=(path, lines)); faster, as a record is not
    emitted between reading and the rules. With `batch_size`, main holds lists of up to that
    many records and rejects lists of rejects (in any grouping), for consumers that work in
    batches such as a Parquet writer. With `staging_dir` (local runs), the candidates wait in
    files there during the duplicate check instead of in memory (`transforms.spill`).
    """

    def __init__(self, patterns: Union[str, Sequence[str]],
                 licenses: Iterable[str] = FDH_LICENSES, opt_out_paths: Iterable[str] = (),
                 drop_tags: Iterable[str] = DEFAULT_DROP_TAGS,
                 compression_type: str = CompressionTypes.AUTO, validate: bool = True,
                 batch_size: Optional[int] = None, staging_dir: Optional[str] = None):
        super().__init__()
        self._staging_dir = staging_dir
        self._patterns = split_patterns(patterns)
        self._compression_type = compression_type
        self._validate = validate
        self._config = _RulesConfig(licenses, opt_out_paths, drop_tags)
        self._batch_size = batch_size

    def _matched_files(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        """The input files, opened; the patterns and opt-out lists checked first (fail early)."""
        if self._validate:
            check_patterns_match(self._patterns)
        self._config.create()  # reads the opt-out lists now: a missing or bad file fails early
        return open_matched_files(pbegin, self._patterns, self._compression_type)

    def expand(self, pbegin: beam.pvalue.PBegin) -> ReadOutput:
        parts = self._parts(pbegin)
        # With a staging folder the rejects cross as SpilledBatch references (`LoadSpilled`).
        rejects = ((parts.read_rejects, parts.duplicate_rejects)
                   | "MergeRejects" >> flatten_spilling_to(self._staging_dir))
        return ReadOutput(main=parts.main, rejects=rejects, line_counts=parts.line_counts)

    def _parts(self, pbegin: beam.pvalue.PBegin) -> "PrefilterParts":
        read = (
            self._matched_files(pbegin)
            | "ReadLines" >> beam.ParDo(_ReadAndApplyRulesFn(self._compression_type, self._config))
            .with_output_types(Any).with_outputs(REJECTS_TAG, LINE_COUNTS_TAG, main="main"))
        unique = read.main | "DropDuplicates" >> _DropDuplicates(self._batch_size, self._staging_dir)
        read_rejects = read[REJECTS_TAG]
        if self._batch_size is None:
            read_rejects = read_rejects | "UnbatchRejects" >> beam.FlatMap(lambda batch: batch)
        return PrefilterParts(unique.main, read_rejects, unique.rejects, read[LINE_COUNTS_TAG])


class PrefilterParts(NamedTuple):
    """`ReadAndPrefilter`'s outputs with the rejects of reading and the rules apart from the
    duplicate-photo rejects: the local runner holds both inputs of a Flatten whole, so a job
    that can consume them apart (the scan writes each) never holds every reject at once."""

    main: beam.PCollection
    read_rejects: beam.PCollection
    duplicate_rejects: beam.PCollection
    line_counts: beam.PCollection


class ReadAndPrefilterParts(ReadAndPrefilter):
    """`ReadAndPrefilter` (same arguments) returning `PrefilterParts` (no Flatten of rejects)."""

    def expand(self, pbegin: beam.pvalue.PBegin) -> PrefilterParts:
        return self._parts(pbegin)


# Counts-only scan: what is counted, as ((kind, name), count) pairs (the scan_counts.json keys).
COUNT_LINES, COUNT_CANDIDATES, COUNT_REJECTS = (
    "lines_read", "candidates_per_license", "rejects_per_reason")
# Candidate ids are buffered per file up to this many, then staged in one file (a slice per
# bucket of photo ids) for the duplicate check: only references to the slices are shuffled.
ID_SPILL_ROWS = 1 << 18
ID_SCHEMA = pa.schema([("photo_id", pa.int64()), ("line", pa.int64()), ("license_code", pa.int8())])


class _CountReadAndRulesFn(_ReadAndApplyRulesFn):
    """Read one file and apply the rules like `_ReadAndApplyRulesFn`, but emit only counts
    ((kind, name), n) and, on the 'ids' output, (bucket, (path, SpillRef)) pairs: the
    candidates' photo ids, line numbers and licence codes are staged in `staging_dir` for the
    duplicate check, so nothing per candidate crosses the shuffle. A 'read.error' reject is
    emitted alone."""

    def __init__(self, compression_type: str, config: _RulesConfig, staging_dir: str):
        super().__init__(compression_type, config)
        self._staging_dir = staging_dir

    def process(self, readable_file):
        return StageDoFn.process(self, readable_file)

    def process_element(self, readable_file):
        counts: Counter = Counter()
        batches = _IdBatches(file_path(readable_file), self._staging_dir)
        try:
            yield from self._count_file(readable_file, counts, batches)
        finally:  # also when reading fails: the lines so far are counted (see read_file)
            yield from batches.drain()
            counts.update(batches.license_counts())
            yield from counts.items()

    def _count_file(self, readable_file, counts: Counter, batches: "_IdBatches"):
        for output in read_file(readable_file, self._compression_type, self._counters,
                                BlockChecker(self._rules, keep_records=False)):
            kind = type(output)
            if kind is CandidateIds:
                live_counts.add("prefilter.passed", len(output.photo_ids))
                yield from batches.add(output)
            elif kind is Counter:
                counts.update({(COUNT_REJECTS, f"{STAGE}.{reason}"): n
                               for reason, n in output.items()})
                live_counts.add("rejects.prefilter", sum(output.values()))
            elif kind is YfccRecord:
                verdict = self._rules.check(output)
                if verdict is None:
                    live_counts.add("prefilter.passed")
                    yield from batches.add(candidate_ids_of(output))
                else:
                    reject(STAGE, verdict[0], "")  # counted, not kept
                    live_counts.add("rejects.prefilter")
                    counts[(COUNT_REJECTS, f"{STAGE}.{verdict[0]}")] += 1
            elif output.tag == LINE_COUNTS_TAG:
                counts[(COUNT_LINES, "")] += output.value[1]
            else:
                counts[(COUNT_REJECTS, f"{output.value.stage}.{output.value.reason}")] += 1


def candidate_ids_of(record: YfccRecord) -> CandidateIds:
    """A one-row CandidateIds of a record read line by line."""
    _, _, line = record.source.rpartition(":")
    return CandidateIds(np.array([record.photo_id], np.int64), np.array([int(line)], np.int64),
                        np.array([VALID_LICENSE_SLUGS.index(record.license)], np.int8))


class _IdBatches:
    """Candidate ids of one file, buffered (at most ID_SPILL_ROWS), then staged in one file
    with a slice per bucket of photo ids (`transforms.spill`)."""

    def __init__(self, path: str, staging_dir: str):
        self._path, self._staging_dir = path, staging_dir
        self._parts: list[CandidateIds] = []
        self._size = 0
        self._licenses = np.zeros(len(VALID_LICENSE_SLUGS), dtype=np.int64)

    def add(self, ids: CandidateIds) -> Iterator[beam.pvalue.TaggedOutput]:
        self._licenses += np.bincount(ids.license_codes, minlength=len(VALID_LICENSE_SLUGS))
        self._parts.append(ids)
        self._size += len(ids.photo_ids)
        if self._size >= ID_SPILL_ROWS:
            yield from self.drain()

    def drain(self) -> Iterator[beam.pvalue.TaggedOutput]:
        if not self._parts:
            return
        photo_ids, lines, licenses = (np.concatenate(column) for column in zip(*self._parts))
        self._parts, self._size = [], 0
        table = pa.Table.from_arrays([photo_ids, lines, licenses], schema=ID_SCHEMA)
        for bucket, ref in spill_by_bucket(table, photo_ids % ID_BUCKETS, self._staging_dir):
            yield beam.pvalue.TaggedOutput("ids", (bucket, (self._path, ref)))

    def license_counts(self) -> dict[tuple[str, str], int]:
        return {(COUNT_CANDIDATES, slug): int(n)
                for slug, n in zip(VALID_LICENSE_SLUGS, self._licenses) if n}


def count_duplicates(bucket_refs: tuple[int, Iterable[tuple[str, SpillRef]]]) -> Iterator[tuple]:
    """Count pairs for the repeated photo ids of one bucket: each duplicate (all but the
    lowest source file:line) is a 'duplicate_photo_id' reject and one candidate less of its
    licence. Reads the bucket's staged slices; holds one bucket."""
    _, refs = bucket_refs
    paths, tables = [], []
    for path, ref in refs:
        table = read_spilled([ref])
        paths.extend([path] * table.num_rows)
        tables.append(table)
    table = pa.concat_tables(tables)
    photo_ids = table.column("photo_id").to_numpy()
    unique, counts = np.unique(photo_ids, return_counts=True)
    repeated = unique[counts > 1]
    if not len(repeated):
        return
    lines = table.column("line").to_numpy()
    licenses = table.column("license_code").to_numpy()
    sources: dict[int, list[tuple[str, int, int]]] = {}
    for row in np.flatnonzero(np.isin(photo_ids, repeated)).tolist():
        sources.setdefault(int(photo_ids[row]), []).append(
            (paths[row], int(lines[row]), int(licenses[row])))
    for same_photo in sources.values():
        for _, _, license_code in sorted(same_photo)[1:]:
            reject(STAGE, "duplicate_photo_id", "")
            yield (COUNT_REJECTS, f"{STAGE}.duplicate_photo_id"), 1
            yield (COUNT_CANDIDATES, VALID_LICENSE_SLUGS[license_code]), -1


class CountReadAndPrefilter(ReadAndPrefilter):
    """`ReadAndPrefilter` (same arguments, no batch_size) that only counts: a PCollection of
    ((kind, name), count) pairs (kind COUNT_LINES, COUNT_CANDIDATES or COUNT_REJECTS; to be
    summed per key), the same totals as counting ReadAndPrefilter's outputs. The candidates'
    ids are staged under `staging_dir` (`transforms.spill`; the caller removes it after the
    run): only references cross the shuffle, so memory does not grow with the input."""

    def __init__(self, patterns: Union[str, Sequence[str]], licenses: Iterable[str] = FDH_LICENSES,
                 opt_out_paths: Iterable[str] = (), drop_tags: Iterable[str] = DEFAULT_DROP_TAGS,
                 *, staging_dir: str, **read_options: Any):
        super().__init__(patterns, licenses, opt_out_paths, drop_tags, staging_dir=staging_dir,
                         **read_options)

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        read = (
            self._matched_files(pbegin)
            | "CountLines" >> beam.ParDo(_CountReadAndRulesFn(self._compression_type, self._config,
                                                              self._staging_dir))
            .with_outputs("ids", REJECTS_TAG, main="main"))
        duplicates = (read.ids | "GroupIdBucket" >> beam.GroupByKey()
                      | "CountDuplicates" >> beam.FlatMap(count_duplicates))
        errors = read[REJECTS_TAG] | "CountErrors" >> beam.Map(  # a file's 'read.error'
            lambda rejected: ((COUNT_REJECTS, f"{rejected.stage}.{rejected.reason}"), 1))
        return (read.main, duplicates, errors) | "AllCounts" >> beam.Flatten()


# Full scan: the candidates travel as tables. A file's candidate tables are buffered up to this
# many rows, then staged in one file with a slice per bucket of photo ids (`transforms.spill`);
# only (bucket, (path, SpillRef)) pairs cross the shuffle of the duplicate check.
TABLE_SPILL_ROWS = 1 << 15
# Kept rows leave the duplicate check in tables of this many rows, gathered across the buckets
# of a bundle (one Parquet row group each).
KEPT_TABLE_ROWS = 1 << 16
LINE_COLUMN = "line"  # the staged tables' extra column: the line number in the file


class _CandidateTables:
    """Candidate tables (and per-row candidate records) of one file, buffered, then staged by
    bucket of photo ids with their line numbers (`spill_by_bucket`)."""

    def __init__(self, path: str, staging_dir: str, buckets: int):
        self._path, self._staging_dir, self._buckets = path, staging_dir, buckets
        self._tables: list[pa.Table] = []
        self._records: list[YfccRecord] = []
        self._size = 0

    def add(self, rows: CandidateRows) -> Iterator[tuple[int, tuple[str, SpillRef]]]:
        self._tables.append(rows.table.append_column(LINE_COLUMN, pa.array(rows.line_numbers,
                                                                           pa.int64())))
        return self._added(rows.table.num_rows)

    def add_record(self, record: YfccRecord) -> Iterator[tuple[int, tuple[str, SpillRef]]]:
        self._records.append(record)
        return self._added(1)

    def _added(self, rows: int) -> Iterator[tuple[int, tuple[str, SpillRef]]]:
        self._size += rows
        if self._size >= TABLE_SPILL_ROWS:
            yield from self.drain()

    def drain(self) -> Iterator[tuple[int, tuple[str, SpillRef]]]:
        if self._records:
            lines = [int(record.source.rpartition(":")[2]) for record in self._records]
            self._tables.append(records_to_table(self._records).append_column(
                LINE_COLUMN, pa.array(lines, pa.int64())))
        if not self._tables:
            return
        table = pa.concat_tables(self._tables)
        self._tables, self._records, self._size = [], [], 0
        buckets = table.column("photo_id").to_numpy() % self._buckets
        for bucket, ref in spill_by_bucket(table, buckets, self._staging_dir):
            yield bucket, (self._path, ref)


class _RejectTables:
    """Rejects of one file that came as `Rejected`s (lines parsed one by one), buffered and
    emitted as REJECTS_SCHEMA tables of up to REJECTS_BATCH_SIZE rows."""

    def __init__(self):
        self._rejects: list[Rejected] = []

    def add(self, rejected: Rejected) -> Iterator[beam.pvalue.TaggedOutput]:
        self._rejects.append(rejected)
        if len(self._rejects) >= REJECTS_BATCH_SIZE:
            yield from self.drain()

    def drain(self) -> Iterator[beam.pvalue.TaggedOutput]:
        if self._rejects:
            live_counts.add("rejects.prefilter", _prefilter_count(self._rejects))
            yield beam.pvalue.TaggedOutput(REJECTS_TAG, rejects_to_table(self._rejects))
            self._rejects = []


def _tables_of_rejects(outputs: Iterable[Any]) -> Iterator[Any]:
    """The outputs, with a lone `Rejected` (a step's error reject) as a one-row table."""
    for output in outputs:
        if getattr(output, "tag", None) == REJECTS_TAG and type(output.value) is Rejected:
            output = beam.pvalue.TaggedOutput(REJECTS_TAG, rejects_to_table([output.value]))
        yield output


class _ScanReadAndRulesFn(_ReadAndApplyRulesFn):
    """Read one file and apply the rules like `_ReadAndApplyRulesFn`, in tables: main emits
    (bucket, (path, SpillRef)) pairs for the duplicate check (the candidates as tables,
    `CandidateTableChecker`, staged in `staging_dir`), REJECTS_TAG REJECTS_SCHEMA tables, and
    the line counts as `_ReadAndApplyRulesFn`."""

    def __init__(self, compression_type: str, config: _RulesConfig, staging_dir: str,
                 buckets: int):
        super().__init__(compression_type, config)
        self._staging_dir, self._buckets = staging_dir, buckets

    def process(self, readable_file):
        return _tables_of_rejects(StageDoFn.process(self, readable_file))

    def process_element(self, readable_file):
        tables = _CandidateTables(file_path(readable_file), self._staging_dir, self._buckets)
        rejects = _RejectTables()
        try:
            for output in read_file(readable_file, self._compression_type, self._counters,
                                    CandidateTableChecker(self._rules)):
                kind = type(output)
                if kind is CandidateRows:
                    live_counts.add("prefilter.passed", output.table.num_rows)
                    yield from tables.add(output)
                elif kind is RejectRows:
                    live_counts.add("rejects.prefilter", output.table.num_rows)
                    yield beam.pvalue.TaggedOutput(REJECTS_TAG, output.table)
                elif kind is YfccRecord:
                    yield from self._on_parsed_record(output, tables, rejects)
                elif output.tag == REJECTS_TAG:
                    yield from rejects.add(output.value)
                else:
                    yield output
        finally:  # also when reading fails: the candidates so far go on (see read_file)
            yield from tables.drain()
            yield from rejects.drain()

    def _on_parsed_record(self, record: YfccRecord, tables: _CandidateTables,
                          rejects: _RejectTables):
        verdict = self._rules.check(record)
        if verdict is None:
            live_counts.add("prefilter.passed")
            return tables.add_record(record)
        return rejects.add(reject(STAGE, verdict[0], str(record.photo_id), verdict[1],
                                  photo_id=record.photo_id, user_nsid=record.user_nsid).value)


def keep_first_rows(table: pa.Table, path_ranks: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a staged bucket table to keep (the lowest (path, line) per photo id), the
    duplicate rows, and for each duplicate the row kept in its stead; `path_ranks` orders the
    rows' files (their paths' sort order)."""
    photo_ids = table.column("photo_id").to_numpy()
    order = np.lexsort((table.column(LINE_COLUMN).to_numpy(), path_ranks, photo_ids))
    sorted_ids = photo_ids[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    duplicates = ~first
    return order[first], order[duplicates], order[group_start[duplicates]]


class _TableBuffer:
    """Tables gathered across elements and emitted in tables of `rows` rows (the last one
    smaller): a Parquet writer makes a row group of each table it is given, and a bucket's
    few hundred rows would make row groups that are slow to write and to read."""

    def __init__(self, rows: int):
        self._rows, self._tables, self._size = rows, [], 0

    def add(self, table: pa.Table) -> Iterator[pa.Table]:
        self._tables.append(table)
        self._size += table.num_rows
        if self._size >= self._rows:
            gathered = pa.concat_tables(self._tables)
            whole = gathered.num_rows - gathered.num_rows % self._rows
            for start in range(0, whole, self._rows):
                yield gathered.slice(start, self._rows)
            self._tables, self._size = [gathered.slice(whole)], gathered.num_rows - whole

    def drain(self) -> Iterator[pa.Table]:
        if self._size:
            yield pa.concat_tables(self._tables)
        self._tables, self._size = [], 0


class _KeepFirstRowsFn(StageDoFn):
    """Keep one row per photo id of a bucket's staged tables (lowest source); emit the kept
    rows as YFCC_RECORD_SCHEMA tables and one REJECTS_SCHEMA table of 'duplicate_photo_id'
    rejects, with the record id and detail `_KeepFirstOfPhotoFn` gives."""

    stage = STAGE

    def __init__(self):
        self._kept = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.candidates")
        self._duplicates = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.duplicate_photo_id")

    def element_id(self, bucket_refs: Any) -> str:
        return f"bucket {bucket_refs[0]}"

    def start_bundle(self):
        self._kept_tables = _TableBuffer(KEPT_TABLE_ROWS)

    def finish_bundle(self):
        for table in self._kept_tables.drain():
            yield GlobalWindows.windowed_value(table)

    def process(self, bucket_refs):
        return _tables_of_rejects(super().process(bucket_refs))

    def process_element(self, bucket_refs):
        _, refs = bucket_refs
        paths, tables = [], []
        for path, ref in refs:
            tables.append(read_spilled([ref]))
            paths.append(path)
        if not tables:
            return
        table = pa.concat_tables(tables)
        unique_paths = sorted(set(paths))
        path_ranks = np.repeat([unique_paths.index(path) for path in paths],
                               [part.num_rows for part in tables])
        kept, duplicates, kept_instead = keep_first_rows(table, path_ranks)
        kept_table = table.take(pa.array(kept)).drop_columns([LINE_COLUMN])
        self._kept.inc(kept_table.num_rows)
        yield from self._kept_tables.add(kept_table)
        if len(duplicates):
            yield beam.pvalue.TaggedOutput(REJECTS_TAG, self._duplicate_rejects(
                table, duplicates, kept_instead))

    def _duplicate_rejects(self, table: pa.Table, duplicates: np.ndarray,
                           kept_instead: np.ndarray) -> pa.Table:
        """The 'duplicate_photo_id' rejects `_KeepFirstOfPhotoFn` gives, as one table."""
        self._duplicates.inc(len(duplicates))
        columns = table.select(["photo_id", "source", "user_nsid"])
        repeated, kept = columns.take(pa.array(duplicates)), columns.take(pa.array(kept_instead))
        return reject_table(
            STAGE, pa.repeat(pa.scalar("duplicate_photo_id", pa.string()), len(duplicates)),
            pc.cast(kept.column("photo_id"), pa.string()),
            pc.binary_join_element_wise(repeated.column("source"), kept.column("source"),
                                        " repeats "),
            kept.column("photo_id"), repeated.column("user_nsid"))


class ScanReadAndPrefilter(ReadAndPrefilter):
    """`ReadAndPrefilterParts` for the full scan: the same candidates, rejects and line counts,
    the candidates as YFCC_RECORD_SCHEMA tables (main) instead of lists of records, staged
    under `staging_dir` during the duplicate check (the caller removes it after the run) in
    `buckets` buckets of photo ids (`scan_buckets`: one bucket's rows are held at a time); the
    rejects as REJECTS_SCHEMA tables (no Python object per rejected line)."""

    def __init__(self, patterns: Union[str, Sequence[str]], licenses: Iterable[str] = FDH_LICENSES,
                 opt_out_paths: Iterable[str] = (), drop_tags: Iterable[str] = DEFAULT_DROP_TAGS,
                 *, staging_dir: str, buckets: int = ID_BUCKETS, **read_options: Any):
        super().__init__(patterns, licenses, opt_out_paths, drop_tags, staging_dir=staging_dir,
                         **read_options)
        self._buckets = buckets

    def expand(self, pbegin: beam.pvalue.PBegin) -> PrefilterParts:
        table_coder.register()  # tables cross these steps: a coder that measures them cheaply
        read = (
            self._matched_files(pbegin)
            | "ReadLines" >> beam.ParDo(_ScanReadAndRulesFn(self._compression_type, self._config,
                                                            self._staging_dir, self._buckets))
            .with_output_types(Any, **{REJECTS_TAG: pa.Table})
            .with_outputs(REJECTS_TAG, LINE_COUNTS_TAG, main="main"))
        unique = (read.main | "GroupIdBucket" >> beam.GroupByKey()
                  | "KeepFirst" >> beam.ParDo(_KeepFirstRowsFn())
                  .with_output_types(pa.Table, **{REJECTS_TAG: pa.Table})
                  .with_outputs(REJECTS_TAG, main="main"))
        return PrefilterParts(unique.main, read[REJECTS_TAG], unique[REJECTS_TAG],
                              read[LINE_COUNTS_TAG])
