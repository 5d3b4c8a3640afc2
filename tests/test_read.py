"""Stage 1 (read): the line parser on its own, then ReadYfcc on real plain/gz/bz2 files."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import pickle
from urllib.parse import unquote_plus

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings, strategies as st

from beam_jobs.common import make_pipeline
from tests.factories import make_record, yfcc_hash
from tests.yfcc_lines import random_records, record_line, write_lines
from transforms.records import LICENSES, YfccRecord
from transforms.s1_read import ReadYfcc, YfccRecordCoder, iter_lines, parse_numbered_lines
from transforms.yfcc_format import (YFCC_RECORD_SCHEMA, LineError, decode_text, format_line,
                                    license_slug, parse_line, photo_hash, record_to_row,
                                    records_to_table)


def _expected(record: YfccRecord, columns: int, source: str = "") -> YfccRecord:
    """What parsing `format_line(record, columns)` must give back."""
    return dataclasses.replace(record, source=source,
                               line_idx=record.line_idx if columns == 25 else None)


# ---- the pure line parser -------------------------------------------------------------------

@pytest.mark.parametrize("columns", [23, 25])
def test_parse_round_trips_every_field(columns):
    record = make_record(
        4242, user_nickname="Zoë & co", title="Été 100% <b>fun</b>",
        description="line one\nline two\ttabbed, commas + plus \\x41 back\\slash",
        user_tags=("new york", "a,b", "ünïcode", "no_cv"), machine_tags=("geo:lat=1.5",),
        longitude=-73.98, latitude=40.75, accuracy=16, capture_device="Canon EOS 5D")
    parsed = parse_line(format_line(record, columns), "f.txt:7")
    assert parsed == _expected(record, columns, "f.txt:7")


def test_parse_random_records_round_trip():
    for record in random_records(300, seed=3):
        assert parse_line(format_line(record, 25), "s:1") == _expected(record, 25, "s:1")


def test_fast_record_build_equals_dataclass_constructor():
    parsed = parse_line(record_line(7, 25), "x:1")
    built = YfccRecord(**dataclasses.asdict(parsed))
    assert parsed == built and hash(parsed) == hash(built)
    assert pickle.loads(pickle.dumps(parsed)) == parsed
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.photo_id = 1  # type: ignore[misc]


def test_record_coder_round_trips_and_is_deterministic():
    coder = YfccRecordCoder()
    for record in list(random_records(50, seed=5)) + [parse_line(record_line(1, 23), "a:1")]:
        encoded = coder.encode(record)
        assert coder.decode(encoded) == record and coder.encode(coder.decode(encoded)) == encoded
    assert coder.is_deterministic()
    assert beam.coders.registry.get_coder(YfccRecord) == coder


def test_photo_hash_prints_bytes_without_zero_padding():
    for index in range(200):
        url = f"http://farm1.staticflickr.com/2/{index}_abc.jpg"
        digest = hashlib.md5(url.encode()).digest()
        assert photo_hash(url) == "".join("%x" % byte for byte in digest) == yfcc_hash(url)
    # Some byte below 0x10 gives a hash shorter than 32 hex characters.
    assert any(len(photo_hash(f"http://x/{i}.jpg")) < 32 for i in range(50))


def test_hash_column_is_kept_in_25_column_layout_and_computed_in_23():
    line25 = record_line(9, 25, photo_hash="ABCDEF")
    assert parse_line(line25).photo_hash == "abcdef"
    record = parse_line(record_line(9, 23))
    assert record.photo_hash == photo_hash(record.download_url)
    assert record.line_idx is None and parse_line(record_line(9, 25)).line_idx == 9


@pytest.mark.parametrize("name", list(LICENSES))
def test_each_licence_maps_to_its_slug(name):
    slug, url = LICENSES[name]
    parsed = parse_line(record_line(1, license_name=name, license_url=url))
    assert (parsed.license, parsed.license_name, parsed.license_url) == (slug, name, url)
    assert license_slug(name) == slug


def test_encoded_and_unknown_licence_names():
    assert parse_line(record_line(1, license_name="Attribution+License")).license == "cc-by-2"
    unknown = parse_line(record_line(1, license_name="All Rights Reserved"))
    assert unknown.license is None and unknown.license_name == "All Rights Reserved"


def test_null_date_and_empty_geo_fields():
    parsed = parse_line(record_line(5, date_taken=None, longitude=None, latitude=None,
                                    accuracy=None))
    assert "\tnull\t" in record_line(5, date_taken=None)
    assert (parsed.date_taken, parsed.longitude, parsed.latitude, parsed.accuracy) == (
        None, None, None, None)


def test_hundred_thousand_character_description():
    description = "Caf\u00e9 <p>" * 16_667  # 100k characters, 200k+ once encoded
    parsed = parse_line(record_line(6, description=description))
    assert parsed.description == description and len(parsed.description) >= 100_000


def _with_field(column: int, value: str, columns: int = 23) -> str:
    fields = record_line(3, columns).split("\t")
    fields[column] = value
    return "\t".join(fields)


@pytest.mark.parametrize("fields", [1, 5, 22, 24, 26, 40])
def test_wrong_field_count_is_rejected(fields):
    line = "\t".join(record_line(3, 25).split("\t")[:fields] + ["x"] * max(0, fields - 25))
    assert parse_line(line) == LineError("bad_field_count", f"{fields} fields, expected 23 or 25")


@pytest.mark.parametrize("photo_id", ["", "12a", "-3", "+3", " 3", "1_000", "\u0661\u0662", "3.0"])
def test_non_numeric_photo_id_is_rejected(photo_id):
    result = parse_line(_with_field(0, photo_id))
    assert isinstance(result, LineError) and result.reason == "bad_photo_id"


@pytest.mark.parametrize("column,value,name", [
    (4, "yesterday", "date_uploaded"), (4, "", "date_uploaded"), (22, "x", "marker"),
    (22, "2", "marker"), (10, "east", "longitude"), (11, "nan", "latitude"),
    (10, "inf", "longitude"), (12, "1.5", "accuracy"),
])
def test_bad_numbers_are_rejected(column, value, name):
    result = parse_line(_with_field(column, value))
    assert isinstance(result, LineError) and result.reason == "bad_number"
    assert result.detail.startswith(name)


def test_bad_line_number_in_25_column_layout():
    result = parse_line(_with_field(0, "L12", columns=25))
    assert result.reason == "bad_number" and result.detail.startswith("line_idx")


@pytest.mark.parametrize("raw,expected", [
    ("100%", "100%"), ("%zz+ok", "%zz ok"), ("end%4", "end%4"), ("%ff%fe", "\ufffd\ufffd"),
    ("%E2%82", "\ufffd"), ("a+b%2Bc", "a b+c"), ("back\\slash%20\\x41", "back\\slash \\x41"),
    ("%\\\\", "%\\\\"), ("caf%C3%A9", "café"),
])
def test_bad_and_tricky_percent_encoding_never_raises(raw, expected):
    assert decode_text(raw) == expected == unquote_plus(raw, errors="replace")
    fields = record_line(1).split("\t")
    fields[6] = raw  # title
    assert parse_line("\t".join(fields)).title == expected


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="%+\\x0123456789abcdefABCDEF\t,é日 ", max_size=40))
def test_fast_decoder_matches_urllib(text):
    assert decode_text(text) == unquote_plus(text, encoding="utf-8", errors="replace")


def test_encoded_tab_and_comma_inside_fields():
    record = make_record(8, title="a\tb", description="c\td", user_tags=("x,y", "z\tw", "v"),
                         machine_tags=("m,n",))
    assert parse_line(format_line(record)) == _expected(record, 23)


def test_records_to_table_equals_the_rows_of_record_to_row():
    records = list(random_records(60, seed=4)) + [make_record(2, longitude=None, accuracy=None,
                                                               date_taken=None, user_tags=())]
    table = records_to_table(records)
    assert table.schema == YFCC_RECORD_SCHEMA
    assert table.to_pylist() == [record_to_row(record) for record in records]
    assert records_to_table([]).num_rows == 0


def test_record_to_row_has_tags_as_lists():
    row = record_to_row(make_record(1, user_tags=("a", "b")))
    assert row["user_tags"] == ["a", "b"] and row["machine_tags"] == []
    assert set(row) == {f.name for f in dataclasses.fields(YfccRecord)}


# ---- streaming lines out of a file ------------------------------------------------------------

def test_iter_lines_across_chunk_boundaries_and_line_endings():
    data = b"alpha\r\nbeta\n\ngamma" + b"x" * 50 + b"\nlast"
    assert list(iter_lines(io.BytesIO(data), chunk_bytes=3)) == [
        b"alpha", b"beta", b"", b"gamma" + b"x" * 50, b"last"]
    assert list(iter_lines(io.BytesIO(b"one\n"))) == [b"one"]
    assert list(iter_lines(io.BytesIO(b""))) == []


def test_parse_numbered_lines_counts_blank_lines_and_decodes_non_utf8():
    title_bytes = b"Caf\xe9 \xff"  # latin-1, not UTF-8
    fields = record_line(2).encode().split(b"\t")
    fields[6] = title_bytes
    items = list(parse_numbered_lines([record_line(1).encode(), b"", b"\t".join(fields), b"  "],
                                      "f.txt"))
    assert [getattr(item, "reason", None) for item in items] == [
        None, "blank_line", None, "blank_line"]
    assert items[1].record_id == "f.txt:2" and items[3].record_id == "f.txt:4"
    assert items[2].title == "Caf\ufffd \ufffd" and items[2].source == "f.txt:3"


# ---- ReadYfcc on real files -----------------------------------------------------------------

@pytest.mark.pipeline
def test_read_plain_gz_bz2_and_globs(tmp_path):
    bad = record_line(99).replace("\t1377635391\t", "\tsoon\t")
    write_lines(tmp_path / "part-0.txt", [record_line(1, title="plain"), "", record_line(2)])
    write_lines(tmp_path / "part-1.txt.gz", [record_line(3, 25, title="g z"), bad,
                                             "short\tline"])
    write_lines(tmp_path / "part-2.bz2", [record_line(4, 25), record_line(5)],
                final_newline=False)
    write_lines(tmp_path / "other.csv", [record_line(6)])
    with make_pipeline(PipelineOptions([])) as pipeline:
        # The first glob also matches part-0.txt: it must be read once.
        out = pipeline | ReadYfcc([str(tmp_path / "part-*"), str(tmp_path / "part-0.txt")])
        assert_that(out.main | "Key" >> beam.Map(
            lambda r: (r.photo_id, r.source.rsplit("/", 1)[-1], r.line_idx, r.title)),
            equal_to([(1, "part-0.txt:1", None, "plain"), (2, "part-0.txt:3", None, "A title"),
                      (3, "part-1.txt.gz:1", 3, "g z"), (4, "part-2.bz2:1", 4, "A title"),
                      (5, "part-2.bz2:2", None, "A title")]), label="records")
        assert_that(out.rejects | "RKey" >> beam.Map(
            lambda r: (r.stage, r.reason, r.record_id.rsplit("/", 1)[-1])),
            equal_to([("read", "blank_line", "part-0.txt:2"),
                      ("read", "bad_number", "part-1.txt.gz:2"),
                      ("read", "bad_field_count", "part-1.txt.gz:3")]), label="rejects")
        assert_that(out.line_counts | "CKey" >> beam.Map(
            lambda kv: (kv[0].rsplit("/", 1)[-1], kv[1])),
            equal_to([("part-0.txt", 3), ("part-1.txt.gz", 3), ("part-2.bz2", 2)]),
            label="line_counts")


@pytest.mark.pipeline
def test_read_missing_file_fails_when_the_pipeline_is_built(tmp_path):
    pipeline = make_pipeline(PipelineOptions([]))
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        _ = pipeline | ReadYfcc([str(tmp_path / "nothing-here*.bz2")])
    with pytest.raises(ValueError):
        ReadYfcc([])


# ------------------------------------------------------------------------------------------
# Finding 1: a truncated or corrupt compressed file is never read as a shorter good one


def _damaged(data: bytes, how: str) -> bytes:
    """`data` cut at 60 %, cut in half, without its last 8 bytes, or with a flipped CRC byte."""
    if how == "cut_60":
        return data[: len(data) * 6 // 10]
    if how == "cut_half":
        return data[: len(data) // 2]
    if how == "no_trailer":
        return data[:-8]
    flipped = bytearray(data)
    flipped[-8] ^= 0xFF  # gzip: first byte of the CRC-32; bz2: inside the stream CRC / padding
    return bytes(flipped)


@pytest.mark.parametrize("suffix,how", [(".gz", "cut_60"), (".gz", "cut_half"), (".gz", "no_trailer"),
                                        (".gz", "bad_crc"), (".bz2", "cut_60"), (".bz2", "cut_half")])
def test_truncated_or_corrupt_compressed_file_is_a_file_reject_that_breaks_accounting(
        tmp_path, suffix, how):
    path = write_lines(tmp_path / f"part{suffix}", [record_line(i, 25) for i in range(1, 1500)])
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(_damaged(data, how))
    with beam.Pipeline() as pipeline:
        out = pipeline | ReadYfcc(path)
        file_rejects = (out.rejects | beam.Filter(lambda r: r.record_id == path)
                        | beam.Map(lambda r: (r.stage, r.reason, path in r.detail)))
        expected = "truncated_input" if how != "bad_crc" else "corrupt_input"
        assert_that(file_rejects, equal_to([("read", expected, True)]), label="file_reject")
        rejected = out.rejects | "CountR" >> beam.combiners.Count.Globally()
        kept = out.main | "CountK" >> beam.combiners.Count.Globally()
        lines = out.line_counts | beam.Map(lambda pair: pair[1])
        # lines_read = kept + rejected no longer holds: the file reject is one more.
        surplus = (lines | beam.Map(lambda n, k, r: k + r - n, beam.pvalue.AsSingleton(kept),
                                    beam.pvalue.AsSingleton(rejected)))
        assert_that(surplus, equal_to([1]), label="accounting_off_by_the_file")


def test_intact_gz_and_multi_member_gz_read_every_line(tmp_path):
    first = gzip.compress(("\n".join(record_line(i, 25) for i in range(1, 4)) + "\n").encode())
    second = gzip.compress(("\n".join(record_line(i, 25) for i in range(4, 6)) + "\n").encode())
    path = tmp_path / "multi.gz"
    path.write_bytes(first + second)
    with beam.Pipeline() as pipeline:
        out = pipeline | ReadYfcc(str(path))
        assert_that(out.main | beam.Map(lambda r: r.photo_id), equal_to([1, 2, 3, 4, 5]))
        assert_that(out.rejects, equal_to([]), label="no_rejects")
