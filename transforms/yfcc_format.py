"""The YFCC100M metadata line format: parse one line into a `YfccRecord`, or say why not.

Pure Python (no Beam) so that it is unit-testable and fast: a line is split on TAB (never the
`csv` module: descriptions reach ~90k characters), the free-text fields are URL-decoded with
`unquote_plus` as UTF-8 with replacement, and numbers are checked. Two layouts ship as
`yfcc100m_dataset` (design.md section 3) and we branch on the field count:

* 23 columns: photo id, then the 22 data columns below (the 2014 split files, the mirror copy);
* 25 columns: 0-based line number, photo id, hash, then the same 22 columns.

`format_line` writes a line back from a record (tests, the demo), and `record_to_row` /
`records_to_table` + `YFCC_RECORD_SCHEMA` give the Parquet form of records.
"""
from __future__ import annotations

import hashlib
import operator
from math import isfinite
from codecs import escape_decode
from typing import Any, NamedTuple, Optional, Sequence, Union
from urllib.parse import quote_plus, unquote_plus

import pyarrow as pa

from transforms.records import LICENSES, YfccRecord

# The 22 columns after the photo id (and after the hash in the 25-column layout), in file order.
DATA_COLUMNS = (
    "user_nsid", "user_nickname", "date_taken", "date_uploaded", "capture_device", "title",
    "description", "user_tags", "machine_tags", "longitude", "latitude", "accuracy", "page_url",
    "download_url", "license_name", "license_url", "server_id", "farm_id", "secret",
    "secret_original", "original_extension", "marker",
)
COLUMNS_23 = ("photo_id",) + DATA_COLUMNS
COLUMNS_25 = ("line_idx", "photo_id", "photo_hash") + DATA_COLUMNS
NULL_DATE = "null"
INT64_MAX = (1 << 63) - 1

# The YFCC hash prints each of the 16 md5 bytes as '%x', without zero padding: one format
# operation over the digest's bytes (2x faster than joining per-byte strings).
_HEX_NO_PAD_16 = "%x" * 16


class LineError(NamedTuple):
    """Why a line could not be parsed: a machine reason ('bad_field_count', ...) and a detail."""

    reason: str
    detail: str


def photo_hash(download_url: str) -> str:
    """YFCC's hash column: md5 of the download URL as written, each byte as '%x' (no padding)."""
    return _HEX_NO_PAD_16 % tuple(hashlib.md5(download_url.encode("utf-8")).digest())


def license_slug(license_name: str) -> Optional[str]:
    """The FDH subset slug ('cc-by-2', ...) of a YFCC licence name; None when it is not CC."""
    entry = LICENSES.get(license_name)
    return entry[0] if entry else None


def _unquote_plus(value: str) -> str:
    """`unquote_plus` in C: '%XX' becomes '\\xXX' for `codecs.escape_decode` (other backslashes
    doubled first), then the bytes decode as UTF-8 with replacement. About 7x faster than
    `urllib.parse.unquote_plus` on escape-heavy YFCC descriptions; broken escapes ('%zz', a
    trailing '%4') fall back to it, which keeps them literally."""
    try:
        raw = escape_decode(
            value.replace("\\", "\\\\").replace("%", "\\x").replace("+", " ").encode("utf-8"))[0]
    except ValueError:
        return unquote_plus(value, encoding="utf-8", errors="replace")
    return raw.decode("utf-8", "replace")


def decode_text(value: str) -> str:
    """URL-decode a free-text field ('+' is a space) as UTF-8; broken escapes never raise."""
    if "%" in value or "+" in value:
        return _unquote_plus(value)
    return value


def decode_nsid(value: str) -> str:
    """The user NSID column as read: %-decoded only when it holds a '%' ('+' stays)."""
    return value if "%" not in value else _unquote_plus(value)


def decode_tags(value: str) -> tuple[str, ...]:
    """Split a comma-separated tag field, then decode each tag (an encoded comma stays inside)."""
    if not value:
        return ()
    if "%" not in value and "+" not in value:
        return tuple(value.split(","))
    if "%2C" in value or "%2c" in value:  # an encoded comma inside a tag: decode tag by tag
        return tuple(_unquote_plus(tag) for tag in value.split(","))
    return tuple(_unquote_plus(value).split(","))


def _int(value: str) -> int:
    # int() also takes ' 1', '+1', '1_0' and non-ASCII digits; a YFCC number is ASCII digits.
    if not (value.isdigit() and value.isascii()):
        raise ValueError(f"not a non-negative integer: {value[:40]!r}")
    number = int(value)
    if number > INT64_MAX:  # the Parquet columns are int64
        raise ValueError(f"out of the int64 range: {value[:40]!r}")
    return number


def _record_builder():
    """The fastest correct way to build a YfccRecord from a dict of all its fields.

    A frozen dataclass's __init__ sets each of the 27 fields through object.__setattr__ (~3 us,
    a third of the per-line budget); filling the instance __dict__ is equivalent as long as the
    class has no __post_init__ and no __slots__ (checked here; tests compare both ways).
    """
    if hasattr(YfccRecord, "__post_init__") or "__slots__" in YfccRecord.__dict__:
        return lambda fields: YfccRecord(**fields)
    new = object.__new__

    def build(fields: dict) -> YfccRecord:
        record = new(YfccRecord)
        record.__dict__.update(fields)
        return record

    return build


# Build a YfccRecord from a dict of all its fields (also used by the Beam coder).
build_record = _record_builder()


def parse_line(line: str, source: str = "") -> Union[YfccRecord, LineError]:
    """Parse one metadata line (no trailing newline) into a `YfccRecord`, or a `LineError`.

    `source` ('file:line') is stored on the record. Never raises on bad data.
    """
    fields = line.split("\t")
    count = len(fields)
    if count == 23:
        line_idx_text = hash_text = None
        photo_id_text = fields[0]
        data = fields[1:]
    elif count == 25:
        line_idx_text, photo_id_text, hash_text = fields[0], fields[1], fields[2]
        data = fields[3:]
    else:
        return LineError("bad_field_count", f"{count} fields, expected 23 or 25")
    (user_nsid, nickname, date_taken, date_uploaded, device, title, description, user_tags,
     machine_tags, longitude, latitude, accuracy, page_url, download_url, license_name,
     license_url, server_id, farm_id, secret, secret_original, extension, marker) = data

    if not (photo_id_text.isdigit() and photo_id_text.isascii()
            and int(photo_id_text) <= INT64_MAX):
        return LineError("bad_photo_id", f"photo id {photo_id_text[:40]!r}")
    column = "line_idx"
    try:
        line_idx = None if line_idx_text is None else _int(line_idx_text)
        column = "date_uploaded"
        uploaded = _int(date_uploaded)
        column = "marker"
        marker_value = _int(marker)
        if marker_value > 1:
            raise ValueError(f"{marker_value} is neither 0 (photo) nor 1 (video)")
        column = "longitude"
        lon = lat = None
        if longitude:
            lon = float(longitude)
            if not isfinite(lon):
                raise ValueError(f"not finite: {longitude[:40]!r}")
        column = "latitude"
        if latitude:
            lat = float(latitude)
            if not isfinite(lat):
                raise ValueError(f"not finite: {latitude[:40]!r}")
        column = "accuracy"
        acc = _int(accuracy) if accuracy else None
    except ValueError as error:
        return LineError("bad_number", f"{column}: {error}")

    # Decode the six free-text fields in one call: TAB cannot occur inside a raw field, so it
    # separates them unless one encodes a TAB itself (%09), which falls back to field by field.
    text = "\t".join((nickname, device, title, description, user_tags, machine_tags))
    if "%" not in text and "+" not in text:
        decoded = (nickname, device, title, description, user_tags, machine_tags)
    elif "%09" not in text:
        decoded = _unquote_plus(text).split("\t")
    else:
        decoded = tuple(map(decode_text, (nickname, device, title, description))) + (None, None)
    # Tags split on the raw commas: an encoded comma (%2C) inside a tag needs tag-by-tag decoding.
    user_tags_decoded, machine_tags_decoded = decoded[4], decoded[5]
    if user_tags_decoded is None or "%2C" in user_tags or "%2c" in user_tags:
        user_tags_value = decode_tags(user_tags)
    else:
        user_tags_value = tuple(user_tags_decoded.split(",")) if user_tags_decoded else ()
    if machine_tags_decoded is None or "%2C" in machine_tags or "%2c" in machine_tags:
        machine_tags_value = decode_tags(machine_tags)
    else:
        machine_tags_value = tuple(machine_tags_decoded.split(",")) if machine_tags_decoded else ()

    if not date_taken or date_taken == NULL_DATE:
        date_taken = None
    elif "%" in date_taken or "+" in date_taken:
        date_taken = _unquote_plus(date_taken)
    if license_name not in LICENSES:
        license_name = decode_text(license_name)
    license_entry = LICENSES.get(license_name)
    return build_record({
        "photo_id": int(photo_id_text),
        "photo_hash": hash_text.lower() if hash_text else photo_hash(download_url),
        "user_nsid": decode_nsid(user_nsid),
        "user_nickname": decoded[0],
        "date_taken": date_taken,
        "date_uploaded": uploaded,
        "capture_device": decoded[1],
        "title": decoded[2],
        "description": decoded[3],
        "user_tags": user_tags_value,
        "machine_tags": machine_tags_value,
        "longitude": lon,
        "latitude": lat,
        "accuracy": acc,
        "page_url": page_url,
        "download_url": download_url,
        "license_name": license_name,
        "license_url": license_url,
        "license": license_entry[0] if license_entry else None,
        "server_id": server_id,
        "farm_id": farm_id,
        "secret": secret,
        "secret_original": secret_original,
        "original_extension": extension,
        "marker": marker_value,
        "line_idx": line_idx,
        "source": source,
    })


def _encode_text(value: str) -> str:
    return quote_plus(value, safe="", encoding="utf-8")


def _format_float(value: Optional[float]) -> str:
    return "" if value is None else repr(float(value))


def _encode_nsid(nsid: str) -> str:
    """The NSID column as `parse_line` reads it back: as it is, unless it holds '%' or a TAB/line
    break (then %-encoded; the parser decodes a column holding '%')."""
    if "%" in nsid or "\t" in nsid or "\n" in nsid or "\r" in nsid:
        return quote_plus(nsid, safe="@")
    return nsid


def format_line(record: YfccRecord, columns: int = 23) -> str:
    """Write `record` as a YFCC line (no newline) in the 23- or 25-column layout.

    Free text is encoded like YFCC (`quote_plus`, '+' for space); the inverse of `parse_line`.
    """
    if columns not in (23, 25):
        raise ValueError(f"columns must be 23 or 25, got {columns}")
    data = [
        _encode_nsid(record.user_nsid),
        _encode_text(record.user_nickname),
        NULL_DATE if record.date_taken is None else record.date_taken,
        str(record.date_uploaded),
        _encode_text(record.capture_device),
        _encode_text(record.title),
        _encode_text(record.description),
        ",".join(_encode_text(tag) for tag in record.user_tags),
        ",".join(_encode_text(tag) for tag in record.machine_tags),
        _format_float(record.longitude),
        _format_float(record.latitude),
        "" if record.accuracy is None else str(record.accuracy),
        record.page_url,
        record.download_url,
        record.license_name,
        record.license_url,
        record.server_id,
        record.farm_id,
        record.secret,
        record.secret_original,
        record.original_extension,
        str(record.marker),
    ]
    if columns == 23:
        head = [str(record.photo_id)]
    else:
        line_idx = record.line_idx if record.line_idx is not None else 0
        head = [str(line_idx), str(record.photo_id), record.photo_hash]
    return "\t".join(head + data)


# Parquet form of a YfccRecord: one column per field, tags as list<string>.
YFCC_RECORD_SCHEMA = pa.schema([
    ("photo_id", pa.int64()),
    ("photo_hash", pa.string()),
    ("user_nsid", pa.string()),
    ("user_nickname", pa.string()),
    ("date_taken", pa.string()),
    ("date_uploaded", pa.int64()),
    ("capture_device", pa.string()),
    ("title", pa.string()),
    ("description", pa.string()),
    ("user_tags", pa.list_(pa.string())),
    ("machine_tags", pa.list_(pa.string())),
    ("longitude", pa.float64()),
    ("latitude", pa.float64()),
    ("accuracy", pa.int64()),
    ("page_url", pa.string()),
    ("download_url", pa.string()),
    ("license_name", pa.string()),
    ("license_url", pa.string()),
    ("license", pa.string()),
    ("server_id", pa.string()),
    ("farm_id", pa.string()),
    ("secret", pa.string()),
    ("secret_original", pa.string()),
    ("original_extension", pa.string()),
    ("marker", pa.int64()),
    ("line_idx", pa.int64()),
    ("source", pa.string()),
])


_SCHEMA_VALUES = operator.attrgetter(*YFCC_RECORD_SCHEMA.names)


def records_to_table(records: Sequence[YfccRecord]) -> pa.Table:
    """A `YFCC_RECORD_SCHEMA` table of `records`, built column by column (faster than rows)."""
    rows = [_SCHEMA_VALUES(record) for record in records]
    columns = zip(*rows) if rows else [[] for _ in YFCC_RECORD_SCHEMA]
    return pa.Table.from_arrays(
        [pa.array(values, type=field.type) for values, field in zip(columns, YFCC_RECORD_SCHEMA)],
        schema=YFCC_RECORD_SCHEMA)


def record_to_row(record: YfccRecord) -> dict[str, Any]:
    """A dict for `YFCC_RECORD_SCHEMA` (tags as lists)."""
    row = dict(record.__dict__)
    row["user_tags"] = list(record.user_tags)
    row["machine_tags"] = list(record.machine_tags)
    return row
