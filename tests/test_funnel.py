"""The funnel invariants of the design (section 2) and the top-down funnel rows."""
from transforms.funnel import accounting_errors, funnel_rows

SOUND = {
    "funnel.lines_read": 10, "read.bad_field_count": 1, "prefilter.video": 2,
    "funnel.candidates": 7, "fetch.not_found": 1, "decode.truncated": 1,
    "funnel.decoded": 5, "annotate.model_error": 1, "funnel.annotated": 4,
    "select.no_person": 1, "select.head_rule": 3,  # head_rule drops persons, not photos
    "funnel.photos_with_person": 3, "funnel.samples": 4,
}


def test_a_sound_funnel_has_no_errors():
    assert accounting_errors(SOUND) == []


def test_each_broken_invariant_is_named():
    lost_line = dict(SOUND, **{"funnel.lines_read": 11})
    assert accounting_errors(lost_line) == [
        "lines read 11 != rejects before annotation 5 + photos decoded 5"]
    lost_photo = dict(SOUND, **{"funnel.annotated": 5, "funnel.photos_with_person": 4})
    assert len(accounting_errors(lost_photo)) == 1
    assert "photos decoded 5 != annotated 5 + annotate rejects 1" in accounting_errors(lost_photo)[0]
    lost_select = dict(SOUND, **{"select.no_person": 0})
    assert accounting_errors(lost_select) == [
        "photos annotated 4 != with a kept person 3 + rejected whole by select 0"]


def test_rows_put_each_stage_under_the_step_it_follows():
    labels = [label for label, _, _ in funnel_rows(SOUND)]
    assert labels.index("  - prefilter.video") < labels.index("candidates (after prefilter)")
    assert labels.index("  - decode.truncated") < labels.index("photos fetched and decoded")
    assert labels.index("  - select.no_person") < labels.index("photos with >= 1 kept person")
    assert sum(is_step for _, _, is_step in funnel_rows(SOUND)) == 6
