"""SelectPersons + CropPersons in a real Beam pipeline: samples, rejects and counters."""
import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.common import make_pipeline, read_counters
from tests.select_scenes import (fdh_scene, figure_keypoints, lite_scene, make_photo,
                                 synthetic_part_table)
from transforms.records import HEAD_KEYPOINTS
from transforms.s6_select import SelectPersons
from transforms.s7_crop import CropPersons


def scenes():
    # Photo 1: two people, the second with its head keypoints on its torso (head rule).
    bad = figure_keypoints(300, 60)
    bad[list(HEAD_KEYPOINTS), :2] = (330, 120)
    one = fdh_scene(make_photo((400, 500), 1), [(40, 60, 1), (300, 60, 1)],
                    keypoints=[figure_keypoints(40, 60), bad])
    # Photo 2: nobody.
    two = fdh_scene(make_photo((200, 200), 2), [])
    # Photo 3: arrays that do not fit (vertices of the wrong size).
    three = fdh_scene(make_photo((300, 300), 3), [(20, 20, 1)])
    three.cse_dets.vertices = three.cse_dets.vertices[:, :10, :10]
    # Photo 4: a lite figure (mask form of the rule).
    four = lite_scene(make_photo((300, 300), 4), 100, 50)
    # Photo 5: a lite figure at the top border, head partly outside the image.
    five = lite_scene(make_photo((300, 300), 5), 120, -10)
    return [one, two, three, four, five]


@pytest.mark.pipeline
def test_select_and_crop_pipeline(tmp_path):
    table = synthetic_part_table()
    with make_pipeline(PipelineOptions([])) as p:
        photos = p | beam.Create(scenes())
        selected = photos | SelectPersons(part_table=table, keypoint_score_threshold=0.5)
        cropped = selected.main | CropPersons(keypoint_score_threshold=0.5)
        assert_that(cropped.main | "Keys" >> beam.Map(lambda s: (s.key, s.image.shape, s.annotator)),
                    equal_to([("1000", (288, 160, 3), "fdh"), ("4000", (288, 160, 3), "lite"),
                              ("5000", (288, 160, 3), "lite")]), label="samples")
        assert_that(selected.rejects | "Why" >> beam.Map(lambda r: (r.record_id, r.reason)),
                    equal_to([("1001", "head_rule"), ("2", "no_person"), ("3", "bad_annotation")]),
                    label="select_rejects")
        assert_that(cropped.rejects | "CropWhy" >> beam.Map(lambda r: r.reason), equal_to([]),
                    label="crop_rejects")
    counters = read_counters(p.result)
    assert counters["select.photos_with_person"] == 3
    assert counters["select.photos_without_person"] == 2
    assert counters["select.persons_kept"] == 3
    assert counters["select.head_rule"] == 1 and counters["select.no_person"] == 1
    assert counters["crop.samples"] == 3


@pytest.mark.pipeline
def test_crop_rejects_too_small_and_bad_person():
    from transforms.records import Person
    from transforms.s6_select import SelectedPhoto

    photo = make_photo((200, 200), 9)
    tiny = np.zeros((200, 200), bool)
    tiny[100:104, 100:102] = True
    persons = [
        Person(index=0, box=np.array([100, 100, 102, 104], np.float32), mask=tiny,
               keypoints=np.zeros((17, 3), np.float32), score=0.9),
        Person(index=1, box=np.array([0, 0, 10, 10], np.float32), mask=np.zeros((5, 5), bool),
               keypoints=np.zeros((17, 3), np.float32), score=0.9),
    ]
    with make_pipeline(PipelineOptions([])) as p:
        out = (p | beam.Create([SelectedPhoto(photo, "lite", persons)])) | CropPersons()
        assert_that(out.main, equal_to([]), label="none")
        assert_that(out.rejects | beam.Map(lambda r: (r.stage, r.reason, r.record_id)),
                    equal_to([("crop", "too_small", "9000"), ("crop", "bad_person", "9001")]),
                    label="rejects")


@pytest.mark.pipeline
def test_tiny_person_is_dropped_by_select_before_the_rule():
    """A person whose crop box is under 32x32 px never reaches the rule or the crop (as in DP2),
    so the photo counts as 'no_person' and the funnel invariant stays exact."""
    from transforms.records import AnnotatedPhoto, Detections
    from transforms.s6_select import FdhRule, select_persons

    photo = make_photo((200, 200), 11)
    tiny = np.zeros((200, 200), bool)
    tiny[100:103, 100:102] = True
    keypoints = np.zeros((1, 17, 3), np.float32)
    keypoints[0, :, :2] = (101, 101)
    keypoints[0, :, 2] = 0.9
    annotated = AnnotatedPhoto(photo=photo, annotator="lite", keypoint_dets=Detections(
        boxes=np.array([[100, 100, 102, 103]], np.float32), scores=np.array([0.9], np.float32),
        keypoints=keypoints, masks=tiny[None]))
    selection = select_persons(annotated, None, FdhRule())
    assert selection.kept == []
    assert [(d.reason, d.person_index) for d in selection.dropped] == [("too_small", 0)]
    with make_pipeline(PipelineOptions([])) as p:
        out = (p | beam.Create([annotated])) | SelectPersons()
        assert_that(out.rejects | beam.Map(lambda r: (r.reason, r.record_id)),
                    equal_to([("too_small", "11000"), ("no_person", "11")]))
