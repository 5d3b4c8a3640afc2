"""The block (Arrow) read + prefilter gives what the per-row parser + rules give, line for line."""
from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest

from beam_jobs import scan
from tests.yfcc_lines import random_records, record_line, write_lines
from transforms.opt_out import OptOut
from transforms.records import Rejected, YfccRecord
from transforms.s1_read import iter_blocks, parse_block_per_row, parse_numbered_line, split_block
from transforms.s2_prefilter import (LOWERING_TO_ASCII, USABLE_LICENSE_SLUGS, VALID_LICENSE_SLUGS,
                                     BlockChecker, CandidateIds, CandidateRows,
                                     CandidateTableChecker, PrefilterRules, RejectRows,
                                     lowering_to_ascii, scan_buckets)
from transforms.yfcc_format import format_line, records_to_table

PATH = "/data/yfcc.txt"


def _nasty_lines() -> list[bytes]:
    """Lines the Arrow path must hand to the per-row parser, or judge exactly as it does."""
    good = record_line(900, user_tags=("people",))
    fields = good.split("\t")

    def with_field(index: int, value: str) -> bytes:
        changed = list(fields)
        changed[index] = value
        return "\t".join(changed).encode("utf-8")

    lines = [b"", b"   ", b"\t", b"bad\tline", (good + "\r").encode(), (good + "\r\r").encode(),
             good.replace("\t", "\r\t", 1).encode(), good.encode() + b"\xff",
             "\t".join(fields[:22]).encode(), "\t".join(fields + ["x"]).encode()]
    # Numbers: photo id, date uploaded, longitude, latitude, accuracy, marker.
    for index, values in ((0, [" 1", "+1", "1_0", "١٢", "12345678901234567890", "x"]),
                          (4, ["", "-1", "1.5"]),
                          (10, ["1e5", "nan", "inf", "-0.5", "+1.0", ".5", "1.", "-"]),
                          (11, ["-90", "1E-3", "Infinity"]), (12, ["-1", "16", "1.0"]),
                          (22, ["2", "00", "01", "1", " 0", ""])):
        lines += [with_field(index, value) for value in values]
    # Licences: encoded, unknown, not CC.
    lines += [with_field(15, value) for value in (
        "Attribution+License", "Attribution%2DNoDerivs+License", "All Rights Reserved",
        "All+Rights+Reserved", "attribution license", "",
        "Ü" + "l" * 400)]  # the reject's detail (the name) is cut at 300 characters
    # Tags in every spelling, escaped, non-ASCII, with encoded commas and tabs.
    lines += [with_field(8, value) for value in (
        "No_CV", "no+cv", "NO-CV", "nocv2", "knocv", "%6Eo_cv", "people,no%2Ccv", "n%C3%B6cv",
        "nöcv", "%4E%4F%43%56", "a,,b", "x%09no_cv", "no.cv,people", "%zz,no_cv", "ｎｏｃｖ",
        "people")]
    # Owners: opted out as written and %-encoded.
    lines += [with_field(1, value) for value in ("888@N08", "888%40N08", "999@N09", "8%")]
    lines += [with_field(0, "9"), with_field(0, "77")]
    return lines


def _all_lines() -> list[bytes]:
    records = list(random_records(600, seed=5))
    randoms = [format_line(record, 23 if record.photo_id % 3 else 25).encode()
               for record in records]
    return randoms + _nasty_lines() + randoms[:5]  # the last five repeat photo ids


RULES = [
    PrefilterRules.create(),
    PrefilterRules.create(["cc-by-2", "cc-by-nc-2"], ["people", "no_cv"],
                          OptOut(frozenset({"888@N08"}), frozenset({9}))),
    PrefilterRules.create(list(USABLE_LICENSE_SLUGS), []),
]


def _per_row(lines: list[bytes], rules: PrefilterRules) -> tuple[list, list]:
    """The reference: each line parsed, then the rules; (rejects as tuples, candidates)."""
    rejects, candidates = [], []
    for number, raw in enumerate(lines, start=1):
        item = parse_numbered_line(raw[:-1] if raw.endswith(b"\r") else raw, f"{PATH}:{number}")
        if type(item) is Rejected:
            rejects.append((item.record_id, item.stage, item.reason, item.detail, None, None))
        else:
            _apply_rules(item, rules, rejects, candidates)
    return rejects, candidates


def _apply_rules(record: YfccRecord, rules: PrefilterRules, rejects: list, candidates: list):
    """Append the record to `candidates`, or its reject (as a tuple) to `rejects`."""
    verdict = rules.check(record)
    if verdict is None:
        candidates.append(record)
    else:
        rejected = Rejected(str(record.photo_id), "prefilter", verdict[0], verdict[1],
                            record.photo_id, record.user_nsid)  # cuts a long detail
        rejects.append((rejected.record_id, rejected.stage, rejected.reason, rejected.detail,
                        rejected.photo_id, rejected.user_nsid))


def _blocks(lines: list[bytes], chunk_bytes: int) -> list[bytes]:
    import io
    return list(iter_blocks(io.BytesIO(b"\n".join(lines) + b"\n"), chunk_bytes))


def _run_checker(checker, blocks: list[bytes], rules: PrefilterRules):
    rejects, candidates, ids, reasons, lines_read = [], [], [], Counter(), 0
    for block in blocks:
        items, count, _ = checker(block, PATH, lines_read)
        lines_read += count
        for item in items:
            if type(item) is YfccRecord:
                _apply_rules(item, rules, rejects, candidates)
            elif type(item) is CandidateIds:
                ids.extend(zip(item.photo_ids.tolist(), item.line_numbers.tolist(),
                               item.license_codes.tolist()))
            elif type(item) is Counter:
                reasons.update(item)
            elif type(item) is CandidateRows:
                ids.append(item)
            elif type(item) is RejectRows:
                rejects.extend(tuple(row.values()) for row in item.table.to_pylist())
            else:
                value = item.value
                rejects.append((value.record_id, value.stage, value.reason, value.detail,
                                value.photo_id, value.user_nsid))
    return lines_read, rejects, candidates, ids, reasons


@pytest.mark.parametrize("rules", RULES, ids=["fdh", "narrow-opt-out", "all-cc"])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 4096])
def test_block_checker_equals_the_per_row_parser_and_rules(rules, chunk_bytes):
    lines = _all_lines()
    want_rejects, want_candidates = _per_row(lines, rules)
    assert len(want_candidates) > 100 and len(want_rejects) > 30  # both paths exercised
    lines_read, rejects, candidates, _, _ = _run_checker(
        BlockChecker(rules), _blocks(lines, chunk_bytes), rules)
    assert lines_read == len(lines)
    assert Counter(rejects) == Counter(want_rejects)
    key = lambda record: record.source  # noqa: E731
    assert sorted(candidates, key=key) == sorted(want_candidates, key=key)


@pytest.mark.parametrize("rules", RULES, ids=["fdh", "narrow-opt-out", "all-cc"])
def test_counts_only_checker_counts_what_the_per_row_path_keeps_and_rejects(rules):
    lines = _all_lines()
    want_rejects, want_candidates = _per_row(lines, rules)
    lines_read, rejects, candidates, ids, reasons = _run_checker(
        BlockChecker(rules, keep_records=False), _blocks(lines, 8192), rules)
    got_reasons = Counter(f"{stage}.{reason}" for _, stage, reason, *_ in rejects)
    got_reasons.update({f"prefilter.{reason}": n for reason, n in reasons.items()})
    assert got_reasons == Counter(f"{stage}.{reason}" for _, stage, reason, *_ in want_rejects)
    got_ids = ids + [(record.photo_id, int(record.source.rpartition(":")[2]),
                      VALID_LICENSE_SLUGS.index(record.license)) for record in candidates]
    assert sorted(got_ids) == sorted(
        (record.photo_id, int(record.source.rpartition(":")[2]),
         VALID_LICENSE_SLUGS.index(record.license)) for record in want_candidates)
    assert lines_read == len(lines)


def _escaped_lines() -> list[bytes]:
    """Simple candidate lines whose text the table path must decode exactly as parse_line."""
    good = record_line(950, user_tags=("people",))
    fields = good.split("\t")
    lines = []
    for index, values in ((2, ["a+b", "%C3%A9t%C3%A9", "%zz+x", "%E2%82", "%4"]),  # nickname
                          (3, ["", "null", "2010-01-01+10%3A00%3A00", "%zz"]),  # date taken
                          (5, ["Canon+EOS", "%09tab", "%C3"]),  # device
                          (6, ["t%2Ct+x", "a%25b%5Cx41\\x"]), (7, ["d%0Ad", "%2"]),
                          (8, ["a+b,c", "a%2Cb,c+d", "%C3%A9,x", ",", "a%09b"]),
                          (9, ["m%3Ax,y", "", "a+b"]), (1, ["1%402", "1+2@N0", "1%40+2"])):
        for value in values:
            changed = list(fields)
            changed[index] = value
            lines.append("\t".join(changed).encode("utf-8"))
    return lines


def _hash_lines() -> list[bytes]:
    """25-column lines (a block of their own) with hashes in upper case, empty, non-ASCII."""
    lines = [format_line(record, 25).encode() for record in random_records(50, seed=3)]
    for number, value in enumerate(("ABCDEF", "", "\u0130x")):
        fields = format_line(next(random_records(1, seed=2, start_id=5000 + number)), 25).split("\t")
        fields[2], fields[17] = value, "Attribution License"
        lines.append("\t".join(fields).encode("utf-8"))
    return lines


def _check_candidate_tables(lines: list[bytes], rules: PrefilterRules, chunk_bytes: int) -> None:
    """CandidateTableChecker's rejects, per-row records and tables equal the per-row path's."""
    want_rejects, want_candidates = _per_row(lines, rules)
    lines_read, rejects, candidates, parts, _ = _run_checker(
        CandidateTableChecker(rules), _blocks(lines, chunk_bytes), rules)
    assert lines_read == len(lines)
    assert Counter(rejects) == Counter(want_rejects)
    if chunk_bytes < 1 << 20:  # one block of every line holds a lone '\r': all per row
        assert sum(part.table.num_rows for part in parts) > len(want_candidates) // 2
    for part in parts:
        assert part.line_numbers.tolist() == [
            int(source.rpartition(":")[2]) for source in part.table.column("source").to_pylist()]
    got = sorted(pa.concat_tables([records_to_table(candidates)] + [part.table for part in parts])
                 .to_pylist(), key=lambda row: row["source"])
    want = sorted(records_to_table(want_candidates).to_pylist(), key=lambda row: row["source"])
    assert len(got) == len(want)
    for got_row, want_row in zip(got, want):
        assert got_row == want_row


@pytest.mark.parametrize("rules", RULES, ids=["fdh", "narrow-opt-out", "all-cc"])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 4096, 700])
def test_candidate_tables_equal_the_tables_of_the_per_row_records(rules, chunk_bytes):
    _check_candidate_tables(_all_lines() + _escaped_lines(), rules, chunk_bytes)


def test_candidate_tables_of_25_column_lines_take_the_hash_column_as_parse_line_does():
    lines = _hash_lines()
    split = split_block(b"\n".join(lines) + b"\n", all_columns=True)
    assert len(split.rows) == len(lines) and "photo_hash" in split.columns
    _check_candidate_tables(lines, RULES[2], 1 << 20)


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"])
def test_blocks_of_plain_lines_take_the_arrow_path_and_keep_their_line_numbers(line_end):
    lines = [format_line(record, 23).encode() for record in random_records(200, seed=9)]
    lines[50:50] = [b"", record_line(7, user_tags=("no+cv",)).encode(), b"too\tfew"]
    block = line_end.join(lines) + line_end
    split = split_block(block)
    assert split is not None and len(split) == len(lines)
    assert [split.line(index) for index in range(len(lines))] == lines
    assert not {50, 52} & set(split.rows.tolist())  # blank and short lines go per row
    rules = PrefilterRules.create()
    checked = BlockChecker(rules)(block, PATH, 0)
    assert checked[1:] == parse_block_per_row(block, PATH, 0)[1:]
    _, rejects, candidates, _, _ = _run_checker(BlockChecker(rules), [block], rules)
    want_rejects, want_candidates = _per_row(lines, rules)
    assert Counter(rejects) == Counter(want_rejects)
    assert sorted(record.source for record in candidates) == sorted(
        record.source for record in want_candidates)


def test_a_block_that_is_not_utf8_is_parsed_line_by_line():
    lines = [record_line(1).encode(), b"\xff\xfe", record_line(2).encode()]
    block = b"\n".join(lines) + b"\n"
    checked = BlockChecker(PrefilterRules.create())(block, PATH, 10)
    assert checked[1:] == parse_block_per_row(block, PATH, 10)[1:] == (3, 2)
    assert [getattr(item, "source", None) for item in checked[0]] == [
        f"{PATH}:11", None, f"{PATH}:13"]


@pytest.mark.pipeline
def test_counts_only_scan_writes_the_counts_of_a_full_scan_and_nothing_else(tmp_path):
    lines = _all_lines()
    write_lines(tmp_path / "a.txt.gz", lines[:400])
    write_lines(tmp_path / "b.txt", lines[400:])
    (tmp_path / "opt_out.txt").write_text("user:888@N08\nphoto:9\n")
    flags = [f"--yfcc={tmp_path}/a.txt.gz,{tmp_path}/b.txt", "--licenses=cc-by-2,cc-by-nc-2",
             "--drop_tags=people,no_cv", f"--opt_out={tmp_path}/opt_out.txt"]
    full = scan.run(flags + [f"--output={tmp_path}/full"])
    counts = scan.run(flags + [f"--output={tmp_path}/counts", "--counts_only"])
    assert counts == full
    assert full["rejects_per_reason"]["prefilter.duplicate_photo_id"] >= 5  # across files
    assert sorted(path.name for path in (tmp_path / "counts").iterdir()) == [
        scan.COUNTS_FILENAME]
    assert set(counts["candidates_per_license"]) == {"cc-by-2", "cc-by-nc-2"}


def test_the_characters_that_lower_to_ascii_are_the_constant_the_tag_patterns_use():
    assert {char: tuple(others) for char, others in lowering_to_ascii().items()} == LOWERING_TO_ASCII


def _scan_outputs(output) -> tuple[list, list, dict]:
    """A scan's candidate rows (sorted by source), rejects (sorted tuples) and counts."""
    import pyarrow.parquet as pq

    def rows(pattern: str) -> list[dict]:
        return [row for path in sorted(output.glob(pattern))
                for row in pq.read_table(path).to_pylist()]

    candidates = sorted(rows("candidates/*.parquet"), key=lambda row: row["source"])
    rejects = sorted(tuple((key, str(value)) for key, value in row.items())
                     for row in rows("rejects/*.parquet"))
    return candidates, rejects, scan.read_json(str(output / scan.COUNTS_FILENAME))


@pytest.mark.pipeline
@pytest.mark.parametrize("buckets", [None, 7])
def test_full_scan_with_candidate_tables_writes_what_the_record_path_writes(tmp_path, buckets):
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_jobs.common import make_pipeline

    lines = _all_lines() + _escaped_lines()
    write_lines(tmp_path / "a.txt.gz", lines[:400])
    write_lines(tmp_path / "b.txt", lines[400:] + lines[10:20])  # duplicates across files
    write_lines(tmp_path / "c.txt", _hash_lines() + _hash_lines()[:4])
    (tmp_path / "opt_out.txt").write_text("user:888@N08\nphoto:9\n")
    yfcc = [str(tmp_path / name) for name in ("c.txt", "b.txt", "a.txt.gz")]
    outputs = []
    for name, staging_dir in (("records", None), ("tables", tmp_path / "staging")):
        pipeline = make_pipeline(PipelineOptions([]))
        scan.build_scan(pipeline, yfcc, str(tmp_path / name), ["cc-by-2", "cc-by-nc-2"],
                        [str(tmp_path / "opt_out.txt")], ["people", "no_cv"],
                        staging_dir=None if staging_dir is None else str(staging_dir),
                        buckets=buckets)
        pipeline.run().wait_until_finish()
        outputs.append(_scan_outputs(tmp_path / name))
    (want_candidates, want_rejects, want_counts), (candidates, rejects, counts) = outputs
    assert any(path.suffix == ".arrows" for path in (tmp_path / "staging").iterdir())
    assert counts == want_counts
    assert counts["rejects_per_reason"]["prefilter.duplicate_photo_id"] >= 14
    assert counts["lines_read"] == counts["candidates"] + counts["rejects"]
    assert rejects == want_rejects
    assert len(candidates) == len(want_candidates) == counts["candidates"] > 100
    for row, want_row in zip(candidates, want_candidates):
        assert row == want_row


_TRICKY_VALUES = ["", "%", "%4", "a%4", "%41", "x%", "%%41", "%4%41", "a+b", "+%2B+", "%C3%A9",
                  "%ff", "%FF%41", "%C3", "%E2%82%AC", "%zz", "%2", "1%402", "1+2", "é%41é", "%0A"]


@pytest.mark.parametrize("plus_is_space", [True, False])
def test_vectorised_url_decoding_equals_the_per_value_decoder(plus_is_space):
    """Every value decodes as decode_text / decode_nsid does, also when an escape's digits
    would run into the next value ('a%' then '41b') or a decoded byte is 0xFF."""
    from transforms.s2_prefilter.blocks import _decoded_text, _url_decoded
    from transforms.yfcc_format import decode_nsid, decode_text

    values = _TRICKY_VALUES + ["a%", "41b", "%4", "1"] + [v + w for v in _TRICKY_VALUES[:8]
                                                          for w in _TRICKY_VALUES[8:]]
    decode = decode_text if plus_is_space else decode_nsid
    utf8 = [value for value in values if "\ufffd" not in decode(value)]
    assert _url_decoded(pa.array(utf8)) is not None  # the vectorised path, not the fallback
    assert _url_decoded(pa.array(["%FF"])) is None and _url_decoded(pa.array(["%C3"])) is None
    for chosen in (values, utf8):
        for array in (pa.array(chosen, pa.large_string()), pa.array(["pad"] + chosen).slice(1)):
            assert _decoded_text(array, plus_is_space).to_pylist() == [decode(v) for v in chosen]


def test_the_full_scan_sizes_its_buckets_from_the_input(tmp_path):
    """About SCAN_BUCKET_TEXT_BYTES of text per bucket, a power of two; .gz/.bz2 scaled up."""
    from transforms.s2_prefilter.rules import MAX_SCAN_BUCKETS, SCAN_BUCKET_TEXT_BYTES

    assert [scan_buckets(n * SCAN_BUCKET_TEXT_BYTES) for n in (0, 1, 2, 3, 100)] == [1, 1, 2, 4, 128]
    assert scan_buckets(SCAN_BUCKET_TEXT_BYTES + 1) == 2
    assert scan_buckets(1 << 60) == MAX_SCAN_BUCKETS
    (tmp_path / "a.txt").write_bytes(b"x" * 1000)
    (tmp_path / "b.txt.bz2").write_bytes(b"x" * 100)
    assert scan.input_text_bytes([str(tmp_path / "*")]) == 1000 + 100 * scan.COMPRESSED_TEXT_RATIO
