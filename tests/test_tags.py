"""Flickr's clean tag form, and every spelling of `no_cv` through the real prefilter."""
from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.common import make_pipeline
from tests.factories import make_record
from tests.yfcc_lines import record_line, write_lines
from transforms.s2_prefilter import PrefilterRules, ReadAndPrefilter
from transforms.tags import clean_tag, find_tag, has_tag
from transforms.yfcc_format import parse_line

NO_CV_SPELLINGS = ("no_cv", "No_CV", "no cv", "nocv", "no-cv", "NOCV", "no.cv", " no_cv ",
                   "no\tcv", "«no cv»", "NO_ CV!")
NOT_NO_CV = ("nocv2", "knocv", "no_cvx", "no_c", "no", "cv", "nо_cv", "")  # "nо" has a Cyrillic o
RULES = PrefilterRules.create()


@pytest.mark.parametrize("raw,clean", [
    ("no_cv", "nocv"), ("No_CV", "nocv"), ("no cv", "nocv"), ("no-cv", "nocv"),
    ("no.cv", "nocv"), ("New York", "newyork"), ("c++", "c"), ("Café Über", "caféüber"),
    ("日本 東京", "日本東京"), ("a\u00a0b", "ab"), ("2008", "2008"), ("", "")])
def test_clean_tag_removes_space_and_punctuation_and_lower_cases(raw, clean):
    assert clean_tag(raw) == clean


def test_find_tag_returns_the_raw_spelling_and_has_tag_takes_any_spelling():
    assert find_tag(("people", "No-CV", "beach"), {"nocv"}) == "No-CV"
    assert find_tag(("people",), {"nocv"}) is None
    assert find_tag(("no_cv",), set()) is None
    assert has_tag(("portrait", "NO CV"), "no_cv")
    assert not has_tag(("nocv2", "knocv"), "nocv")


@pytest.mark.parametrize("tag", NO_CV_SPELLINGS)
def test_every_spelling_of_no_cv_is_dropped_by_the_rules(tag):
    assert RULES.check(make_record(1, user_tags=("people", tag))) == ("no_cv_tag", tag)


@pytest.mark.parametrize("tag", NOT_NO_CV)
def test_other_tags_are_kept_by_the_rules(tag):
    assert RULES.check(make_record(1, user_tags=("people", tag))) is None


def test_yfcc_plus_encoded_space_is_decoded_by_the_parser_then_matched():
    line = record_line(7, user_tags=("people", "no cv"))
    assert "people,no+cv" in line  # the YFCC form
    record = parse_line(line, "t.txt:1")
    assert record.user_tags == ("people", "no cv")
    assert RULES.check(record) == ("no_cv_tag", "no cv")


def test_configured_drop_tags_are_compared_in_clean_form():
    rules = PrefilterRules.create(drop_tags=["No-AI", " ", ""])
    assert rules.drop_tags == frozenset({"noai"})
    assert rules.check(make_record(1, user_tags=("no ai",))) == ("no_cv_tag", "no ai")
    assert rules.check(make_record(1, user_tags=("no_cv",))) is None


def test_every_spelling_through_the_read_and_prefilter_pipeline(tmp_path):
    dropped = {100 + index: tag for index, tag in enumerate(NO_CV_SPELLINGS)}
    kept = {200 + index: tag for index, tag in enumerate(NOT_NO_CV)}
    lines = [record_line(photo_id, user_tags=("people", tag))
             for photo_id, tag in {**dropped, **kept}.items()]
    path = write_lines(tmp_path / "yfcc.txt", lines)
    with make_pipeline(PipelineOptions([])) as pipeline:
        out = pipeline | ReadAndPrefilter(path)
        assert_that(out.main | beam.Map(lambda record: record.photo_id),
                    equal_to(sorted(kept)), label="kept")
        assert_that(out.rejects | beam.Map(lambda r: (r.photo_id, r.reason, r.detail)),
                    equal_to([(photo_id, "no_cv_tag", tag) for photo_id, tag in dropped.items()]),
                    label="rejects")
