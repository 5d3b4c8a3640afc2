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
"""
from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union
from urllib.parse import quote

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from transforms import live_counts
from transforms.opt_out import OptOut, read_opt_out
from transforms.records import (FDH_LICENSES, LICENSES, METRICS_NAMESPACE, REJECTS_TAG, Rejected,
                                YfccRecord)
from transforms.rejects import reject
from transforms.s1_read import STAGE as READ_STAGE
from transforms.s1_read import (LINE_COUNTS_TAG, RECORD_FIELDS, ReadCounters, ReadOutput,
                                as_output, check_patterns_match, file_path,
                                open_matched_files, parse_block_per_row, parse_numbered_line,
                                read_file, record_from_fields, record_to_fields, split_block,
                                split_patterns)
from transforms.spill import SpilledGroupByKey, SpillRef, read_spilled, spill_by_bucket
from transforms.stage import StageDoFn, StageOutput, stage_output
from transforms.tags import clean_tag, find_tag
from transforms.yfcc_format import (NULL_DATE, YFCC_RECORD_SCHEMA, decode_nsid, decode_tags,
                                    decode_text, records_to_table)

STAGE = "prefilter"
DEFAULT_DROP_TAGS = ("no_cv",)
VALID_LICENSE_SLUGS = tuple(slug for slug, _ in LICENSES.values())
USABLE_LICENSE_SLUGS = tuple(slug for slug in VALID_LICENSE_SLUGS if "-nd-" not in slug)


# Licences a dataset of crops cannot use, with the reason (FDH publishes none of them).
REFUSED_LICENSES = {
    **{slug: "a NoDerivs licence forbids derivatives, and crops are derivatives"
       for slug in VALID_LICENSE_SLUGS if "-nd-" in slug},
    **{slug: "all rights reserved: no licence to copy, let alone derive crops"
       for slug in ("all-rights-reserved", "arr", "copyright")},
}


def validate_licenses(licenses: Iterable[str]) -> tuple[str, ...]:
    """Check licence slugs (e.g. 'cc-by-2'); raise ValueError listing the valid ones, or
    saying why a NoDerivs / all-rights-reserved licence cannot be used."""
    licenses = tuple(licenses)
    refused = [f"{slug} ({REFUSED_LICENSES[slug.lower()]})" for slug in licenses
               if slug.lower() in REFUSED_LICENSES]
    if refused:
        raise ValueError(f"licence(s) refused: {'; '.join(refused)}; usable licences are "
                         f"{', '.join(USABLE_LICENSE_SLUGS)}")
    unknown = [slug for slug in licenses if slug not in VALID_LICENSE_SLUGS]
    if unknown or not licenses:
        raise ValueError(
            f"unknown licence(s) {unknown or '(none given)'}; usable licences are "
            f"{', '.join(USABLE_LICENSE_SLUGS)} (FDH publishes {', '.join(FDH_LICENSES)})")
    return licenses


@dataclass(frozen=True)
class PrefilterRules:
    """The per-record rules: which licences are allowed, which tags and people opt out."""

    licenses: frozenset[str] = frozenset(FDH_LICENSES)
    drop_tags: frozenset[str] = frozenset(map(clean_tag, DEFAULT_DROP_TAGS))  # Flickr's clean form
    opt_out: OptOut = OptOut()

    @classmethod
    def create(cls, licenses: Iterable[str] = FDH_LICENSES,
               drop_tags: Iterable[str] = DEFAULT_DROP_TAGS,
               opt_out: OptOut = OptOut()) -> "PrefilterRules":
        return cls(frozenset(validate_licenses(licenses)),
                   frozenset(filter(None, map(clean_tag, drop_tags))), opt_out)

    def check(self, record: YfccRecord) -> Optional[tuple[str, str]]:
        """(reason, detail) when the record must be dropped, else None."""
        if record.marker != 0:
            return "video", ""
        if record.license is None:
            return "license_unknown", record.license_name
        if record.license not in self.licenses:
            return "license_not_allowed", record.license
        tag = find_tag(record.user_tags, self.drop_tags)
        if tag is not None:
            return "no_cv_tag", tag
        excluded = self.opt_out.excludes(record.user_nsid, record.photo_id)
        if excluded:
            return excluded, ""
        return None


def source_order(record: YfccRecord) -> tuple[str, int]:
    """Sort key of where a record was read: (file, line number), numbers compared as numbers."""
    path, _, line = record.source.rpartition(":")
    return (path, int(line)) if line.isdigit() else (record.source, -1)


def order_duplicates(records: Iterable[YfccRecord]) -> list[YfccRecord]:
    """Records sharing a photo id, the one to keep first (lowest source), then the duplicates."""
    return sorted(records, key=source_order)


# The duplicate check shuffles the candidates in batches keyed by a bucket of photo ids
# (photo_id % ID_BUCKETS) instead of one element per photo: the per-element cost of a shuffle
# (runner bookkeeping, coder calls) is paid once per batch, and a record travels as the plain
# tuple of its fields, which Beam's C coder encodes fast. The buckets spread the check over
# workers; a batch is sent when BATCH_SIZE records of one bucket are buffered.
ID_BUCKETS = 256
BATCH_SIZE = 128
# The fused read step emits its rejects in lists too: a runner that materializes the merge of
# the rejects of two steps (the local FnApiRunner does) then handles few elements.
REJECTS_BATCH_SIZE = 1024
_PHOTO_ID = RECORD_FIELDS.index("photo_id")


def keep_first_of_each_photo(records: Iterable[YfccRecord],
                             photo_id_counts: Optional[Mapping[int, int]] = None
                             ) -> Iterator[tuple[YfccRecord, list[YfccRecord]]]:
    """(record to keep, its duplicates) per photo id of `records`, in any order.

    Streams: only the photo id counts are held in memory (counted in a first pass over the
    re-iterable `records` unless given), plus the records of repeated ids (rare), which are
    ordered by `order_duplicates`.
    """
    counts = photo_id_counts
    if counts is None:
        counts = Counter(record.photo_id for record in records)
    repeated: dict[int, list[YfccRecord]] = {}
    for record in records:
        if counts[record.photo_id] == 1:
            yield record, []
        else:
            repeated.setdefault(record.photo_id, []).append(record)
    for same_photo in repeated.values():
        kept, *duplicates = order_duplicates(same_photo)
        yield kept, duplicates


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


# Verdict codes of `block_verdicts`, one per simple row of a block.
CANDIDATE, PER_ROW = 0, 1
BLOCK_REASONS = (None, None, "video", "license_unknown", "license_not_allowed", "no_cv_tag",
                 "user_opt_out", "photo_opt_out")
(_VIDEO, _UNKNOWN, _NOT_ALLOWED, _TAG, _USER, _PHOTO) = range(2, 8)
_LICENSE_NAMES = pa.array(list(LICENSES), pa.large_string())


def _flags(array: pa.Array) -> np.ndarray:
    """A boolean Arrow array as numpy (nulls as False)."""
    return pc.fill_null(array, False).to_numpy(zero_copy_only=False)


# Non-ASCII characters whose lower case holds an ASCII letter or digit, by that character: dotted
# capital I (U+0130 lowers to 'i' + a combining dot) and the Kelvin sign. A constant, because
# finding them means lowering all 1.1M code points (2.5 s per worker process);
# tests/test_scan_fast.py recomputes it against this Python's Unicode database.
LOWERING_TO_ASCII: dict[str, tuple[str, ...]] = {"i": ("\u0130",), "k": ("\u212a",)}


def lowering_to_ascii() -> dict[str, list[str]]:
    """LOWERING_TO_ASCII computed from the Unicode database (slow: for the test)."""
    found: dict[str, list[str]] = {}
    for code in range(0x80, 0x110000):
        char = chr(code)
        for lowered in set(char.lower()):
            if lowered.isascii() and lowered.isalnum():
                found.setdefault(lowered, []).append(char)
    return found


def _spellings(char: str) -> list[str]:
    """How ASCII letter or digit `char` may appear in a raw, lower-cased YFCC tag field: as is,
    %-escaped, or as a non-ASCII character (raw or %-escaped UTF-8) that lowers to it."""
    forms = {char, f"%{ord(char):02x}", f"%{ord(char.upper()):02x}"}
    for other in LOWERING_TO_ASCII.get(char, ()):
        forms.update({other, other.lower(), quote(other, safe="").lower()})
    return sorted(forms, key=len, reverse=True)


@functools.lru_cache(maxsize=64)
def _maybe_tag_pattern(name: str) -> Optional[str]:
    """A regex that every lower-cased raw tag field holding tag `name` (clean form) matches:
    the name's characters in order, in any spelling, within one comma-separated raw tag (an
    escaped comma is '%2c', so a literal comma always separates tags). None when the name is
    not all ASCII letters and digits (then every escaped field is checked per row)."""
    if not (name.isascii() and name.isalnum()):
        return None
    spelt = "[^,]*".join("(?:" + "|".join(map(re.escape, _spellings(char))) + ")" for char in name)
    return f"(?:^|,)[^,]*{spelt}[^,]*(?:,|$)"


_PLAIN_GAP = "[^A-Za-z0-9,]*"  # what Flickr's clean form drops from an ASCII tag without escapes


@functools.lru_cache(maxsize=64)
def _plain_tags_pattern(names: frozenset[str]) -> Optional[str]:
    """A regex that an ASCII tag field without escapes matches iff one of its tags has a clean
    form in `names`: the letters in order, case-insensitive, with only dropped characters around
    and between them, within one comma-separated tag. None when no name can be the clean form of
    such a tag (those are ASCII letters and digits only)."""
    spelt = sorted(_PLAIN_GAP.join(map(re.escape, name)) for name in names
                   if name.isascii() and name.isalnum())
    if not spelt:
        return None
    return f"(?i)(?:^|,){_PLAIN_GAP}(?:{'|'.join(spelt)}){_PLAIN_GAP}(?:,|$)"


def _tag_hits(tags: pa.Array, drop_tags: frozenset[str], rows: np.ndarray) -> np.ndarray:
    """Which of `rows` of the raw user_tags column hold a drop tag (clean form), vectorised
    for ASCII fields without escapes (one regex: their clean form is their letters and digits,
    lower case); other fields are decoded and checked per row when a loose pattern says they
    may hold one."""
    hits = np.zeros(len(tags), dtype=bool)
    chosen = np.flatnonzero(rows & _flags(pc.not_equal(tags, "")))
    tags = tags.take(pa.array(chosen))
    plain = _flags(pc.and_(pc.string_is_ascii(tags), pc.invert(pc.match_substring(tags, "%"))))
    chosen_hits = np.zeros(len(tags), dtype=bool)
    plain_pattern = _plain_tags_pattern(frozenset(drop_tags))
    if plain_pattern is not None:
        chosen_hits |= _flags(pc.match_substring_regex(tags, plain_pattern)) & plain
    maybe = np.flatnonzero(~plain)
    patterns = [_maybe_tag_pattern(name) for name in drop_tags]
    if len(maybe) and None not in patterns:
        lowered = pc.utf8_lower(tags.take(pa.array(maybe)))
        maybe = maybe[functools.reduce(np.logical_or, (
            _flags(pc.match_substring_regex(lowered, pattern)) for pattern in patterns))]
    for row in maybe.tolist():  # escaped or non-ASCII tags: as the parser does
        chosen_hits[row] = find_tag(decode_tags(tags[row].as_py()), drop_tags) is not None
    hits[chosen] = chosen_hits
    return hits


def block_verdicts(columns: dict[str, pa.Array], rules: PrefilterRules) -> np.ndarray:
    """`PrefilterRules.check` on the simple rows of a block (`transforms.s1_read.split_block`),
    vectorised: per row CANDIDATE, a code of BLOCK_REASONS, or PER_ROW when the raw text needs
    decoding first (the caller then parses that line and applies `check`)."""
    count = len(columns["photo_id"])
    verdicts = np.zeros(count, dtype=np.int8)
    open_rows = np.ones(count, dtype=bool)

    def decide(mask: np.ndarray, code: int) -> None:
        chosen = open_rows & mask
        verdicts[chosen] = code
        open_rows[chosen] = False

    decide(_flags(pc.equal(columns["marker"], "1")), _VIDEO)
    names = columns["license_name"]
    license_index = pc.fill_null(pc.index_in(names, value_set=_LICENSE_NAMES), -1)
    license_index = license_index.to_numpy(zero_copy_only=False)
    unknown = license_index < 0
    decide(unknown & _flags(pc.match_substring_regex(names, "[%+]")), PER_ROW)
    decide(unknown, _UNKNOWN)
    allowed = np.array([slug in rules.licenses for slug, _ in LICENSES.values()] + [False])
    decide(~allowed[license_index], _NOT_ALLOWED)
    if rules.drop_tags:
        decide(_tag_hits(columns["user_tags"], rules.drop_tags, open_rows), _TAG)
    if rules.opt_out:
        nsids = columns["user_nsid"]
        decide(_flags(pc.match_substring(nsids, "%")), PER_ROW)
        decide(_flags(pc.is_in(nsids, value_set=pa.array(sorted(rules.opt_out.user_nsids),
                                                          pa.large_string()))), _USER)
        decide(_flags(pc.is_in(columns["photo_id"], value_set=pa.array(
            sorted(rules.opt_out.photo_ids), pa.int64()))), _PHOTO)
    return verdicts


def verdict_detail(code: int, columns: dict[str, pa.Array], row: int,
                   rules: PrefilterRules) -> str:
    """The reject detail `PrefilterRules.check` gives for verdict `code` of simple row `row`."""
    if code == _VIDEO:
        return ""
    if code == _UNKNOWN:
        return columns["license_name"][row].as_py()
    if code == _NOT_ALLOWED:
        return LICENSES[columns["license_name"][row].as_py()][0]
    if code == _TAG:
        return find_tag(decode_tags(columns["user_tags"][row].as_py()), rules.drop_tags)
    return ""


class CandidateIds(NamedTuple):
    """The simple candidates of a block in counts-only mode: photo ids, line numbers and
    licence slugs (index in VALID_LICENSE_SLUGS), as numpy arrays."""

    photo_ids: np.ndarray
    line_numbers: np.ndarray
    license_codes: np.ndarray


class BlockChecker:
    """A `transforms.s1_read.BlockParser` that also applies the rules, vectorised.

    Lines Arrow can split and check go through `split_block` + `block_verdicts`; every other
    line (bad field count, odd numbers, escapes to decode, not UTF-8) through the per-row
    parser, so rejects and their reasons are the same as line by line. Emits YfccRecords for
    the DoFn to apply the rules to (per-row lines, and candidates when `keep_records`), the
    rejects, and without `keep_records` one CandidateIds and one Counter of prefilter reject
    reasons per block instead of the simple candidates and rejects.
    """

    all_columns = False  # split_block's: the columns the simple outputs need

    def __init__(self, rules: PrefilterRules, keep_records: bool = True):
        self._rules, self._keep_records = rules, keep_records

    def __call__(self, block: bytes, path: str, lines_before: int) -> tuple[list, int, int]:
        split = split_block(block, self.all_columns)
        if split is None:
            return parse_block_per_row(block, path, lines_before)
        rows, columns = split.rows, split.columns
        verdicts = block_verdicts(columns, self._rules)
        per_row = np.ones(len(split), dtype=bool)
        per_row[rows] = verdicts == PER_ROW
        if self._keep_records:
            per_row[rows[verdicts == CANDIDATE]] = True
        items = [as_output(parse_numbered_line(split.line(row), f"{path}:{lines_before + row + 1}"))
                 for row in np.flatnonzero(per_row).tolist()]
        records = len(split) - sum(type(item) is not YfccRecord for item in items)
        items.extend(self._simple_outputs(rows, columns, verdicts, lines_before, path))
        return items, len(split), records

    def _simple_outputs(self, rows: np.ndarray, columns: dict[str, pa.Array],
                        verdicts: np.ndarray, lines_before: int, path: str) -> list:
        rejected = np.flatnonzero(verdicts > PER_ROW)
        if not self._keep_records:
            candidates = np.flatnonzero(verdicts == CANDIDATE)
            slugs = pc.index_in(columns["license_name"].take(pa.array(candidates)),
                                value_set=_LICENSE_NAMES).to_numpy(zero_copy_only=False)
            reasons = Counter(BLOCK_REASONS[code] for code in verdicts[rejected].tolist())
            for reason, count in reasons.items():
                Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.{reason}").inc(count)
            return [CandidateIds(columns["photo_id"].to_numpy()[candidates],
                                 rows[candidates] + lines_before + 1, slugs.astype(np.int8)),
                    reasons]
        return self._rejects(rejected, columns, verdicts)

    def _rejects(self, rejected: np.ndarray, columns: dict[str, pa.Array],
                 verdicts: np.ndarray) -> list:
        """The rejects (tagged outputs) of the simple rows `rejected`, as `check` gives them."""
        chosen = pa.array(rejected)
        photo_ids = columns["photo_id"].take(chosen).to_pylist()
        nsids = columns["user_nsid"].take(chosen).to_pylist()
        return [reject(STAGE, BLOCK_REASONS[code], str(photo_id),
                       verdict_detail(code, columns, row, self._rules),
                       photo_id=photo_id, user_nsid=decode_nsid(nsid))
                for row, code, photo_id, nsid in zip(rejected.tolist(), verdicts[rejected].tolist(),
                                                     photo_ids, nsids)]


class CandidateRows(NamedTuple):
    """The simple candidates of a block as a YFCC_RECORD_SCHEMA table, with their line numbers
    in the file (the duplicate check's order)."""

    table: pa.Table
    line_numbers: np.ndarray


class CandidateTableChecker(BlockChecker):
    """A `BlockChecker` for the full scan: the simple candidates of a block come out as one
    `CandidateRows` (built column by column, `candidate_table`), the simple rejects as today;
    other lines go through the per-row parser (YfccRecords, for the DoFn to apply the rules)."""

    all_columns = True

    def __init__(self, rules: PrefilterRules):
        super().__init__(rules, keep_records=False)

    def _rejects(self, rejected: np.ndarray, columns: dict[str, pa.Array],
                 verdicts: np.ndarray) -> list:
        """`BlockChecker._rejects`, the details gathered column by column and counted once per
        reason (a reject costs a third as much)."""
        if not len(rejected):
            return []
        chosen = pa.array(rejected)
        codes = verdicts[rejected]
        names = columns["license_name"].take(chosen)
        details = np.full(len(rejected), "", dtype=object)
        unknown = codes == _UNKNOWN
        details[unknown] = np.asarray(names.filter(pa.array(unknown)).to_pylist(), dtype=object)
        not_allowed = codes == _NOT_ALLOWED
        details[not_allowed] = np.asarray(_SLUG_BY_LICENSE_INDEX.take(pc.index_in(
            names.filter(pa.array(not_allowed)), value_set=_LICENSE_NAMES)).to_pylist(),
            dtype=object)
        for row in np.flatnonzero(codes == _TAG).tolist():
            details[row] = verdict_detail(_TAG, columns, int(rejected[row]), self._rules)
        for code, count in zip(*np.unique(codes, return_counts=True)):
            Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.{BLOCK_REASONS[code]}").inc(int(count))
        photo_ids = columns["photo_id"].take(chosen).to_pylist()
        nsids = columns["user_nsid"].take(chosen).to_pylist()
        return [beam.pvalue.TaggedOutput(REJECTS_TAG, Rejected(
                    record_id=str(photo_id), stage=STAGE, reason=BLOCK_REASONS[code],
                    detail=detail, photo_id=photo_id,
                    user_nsid=nsid if "%" not in nsid else decode_nsid(nsid)))
                for code, photo_id, nsid, detail in zip(codes.tolist(), photo_ids, nsids,
                                                        details.tolist())]

    def _simple_outputs(self, rows: np.ndarray, columns: dict[str, pa.Array],
                        verdicts: np.ndarray, lines_before: int, path: str) -> list:
        outputs = self._rejects(np.flatnonzero(verdicts > PER_ROW), columns, verdicts)
        candidates = np.flatnonzero(verdicts == CANDIDATE)
        if len(candidates):
            chosen = pa.array(candidates)
            line_numbers = rows[candidates] + lines_before + 1
            outputs.append(CandidateRows(candidate_table(
                {name: column.take(chosen) for name, column in columns.items()},
                line_numbers, path), line_numbers))
        return outputs


_SLUG_BY_LICENSE_INDEX = pa.array([slug for slug, _ in LICENSES.values()], pa.string())
_NO_TAGS = pa.scalar([], pa.list_(pa.string()))
_NULL_STRING = pa.scalar(None, pa.string())


def _patched(values: pa.Array, rows: np.ndarray, replacements: list) -> pa.Array:
    """`values` with the values at `rows` replaced by `replacements` (in that order)."""
    if not len(rows):
        return values
    order = np.arange(len(values))
    order[rows] = len(values) + np.arange(len(rows))
    return pa.concat_arrays([values, pa.array(replacements, values.type)]).take(pa.array(order))


def _per_value(column: pa.Array, rows: np.ndarray, function) -> list:
    return [function(value) for value in column.take(pa.array(rows, pa.int64())).to_pylist()]


def _escaped_rows(column: pa.Array) -> np.ndarray:
    return np.flatnonzero(_flags(pc.match_substring(column, "%")))


# Value of each byte as a hex digit, -1 for other bytes.
_HEX_VALUE = np.full(256, -1, dtype=np.int16)
for _digit in "0123456789abcdefABCDEF":
    _HEX_VALUE[ord(_digit)] = int(_digit, 16)


def _string_bytes(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The value bytes (a copy) and the offsets (from 0) of a string array without nulls."""
    offsets = np.frombuffer(column.buffers()[1], np.int32)[
        column.offset:column.offset + len(column) + 1].astype(np.int64)
    data = np.frombuffer(column.buffers()[2] or b"", np.uint8)[offsets[0]:offsets[-1]].copy()
    return data, offsets - offsets[0]


def _url_decoded(column: pa.Array, plus_rows: Optional[np.ndarray] = None) -> Optional[pa.Array]:
    """`_unquote_plus` of every value, vectorised over the bytes: each '%XX' (two hex digits,
    inside the value) becomes its byte, other '%' stay, '+' becomes a space (only in
    `plus_rows` when given). None when a decoded value is not UTF-8 (the caller then decodes
    value by value, with replacement)."""
    column = column.cast(pa.string()) if column.type != pa.string() else column
    if column.null_count or not len(column):
        return None
    data, offsets = _string_bytes(column)
    plus = np.flatnonzero(data == 0x2B)
    if plus_rows is not None:
        plus = plus[plus_rows[np.searchsorted(offsets, plus, side="right") - 1]]
    data[plus] = 0x20
    escapes = np.flatnonzero(data == 0x25)
    escapes = escapes[escapes + 2 < len(data)]
    high, low = _HEX_VALUE[data[escapes + 1]], _HEX_VALUE[data[escapes + 2]]
    row_ends = offsets[np.searchsorted(offsets, escapes, side="right")]
    valid = (high >= 0) & (low >= 0) & (escapes + 3 <= row_ends)
    escapes, decoded = escapes[valid], (high[valid] * 16 + low[valid]).astype(np.uint8)
    data[escapes] = decoded
    keep = np.ones(len(data), dtype=bool)
    keep[escapes + 1] = keep[escapes + 2] = False
    new_offsets = offsets - 2 * np.searchsorted(escapes, offsets, side="left")
    result = pa.Array.from_buffers(pa.string(), len(column), [
        None, pa.py_buffer(new_offsets.astype(np.int32)), pa.py_buffer(data[keep])])
    if (decoded >= 0x80).any():
        try:
            result.validate(full=True)  # checks that each value is UTF-8
        except pa.ArrowInvalid:
            return None
    return result


def _decoded_text(column: pa.Array, plus_is_space: bool = True) -> pa.Array:
    """A raw free-text column as `parse_line` decodes it (`decode_text`; `decode_nsid` without
    `plus_is_space`: '+' stays in values without '%'), vectorised (`_url_decoded`); value by
    value when a decoded value is not UTF-8."""
    escaped = _escaped_rows(column)
    plus_rows = None
    if not plus_is_space:
        plus_rows = np.zeros(len(column), dtype=bool)
        plus_rows[escaped] = True
    decoded = _url_decoded(column, plus_rows)
    if decoded is not None:
        return decoded
    plain = pc.replace_substring(column, "+", " ") if plus_is_space else column
    return _patched(plain, escaped, _per_value(column, escaped,
                                               decode_text if plus_is_space else decode_nsid))


def _decoded_tags(column: pa.Array) -> pa.Array:
    """A raw tag column as `parse_line` splits it: on raw commas, each tag decoded (as
    `decode_tags`); an empty field is no tags."""
    split = pc.split_pattern(column, ",")
    tags = _url_decoded(split.values) if len(split.values) else split.values
    if tags is not None:
        split = pa.ListArray.from_arrays(split.offsets, tags)
        return pc.if_else(pc.equal(column, ""), _NO_TAGS, split)
    escaped = _escaped_rows(column)
    plain = pc.if_else(pc.equal(column, ""), _NO_TAGS,
                       pc.split_pattern(pc.replace_substring(column, "+", " "), ","))
    return _patched(plain, escaped, _per_value(column, escaped,
                                               lambda value: list(decode_tags(value))))


def _optional_number(column: pa.Array, number_type: pa.DataType) -> pa.Array:
    """A column of ASCII numbers or '' (checked by split_block) as numbers or nulls."""
    return pc.cast(pc.if_else(pc.equal(column, ""), _NULL_STRING, column), number_type)


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)


def _md5_hashes(urls: pa.Array, rows: np.ndarray) -> list[str]:
    """`photo_hash` of the download URLs at `rows`: md5 per value, the unpadded hex of all
    digests formatted at once with numpy."""
    md5 = hashlib.md5
    values = urls.take(pa.array(rows, pa.int64())).to_pylist()
    digests = np.frombuffer(b"".join([md5(url.encode("utf-8")).digest() for url in values]),
                            np.uint8).reshape(-1, 16)
    nibbles = np.stack((digests >> 4, digests & 15), axis=2).reshape(-1, 32)
    keep = np.ones(nibbles.shape, dtype=bool)
    keep[:, 0::2] = nibbles[:, 0::2] != 0  # '%x' drops a byte's leading zero nibble
    text = _HEX_DIGITS[nibbles[keep]].tobytes().decode("ascii")
    ends = np.cumsum(keep.sum(axis=1)).tolist()
    return [text[start:end] for start, end in zip([0] + ends[:-1], ends)]


def _photo_hashes(columns: dict[str, pa.Array]) -> pa.Array:
    """The photo_hash column as `parse_line` gives it: the hash column in lower case (25
    columns), else or when empty the md5 of the download URL (`photo_hash`)."""
    urls = columns["download_url"]
    if "photo_hash" not in columns:
        return pa.array(_md5_hashes(urls, np.arange(len(urls))), pa.string())
    hashes = columns["photo_hash"]
    lowered = pc.ascii_lower(hashes)
    unhashed = np.flatnonzero(_flags(pc.equal(hashes, "")))
    lowered = _patched(lowered, unhashed, _md5_hashes(urls, unhashed))
    not_ascii = np.flatnonzero(~_flags(pc.string_is_ascii(hashes)))
    return _patched(lowered, not_ascii, _per_value(hashes, not_ascii, str.lower))


def candidate_table(columns: dict[str, pa.Array], line_numbers: np.ndarray,
                    path: str) -> pa.Table:
    """The YFCC_RECORD_SCHEMA table `records_to_table` gives for the records `parse_line`
    makes of simple candidate rows (`split_block(all_columns=True)` columns, licence names
    known), built column by column: only escaped text is decoded value by value."""
    fields: dict[str, Any] = {name: columns[name] for name in YFCC_RECORD_SCHEMA.names
                              if name in columns}
    for name in ("user_nickname", "capture_device", "title", "description"):
        fields[name] = _decoded_text(columns[name])
    fields["user_nsid"] = _decoded_text(columns["user_nsid"], plus_is_space=False)
    for name in ("user_tags", "machine_tags"):
        fields[name] = _decoded_tags(columns[name])
    dates = columns["date_taken"]
    fields["date_taken"] = pc.if_else(pc.or_(pc.equal(dates, ""), pc.equal(dates, NULL_DATE)),
                                      _NULL_STRING, _decoded_text(dates))
    for name in ("date_uploaded", "marker"):
        fields[name] = pc.cast(columns[name], pa.int64())
    for name, number_type in (("longitude", pa.float64()), ("latitude", pa.float64()),
                              ("accuracy", pa.int64())):
        fields[name] = _optional_number(columns[name], number_type)
    fields["line_idx"] = (pc.cast(columns["line_idx"], pa.int64()) if "line_idx" in columns
                          else pa.nulls(len(line_numbers), pa.int64()))
    fields["photo_hash"] = _photo_hashes(columns)
    fields["license"] = _SLUG_BY_LICENSE_INDEX.take(
        pc.index_in(columns["license_name"], value_set=_LICENSE_NAMES))
    fields["source"] = pc.binary_join_element_wise(
        path, pc.cast(pa.array(line_numbers, pa.int64()), pa.string()), ":")
    return pa.Table.from_arrays([fields[name] for name in YFCC_RECORD_SCHEMA.names],
                                schema=YFCC_RECORD_SCHEMA)


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
        rejects = (parts.read_rejects, parts.duplicate_rejects) | "MergeRejects" >> beam.Flatten()
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
# Kept rows leave the duplicate check in tables of at most this many rows (Parquet writes).
KEPT_TABLE_ROWS = 1 << 16
LINE_COLUMN = "line"  # the staged tables' extra column: the line number in the file


class _CandidateTables:
    """Candidate tables (and per-row candidate records) of one file, buffered, then staged by
    bucket of photo ids with their line numbers (`spill_by_bucket`)."""

    def __init__(self, path: str, staging_dir: str):
        self._path, self._staging_dir = path, staging_dir
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
        buckets = table.column("photo_id").to_numpy() % ID_BUCKETS
        for bucket, ref in spill_by_bucket(table, buckets, self._staging_dir):
            yield bucket, (self._path, ref)


class _ScanReadAndRulesFn(_ReadAndApplyRulesFn):
    """Read one file and apply the rules like `_ReadAndApplyRulesFn`, the candidates as tables
    (`CandidateTableChecker`) staged in `staging_dir`: main emits (bucket, (path, SpillRef))
    pairs for the duplicate check, the rejects and line counts as `_ReadAndApplyRulesFn`."""

    def __init__(self, compression_type: str, config: _RulesConfig, staging_dir: str):
        super().__init__(compression_type, config)
        self._staging_dir = staging_dir

    def process_element(self, readable_file):
        tables = _CandidateTables(file_path(readable_file), self._staging_dir)
        try:
            for output in read_file(readable_file, self._compression_type, self._counters,
                                    CandidateTableChecker(self._rules)):
                kind = type(output)
                if kind is CandidateRows:
                    live_counts.add("prefilter.passed", output.table.num_rows)
                    yield from tables.add(output)
                elif kind is YfccRecord:
                    yield from self._on_parsed_record(output, tables)
                else:
                    yield output
        finally:  # also when reading fails: the candidates so far go on (see read_file)
            yield from tables.drain()

    def _on_parsed_record(self, record: YfccRecord, tables: _CandidateTables):
        verdict = self._rules.check(record)
        if verdict is None:
            live_counts.add("prefilter.passed")
            return tables.add_record(record)
        return [reject(STAGE, verdict[0], str(record.photo_id), verdict[1],
                       photo_id=record.photo_id, user_nsid=record.user_nsid)]


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


class _KeepFirstRowsFn(StageDoFn):
    """Keep one row per photo id of a bucket's staged tables (lowest source); emit the kept
    rows as YFCC_RECORD_SCHEMA tables and one list of 'duplicate_photo_id' rejects, with the
    record id and detail `_KeepFirstOfPhotoFn` gives."""

    stage = STAGE

    def __init__(self):
        self._kept = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.candidates")

    def element_id(self, bucket_refs: Any) -> str:
        return f"bucket {bucket_refs[0]}"

    def process(self, bucket_refs):
        for output in super().process(bucket_refs):
            if isinstance(getattr(output, "value", None), Rejected):
                output = beam.pvalue.TaggedOutput(REJECTS_TAG, [output.value])  # an error reject
            yield output

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
        rejects = self._duplicate_rejects(table, duplicates, kept_instead)
        kept_table = table.take(pa.array(kept)).drop_columns([LINE_COLUMN])
        self._kept.inc(kept_table.num_rows)
        for start in range(0, kept_table.num_rows, KEPT_TABLE_ROWS):
            yield kept_table.slice(start, KEPT_TABLE_ROWS)
        if rejects:
            yield beam.pvalue.TaggedOutput(REJECTS_TAG, rejects)

    @staticmethod
    def _duplicate_rejects(table: pa.Table, duplicates: np.ndarray,
                           kept_instead: np.ndarray) -> list[Rejected]:
        if not len(duplicates):
            return []
        columns = table.select(["photo_id", "source", "user_nsid"])
        duplicate_rows = columns.take(pa.array(duplicates)).to_pylist()
        kept_rows = columns.take(pa.array(kept_instead)).to_pylist()
        return [reject(STAGE, "duplicate_photo_id", str(kept["photo_id"]),
                       f"{duplicate['source']} repeats {kept['source']}",
                       photo_id=kept["photo_id"], user_nsid=duplicate["user_nsid"]).value
                for duplicate, kept in zip(duplicate_rows, kept_rows)]


class ScanReadAndPrefilter(ReadAndPrefilter):
    """`ReadAndPrefilterParts` for the full scan: the same candidates, rejects and line counts,
    the candidates as YFCC_RECORD_SCHEMA tables (main) instead of lists of records, staged
    under `staging_dir` during the duplicate check (the caller removes it after the run); the
    rejects in lists."""

    def __init__(self, patterns: Union[str, Sequence[str]], licenses: Iterable[str] = FDH_LICENSES,
                 opt_out_paths: Iterable[str] = (), drop_tags: Iterable[str] = DEFAULT_DROP_TAGS,
                 *, staging_dir: str, **read_options: Any):
        super().__init__(patterns, licenses, opt_out_paths, drop_tags, staging_dir=staging_dir,
                         **read_options)

    def expand(self, pbegin: beam.pvalue.PBegin) -> PrefilterParts:
        read = (
            self._matched_files(pbegin)
            | "ReadLines" >> beam.ParDo(_ScanReadAndRulesFn(self._compression_type, self._config,
                                                            self._staging_dir))
            .with_output_types(Any).with_outputs(REJECTS_TAG, LINE_COUNTS_TAG, main="main"))
        unique = (read.main | "GroupIdBucket" >> beam.GroupByKey()
                  | "KeepFirst" >> beam.ParDo(_KeepFirstRowsFn())
                  .with_output_types(pa.Table).with_outputs(REJECTS_TAG, main="main"))
        return PrefilterParts(unique.main, read[REJECTS_TAG], unique[REJECTS_TAG],
                              read[LINE_COUNTS_TAG])
