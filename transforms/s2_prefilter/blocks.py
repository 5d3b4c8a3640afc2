"""The prefilter on whole blocks of lines, in Arrow: the rules' verdicts per simple row
(`block_verdicts`), `BlockChecker` (rules + per-row parser for the rest) and, for the scan,
`CandidateTableChecker` (the candidates as a YFCC_RECORD_SCHEMA table, URL-decoded in numpy)."""
from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter
from typing import Any, NamedTuple, Optional, Union
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

from transforms.records import LICENSES, METRICS_NAMESPACE, YfccRecord
from transforms.rejects import reject, reject_table
from transforms.s1_read import as_output, parse_block_per_row, parse_numbered_line, split_block
from transforms.s2_prefilter.rules import STAGE, PrefilterRules
from transforms.tags import find_tag
from transforms.yfcc_format import (NULL_DATE, YFCC_RECORD_SCHEMA, decode_nsid, decode_tags,
                                    decode_text)

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


class RejectRows(NamedTuple):
    """The rejects of a block's simple rows as one REJECTS_SCHEMA table."""

    table: pa.Table


class CandidateTableChecker(BlockChecker):
    """A `BlockChecker` for the full scan: the simple candidates of a block come out as one
    `CandidateRows` (built column by column, `candidate_table`), the simple rejects as one
    `RejectRows`; other lines go through the per-row parser (YfccRecords, for the DoFn to apply
    the rules, and rejects)."""

    all_columns = True

    def __init__(self, rules: PrefilterRules):
        super().__init__(rules, keep_records=False)

    def _rejects(self, rejected: np.ndarray, columns: dict[str, pa.Array],
                 verdicts: np.ndarray) -> list:
        """The rejects of the simple rows `rejected` as one `RejectRows` (the rows
        `BlockChecker._rejects` gives, built column by column), counted once per reason."""
        if not len(rejected):
            return []
        chosen = pa.array(rejected)
        codes = verdicts[rejected]
        for code, count in zip(*np.unique(codes, return_counts=True)):
            Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.{BLOCK_REASONS[code]}").inc(int(count))
        photo_ids = columns["photo_id"].take(chosen)
        return [RejectRows(reject_table(
            STAGE, _REASON_NAMES.take(pa.array(codes)), pc.cast(photo_ids, pa.string()),
            self._details(rejected, codes, columns), photo_ids,
            _decoded_text(columns["user_nsid"].take(chosen), plus_is_space=False)))]

    def _details(self, rejected: np.ndarray, codes: np.ndarray,
                 columns: dict[str, pa.Array]) -> pa.Array:
        """`verdict_detail` of each rejected simple row: the licence name when unknown, its
        slug when not allowed, the tag found, else ''."""
        names = columns["license_name"].take(pa.array(rejected)).cast(pa.string())
        slugs = _SLUG_BY_LICENSE_INDEX.take(pc.index_in(names, value_set=_LICENSE_NAMES))
        details = pc.if_else(pa.array(codes == _UNKNOWN), names, pc.if_else(
            pa.array(codes == _NOT_ALLOWED), slugs, pa.scalar("", pa.string())))
        tag_rows = np.flatnonzero(codes == _TAG)
        return _patched(details, tag_rows, [
            verdict_detail(_TAG, columns, row, self._rules) for row in rejected[tag_rows].tolist()])

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
_REASON_NAMES = pa.array([reason or "" for reason in BLOCK_REASONS], pa.string())
_NO_TAGS = pa.scalar([], pa.list_(pa.string()))
_NULL_STRING = pa.scalar(None, pa.string())


def _patched(values: pa.Array, rows: np.ndarray, replacements: Union[list, pa.Array]) -> pa.Array:
    """`values` with the values at `rows` replaced by `replacements` (in that order)."""
    if not len(rows):
        return values
    order = np.arange(len(values))
    order[rows] = len(values) + np.arange(len(rows))
    replacements = (replacements.cast(values.type) if isinstance(replacements, pa.Array)
                    else pa.array(replacements, values.type))
    return pa.concat_arrays([values, replacements]).take(pa.array(order))


def _per_value(column: pa.Array, rows: np.ndarray, function) -> list:
    return [function(value) for value in column.take(pa.array(rows, pa.int64())).to_pylist()]


def _escaped_rows(column: pa.Array) -> np.ndarray:
    return np.flatnonzero(_flags(pc.match_substring(column, "%")))


# Value of each byte as a hex digit, -1 for other bytes.
_HEX_VALUE = np.full(256, -1, dtype=np.int16)
for _digit in "0123456789abcdefABCDEF":
    _HEX_VALUE[ord(_digit)] = int(_digit, 16)


def _string_parts(column: pa.Array) -> tuple[bytes, np.ndarray]:
    """The value bytes and the offsets (from 0) of a string array without nulls."""
    offsets = np.frombuffer(column.buffers()[1], np.int32)[
        column.offset:column.offset + len(column) + 1].astype(np.int64)
    data = column.buffers()[2]
    data = data[offsets[0]:offsets[-1]].to_pybytes() if data is not None else b""
    return data, offsets - offsets[0]


_PLUS_TO_SPACE = bytes.maketrans(b"+", b" ")
_REMOVED = 0xFF  # never in UTF-8 text: marks the digits of decoded escapes for bytes.translate


def _url_decoded(column: pa.Array, plus_rows: Optional[np.ndarray] = None) -> Optional[pa.Array]:
    """`_unquote_plus` of every value, vectorised over the bytes: each '%XX' (two hex digits,
    inside the value) becomes its byte, other '%' stay, '+' becomes a space (only in
    `plus_rows` when given). None when a decoded value is not UTF-8 (the caller then decodes
    value by value, with replacement)."""
    column = column.cast(pa.string()) if column.type != pa.string() else column
    if column.null_count or not len(column):
        return None
    raw, offsets = _string_parts(column)
    if plus_rows is None:
        data = np.frombuffer(bytearray(raw.translate(_PLUS_TO_SPACE)), np.uint8)
    else:
        data = np.frombuffer(bytearray(raw), np.uint8)
        plus = np.flatnonzero(data == 0x2B)
        data[plus[plus_rows[np.searchsorted(offsets, plus, side="right") - 1]]] = 0x20
    escapes = np.flatnonzero(data == 0x25)
    value_ends = np.zeros(len(data) + 2, dtype=bool)  # a value's last byte, and past the data
    value_ends[offsets[1:][offsets[1:] > offsets[:-1]] - 1] = True
    value_ends[len(data):] = True
    escapes = escapes[~(value_ends[escapes] | value_ends[escapes + 1])]  # two bytes follow
    high, low = _HEX_VALUE[data[escapes + 1]], _HEX_VALUE[data[escapes + 2]]
    valid = (high >= 0) & (low >= 0)
    escapes, decoded = escapes[valid], (high[valid] * 16 + low[valid]).astype(np.uint8)
    if (decoded == _REMOVED).any():  # not UTF-8, and would be taken for a removed digit
        return None
    data[escapes] = decoded
    data[escapes + 1] = data[escapes + 2] = _REMOVED
    new_offsets = offsets - 2 * np.searchsorted(escapes, offsets, side="left")
    result = pa.Array.from_buffers(pa.string(), len(column), [
        None, pa.py_buffer(new_offsets.astype(np.int32)),
        pa.py_buffer(data.tobytes().translate(None, bytes([_REMOVED])) if len(escapes) else data)])
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


def _md5_hashes(urls: pa.Array, rows: np.ndarray) -> pa.Array:
    """`photo_hash` of the download URLs at `rows`: the md5 of each value's bytes (sliced from
    the Arrow buffer), the unpadded hex of all digests formatted at once with numpy."""
    blob, offsets = _string_parts(urls.take(pa.array(rows, pa.int64())).cast(pa.string()))
    bounds, md5 = offsets.tolist(), hashlib.md5
    digests = np.frombuffer(b"".join([md5(blob[start:end]).digest()
                                      for start, end in zip(bounds, bounds[1:])]),
                            np.uint8).reshape(-1, 16)
    nibbles = np.empty((len(digests), 32), np.uint8)
    nibbles[:, 0::2], nibbles[:, 1::2] = digests >> 4, digests & 15
    keep = np.ones(nibbles.shape, dtype=bool)
    keep[:, 0::2] = nibbles[:, 0::2] != 0  # '%x' drops a byte's leading zero nibble
    ends = np.cumsum(keep.sum(axis=1, dtype=np.int32), dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), len(digests), [
        None, pa.py_buffer(np.concatenate([np.zeros(1, np.int32), ends])),
        pa.py_buffer(_HEX_DIGITS[nibbles[keep]])])


def _photo_hashes(columns: dict[str, pa.Array]) -> pa.Array:
    """The photo_hash column as `parse_line` gives it: the hash column in lower case (25
    columns), else or when empty the md5 of the download URL (`photo_hash`)."""
    urls = columns["download_url"]
    if "photo_hash" not in columns:
        return _md5_hashes(urls, np.arange(len(urls)))
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
