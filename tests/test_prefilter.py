"""Stage 2 (prefilter): the rules on their own, then Prefilter in a real pipeline."""
from __future__ import annotations

import apache_beam as beam
import pytest
from hypothesis import given, settings, strategies as st
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.common import make_pipeline
from tests.factories import make_record
from transforms.opt_out import OptOut, format_opt_out, parse_opt_out, validate_opt_out
from transforms.records import FDH_LICENSES, LICENSES
from tests.yfcc_lines import random_records, record_line, write_lines
from transforms.s1_read import ReadYfcc
from transforms.s2_prefilter import (BATCH_SIZE, ID_BUCKETS, Prefilter, PrefilterRules,
                                     ReadAndPrefilter, keep_first_of_each_photo,
                                     order_duplicates, validate_licenses)
from transforms.yfcc_format import format_line, parse_line

RULES = PrefilterRules.create()


def test_fdh_photo_passes():
    assert RULES.check(make_record(1)) is None


def test_video_is_dropped():
    assert RULES.check(make_record(1, marker=1)) == ("video", "")


@pytest.mark.parametrize("name", list(LICENSES))
def test_each_licence_against_the_fdh_allowlist(name):
    slug, url = LICENSES[name]
    record = make_record(1, license_name=name, license_url=url, license=slug)
    if slug in FDH_LICENSES:
        assert RULES.check(record) is None
    else:
        assert RULES.check(record) == ("license_not_allowed", slug)


def test_non_cc_licence_is_unknown():
    record = make_record(1, license_name="All Rights Reserved", license=None)
    assert RULES.check(record) == ("license_unknown", "All Rights Reserved")


def test_allowlist_can_be_narrowed_or_widened():
    only_by = PrefilterRules.create(["cc-by-2"])
    assert only_by.check(make_record(1, license="cc-by-sa-2"))[0] == "license_not_allowed"
    only_nc = PrefilterRules.create(["cc-by-nc-2"])
    assert only_nc.check(make_record(1, license="cc-by-nc-2")) is None


@pytest.mark.parametrize("slug,reason", [
    ("cc-by-nd-2", "crops are derivatives"), ("cc-by-nc-nd-2", "crops are derivatives"),
    ("all-rights-reserved", "all rights reserved"), ("ARR", "all rights reserved")])
def test_noderivs_and_all_rights_reserved_licences_are_refused_with_the_reason(slug, reason):
    with pytest.raises(ValueError, match=reason) as error:
        validate_licenses(["cc-by-2", slug])
    assert slug in str(error.value) and "cc-by-nc-sa-2" in str(error.value)
    with pytest.raises(ValueError, match=reason):
        Prefilter(licenses=[slug])


def test_invalid_licences_fail_early_listing_valid_ones():
    with pytest.raises(ValueError, match="cc-by-nc-sa-2") as error:
        validate_licenses(["cc-by-2", "by-sa"])
    assert "by-sa" in str(error.value)
    with pytest.raises(ValueError):
        Prefilter(licenses=["CC-BY-2"])
    with pytest.raises(ValueError):
        validate_licenses([])


@pytest.mark.parametrize("tag", ["no_cv", "NO_CV", "No_Cv", " no_cv "])
def test_no_cv_tag_in_any_case_is_dropped(tag):
    assert RULES.check(make_record(1, user_tags=("people", tag))) == ("no_cv_tag", tag)


@pytest.mark.parametrize("tags", [("no_cvx",), ("nocv2",), ("knocv",), ()])
def test_similar_tags_are_kept(tags):
    assert RULES.check(make_record(1, user_tags=tags)) is None


def test_no_cv_in_machine_tags_is_not_a_user_opt_out():
    assert RULES.check(make_record(1, machine_tags=("no_cv",))) is None


def test_opt_out_by_user_and_by_photo():
    rules = PrefilterRules.create(opt_out=OptOut(frozenset({"9@N01"}), frozenset({77})))
    assert rules.check(make_record(1, user_nsid="9@N01")) == ("user_opt_out", "")
    assert rules.check(make_record(77)) == ("photo_opt_out", "")
    assert rules.check(make_record(78)) is None


def test_duplicates_keep_the_lowest_source_comparing_line_numbers_as_numbers():
    records = [make_record(5, source="b.txt:1"), make_record(5, source="a.txt:10"),
               make_record(5, source="a.txt:9")]
    assert [r.source for r in order_duplicates(records)] == ["a.txt:9", "a.txt:10", "b.txt:1"]


def test_keep_first_of_each_photo_streams_unique_ids_and_orders_repeated_ones():
    records = [make_record(1, source="a.txt:1"), make_record(5, source="b.txt:1"),
               make_record(2, source="a.txt:2"), make_record(5, source="a.txt:10"),
               make_record(5, source="a.txt:9")]
    result = {kept.photo_id: (kept.source, [d.source for d in duplicates])
              for kept, duplicates in keep_first_of_each_photo(records)}
    assert result == {1: ("a.txt:1", []), 2: ("a.txt:2", []),
                      5: ("a.txt:9", ["a.txt:10", "b.txt:1"])}
    # The same record read twice is one kept record and one duplicate.
    twice = list(keep_first_of_each_photo([records[0], records[0]]))
    assert [(kept.source, len(duplicates)) for kept, duplicates in twice] == [("a.txt:1", 1)]


@pytest.mark.pipeline
def test_prefilter_pipeline_with_many_batches_and_repeats_across_them():
    # More candidates than one batch per bucket, and ids repeated across batches and bundles.
    count = ID_BUCKETS * BATCH_SIZE // 16 + 7
    records = [make_record(i, source=f"a.txt:{i}") for i in range(1, count + 1)]
    records += [make_record(i, source=f"b.txt:{i}") for i in range(1, count + 1, 97)]
    with make_pipeline(PipelineOptions([])) as pipeline:
        out = pipeline | beam.Create(records) | Prefilter()
        assert_that(out.main | "Key" >> beam.Map(lambda r: (r.photo_id, r.source)),
                    equal_to([(i, f"a.txt:{i}") for i in range(1, count + 1)]), label="kept")
        assert_that(out.rejects | "RKey" >> beam.Map(lambda r: (r.photo_id, r.detail)),
                    equal_to([(i, f"b.txt:{i} repeats a.txt:{i}")
                              for i in range(1, count + 1, 97)]), label="rejects")


@pytest.mark.pipeline
def test_prefilter_refuses_windowed_input():
    pipeline = make_pipeline(PipelineOptions([]))
    windowed = (pipeline | beam.Create([make_record(1)])
                | beam.WindowInto(beam.window.FixedWindows(60)))
    with pytest.raises(ValueError, match="global window"):
        _ = windowed | Prefilter()


@pytest.mark.pipeline
def test_prefilter_pipeline(tmp_path):
    opt_out = tmp_path / "opt_out.txt"
    opt_out.write_text("# takedowns\nuser:11@N02\nphoto:30\n55555@N05  # bare NSID\n")
    records = [
        make_record(10, source="a.txt:1"),
        make_record(11, source="a.txt:2", marker=1),
        make_record(12, source="a.txt:3", license_name="Attribution-NoDerivs License",
                    license="cc-by-nd-2"),
        make_record(13, source="a.txt:4", license_name="All Rights Reserved", license=None),
        make_record(14, source="a.txt:5", user_tags=("NO_CV",)),
        make_record(15, source="a.txt:6", user_nsid="11@N02"),
        make_record(16, source="a.txt:7", user_nsid="55555@N05"),
        make_record(30, source="a.txt:8"),
        make_record(40, source="b.txt:10", title="second"),
        make_record(40, source="b.txt:9", title="first"),
        make_record(40, source="c.txt:1", title="third"),
        make_record(41, source="c.txt:2", license="cc-by-nc-sa-2"),
    ]
    with make_pipeline(PipelineOptions([])) as pipeline:
        out = pipeline | beam.Create(records) | Prefilter(opt_out_paths=[str(opt_out)])
        assert_that(out.main | "Key" >> beam.Map(lambda r: (r.photo_id, r.title)),
                    equal_to([(10, "A title"), (40, "first"), (41, "A title")]), label="kept")
        assert_that(out.rejects | "RKey" >> beam.Map(
            lambda r: (r.record_id, r.stage, r.reason, r.detail, r.photo_id)),
            equal_to([
                ("11", "prefilter", "video", "", 11),
                ("12", "prefilter", "license_not_allowed", "cc-by-nd-2", 12),
                ("13", "prefilter", "license_unknown", "All Rights Reserved", 13),
                ("14", "prefilter", "no_cv_tag", "NO_CV", 14),
                ("15", "prefilter", "user_opt_out", "", 15),
                ("16", "prefilter", "user_opt_out", "", 16),
                ("30", "prefilter", "photo_opt_out", "", 30),
                ("40", "prefilter", "duplicate_photo_id", "b.txt:10 repeats b.txt:9", 40),
                ("40", "prefilter", "duplicate_photo_id", "c.txt:1 repeats b.txt:9", 40),
            ]), label="rejects")


@pytest.mark.pipeline
def test_missing_or_bad_opt_out_file_fails_when_the_pipeline_is_built(tmp_path):
    pipeline = make_pipeline(PipelineOptions([]))
    records = pipeline | beam.Create([make_record(1)])
    with pytest.raises(Exception, match="missing.txt"):
        _ = records | "Missing" >> Prefilter(opt_out_paths=[str(tmp_path / "missing.txt")])
    bad = tmp_path / "bad.txt"
    bad.write_text("user:ok@N01\nnot an entry\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        _ = records | "Bad" >> Prefilter(opt_out_paths=[str(bad)])


def _summaries(outputs, label: str, batched: bool = False):
    """(kept (photo id, source) pairs, rejects as tuples) of a read + prefilter."""
    main, rejects = outputs.main, outputs.rejects
    if batched:  # lists of records, lists of rejects
        main = main | f"{label}Unbatch" >> beam.FlatMap(lambda batch: batch)
        rejects = rejects | f"{label}UnbatchRejects" >> beam.FlatMap(lambda batch: batch)
    kept = main | f"{label}Kept" >> beam.Map(lambda r: (r.photo_id, r.source))
    rejects = rejects | f"{label}Rejects" >> beam.Map(
        lambda r: (r.record_id, r.stage, r.reason, r.detail, r.photo_id, r.user_nsid))
    return kept, rejects


def _assert_same(want: list, got: list, reasons: set) -> None:
    assert sorted(want) == sorted(got) and len(want) > 10
    if reasons:  # the rejects: the input must exercise every path
        assert reasons <= {item[2] for item in want}, {item[2] for item in want}


@pytest.mark.pipeline
@pytest.mark.parametrize("batched", [False, True])
def test_read_and_prefilter_equals_read_then_prefilter(tmp_path, batched):
    records = list(random_records(400, seed=21))
    lines = [format_line(record, 23 if record.photo_id % 3 else 25) for record in records]
    lines[7] = "not\ta\tline"
    lines[9] = ""
    rules = PrefilterRules.create()
    kept_line = next(line for line in lines[300:] if rules.check(parse_line(line)) is None)
    write_lines(tmp_path / "p-0.txt", lines[:250] + [kept_line, kept_line])
    write_lines(tmp_path / "p-1.txt.gz", lines[250:])
    opt_out = tmp_path / "opt_out.txt"
    opt_out.write_text(f"user:{records[5].user_nsid}\nphoto:{records[6].photo_id}\n")
    pattern = str(tmp_path / "p-*")
    every_reason = {"bad_field_count", "blank_line", "license_not_allowed", "user_opt_out",
                    "photo_opt_out", "duplicate_photo_id"}
    with make_pipeline(PipelineOptions([])) as pipeline:
        read = pipeline | "Read" >> ReadYfcc(pattern)
        prefiltered = read.main | Prefilter(opt_out_paths=[str(opt_out)])
        two_steps = prefiltered._replace(
            rejects=(read.rejects, prefiltered.rejects) | "Merge" >> beam.Flatten())
        fused = pipeline | "Fused" >> ReadAndPrefilter(
            pattern, opt_out_paths=[str(opt_out)], batch_size=50 if batched else None)
        expected = _summaries(two_steps, "Two")
        actual = _summaries(fused, "Fused", batched)
        for name, want, got, reasons in (("kept", expected[0], actual[0], set()),
                                         ("rejects", expected[1], actual[1], every_reason)):
            _ = (want | f"{name}Expected" >> beam.combiners.ToList()
                 | f"{name}Compare" >> beam.Map(_assert_same, beam.pvalue.AsList(got), reasons))
        assert_that(fused.line_counts | beam.Map(lambda kv: kv[1]), equal_to([252, 150]),
                    label="line_counts")


# --- issue 10, finding 3: every NSID and photo id round-trips through opt_out.txt --------------

NASTY_NSIDS = ["a b#c%20@N01", "\t@N02", "日本@N03", "#@N04", "x:y\u2028z@N05", "%41@N06",
               " lead@N07", "user:photo:1@N08", "12345678@N00"]


@settings(max_examples=300, deadline=None)
@given(st.sets(st.text(min_size=1, max_size=30) | st.sampled_from(NASTY_NSIDS), max_size=8),
       st.sets(st.integers(min_value=0, max_value=2**63 - 1), max_size=8))
def test_opt_out_round_trips_every_nsid_and_photo_id(nsids, photo_ids):
    text = format_opt_out(nsids, photo_ids)
    assert text.isascii() and all("#" not in line and " " not in line for line in text.splitlines())
    parsed = parse_opt_out(text + "# a comment\n\n", "round-trip.txt")
    assert parsed == OptOut(frozenset(nsids), frozenset(photo_ids))
    for nsid in nsids:
        assert parsed.excludes(nsid, None) == "user_opt_out"
    for photo_id in photo_ids:
        assert parsed.excludes("someone-else@N00", photo_id) == "photo_opt_out"


def test_existing_opt_out_files_read_the_same():
    text = "# takedowns\nuser:11@N02\nphoto:30\n55555@N05  # bare NSID\n42\n"
    assert parse_opt_out(text) == OptOut(frozenset({"11@N02", "55555@N05"}), frozenset({30, 42}))
    assert format_opt_out(["11@N02"], [30]) == "user:11@N02\nphoto:30\n"


@pytest.mark.parametrize("line", ["user:a b@N01", "photo:١٢", "photo:-3", "photo:3x", "nothing here",
                                  "user:%FF@N01"])
def test_a_bad_opt_out_line_is_an_error_naming_the_line(line):
    with pytest.raises(ValueError, match=r"list\.txt:3: "):
        validate_opt_out(f"user:ok@N01\n# fine\n{line}\nphoto:1\n", "list.txt")


def test_unwritable_entries_fail_before_any_text_is_made():
    with pytest.raises(ValueError, match="empty"):
        format_opt_out([""], [])
    with pytest.raises(ValueError, match="negative"):
        format_opt_out([], [-1])


def test_opted_out_nasty_nsids_are_honoured_by_the_prefilter_after_a_yfcc_round_trip(tmp_path):
    """The NSIDs come from YFCC lines (their %-encoded column), the opt-out from format_opt_out."""
    records = [parse_line(format_line(make_record(100 + i, user_nsid=nsid)), f"y.txt:{i}")
               for i, nsid in enumerate(NASTY_NSIDS)]
    assert [r.user_nsid for r in records] == NASTY_NSIDS
    opt_out = tmp_path / "opt_out.txt"
    opt_out.write_text(format_opt_out(NASTY_NSIDS[:-1], []))
    with make_pipeline(PipelineOptions([])) as pipeline:
        out = pipeline | beam.Create(records) | Prefilter(opt_out_paths=[str(opt_out)])
        assert_that(out.main | beam.Map(lambda r: r.user_nsid), equal_to([NASTY_NSIDS[-1]]))
        assert_that(out.rejects | beam.Map(lambda r: r.reason),
                    equal_to(["user_opt_out"] * (len(NASTY_NSIDS) - 1)), label="rejects")
