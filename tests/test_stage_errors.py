"""One dead-letter policy: in every stage, an element that makes the stage raise unexpectedly
becomes a `{stage}.error` reject (exception class and message, counted), the job completes and
the other elements flow on. Each test runs the stage in a real Beam pipeline with one bad
element: a record whose field makes the core raise, a corrupt file, or (where no input can make
the core raise) a core that raises for one element."""
from __future__ import annotations

import dataclasses
import io

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from beam_jobs.common import make_pipeline, read_counters
from tests.factories import make_record, make_sample
from tests.select_scenes import lite_scene, make_photo
from tests.yfcc_lines import record_line, write_lines
from transforms import s3_fetch, s4_decode, s6_select
from transforms.records import REJECTS_TAG, AnnotatedPhoto, Detections, FetchedImage, Person
from transforms.s1_read import ReadYfcc
from transforms.s2_prefilter import Prefilter, ReadAndPrefilter
from transforms.s3_fetch import FetchImages
from transforms.s4_decode import DecodeImages
from transforms.s5_annotate.cascade import DENSE_TAG, AttachKeypointsFn
from transforms.s6_select import SelectPersons
from transforms.s6_select.combine import SelectedPhoto
from transforms.s7_crop import CropPersons
from transforms.s8_write.split import AssignSplit

pytestmark = pytest.mark.pipeline


def _error_summary(rejects, label: str = "errors"):
    """(stage, record_id, exception class) of the error rejects; the others are dropped."""
    return (rejects | f"{label}Only" >> beam.Filter(lambda r: r.reason == "error")
            | f"{label}Summary" >> beam.Map(lambda r: (r.stage, r.record_id, r.detail.split(":")[0])))


def _run(build) -> dict:
    """Run a pipeline built by `build(pipeline)`; the fdh counters."""
    with make_pipeline(PipelineOptions([])) as pipeline:
        build(pipeline)
    return read_counters(pipeline.result)


def _corrupt_gzip(path) -> str:
    path.write_bytes(b"\x1f\x8b\x08\x00" + b"not gzip at all" * 10)
    return str(path)


@pytest.mark.parametrize("fused", [False, True])
def test_read_error_is_a_reject_of_the_file_and_other_files_flow(tmp_path, fused):
    write_lines(tmp_path / "good.txt", [record_line(1), record_line(2)])
    bad = _corrupt_gzip(tmp_path / "bad.txt.gz")

    def build(pipeline):
        pattern = str(tmp_path / "*")
        out = pipeline | (ReadAndPrefilter(pattern) if fused else ReadYfcc(pattern))
        assert_that(out.main | beam.Map(lambda r: r.photo_id), equal_to([1, 2]), label="records")
        # A damaged archive is a reject of the whole file naming it, and on purpose it breaks the
        # accounting (one reject more than the lines counted): never silent.
        assert_that(out.rejects | beam.Map(lambda r: (r.stage, r.reason, r.record_id, bad in r.detail)),
                    equal_to([("read", "corrupt_input", bad, True)]))
        assert_that(out.line_counts | beam.Map(lambda kv: (kv[0].rsplit("/", 1)[-1], kv[1])),
                    equal_to([("good.txt", 2), ("bad.txt.gz", 0)]), label="line_counts")

    assert _run(build)["read.corrupt_input"] == 1


def test_prefilter_error_is_a_reject_and_other_records_flow():
    broken = make_record(2, user_tags=None)  # the tag rule iterates the tags

    def build(pipeline):
        out = pipeline | beam.Create([make_record(1), broken, make_record(3)]) | Prefilter()
        assert_that(out.main | beam.Map(lambda r: r.photo_id), equal_to([1, 3]), label="kept")
        assert_that(_error_summary(out.rejects), equal_to([("prefilter", "2", "TypeError")]))

    assert _run(build)["prefilter.error"] == 1


class _FetchFailingOnTwo(s3_fetch._FetchDoFn):
    """The fetch DoFn, raising for photo 2 (no record makes the real one raise: fetch() turns
    every failure into a reason)."""

    def process_element(self, record, timestamp=None, window=None):
        if record.photo_id == 2:
            raise RuntimeError("injected")
        return super().process_element(record, timestamp, window)


def test_fetch_error_is_a_reject_and_other_records_flow(tmp_path, monkeypatch):
    monkeypatch.setattr(s3_fetch, "_FetchDoFn", _FetchFailingOnTwo)

    def build(pipeline):
        records = pipeline | beam.Create([make_record(1), make_record(2), make_record(3)])
        out = records | FetchImages(f"mirror:{tmp_path}", threads=2)  # an empty mirror
        assert_that(out.rejects | beam.Map(lambda r: (r.record_id, r.reason)),
                    equal_to([("1", "not_found"), ("2", "error"), ("3", "not_found")]))

    assert _run(build)["fetch.error"] == 1


def _jpeg(side: int = 64) -> bytes:
    pixels = np.add.outer(np.arange(side), np.arange(side)).astype(np.uint8) * 2
    buffer = io.BytesIO()
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_decode_error_is_a_reject_and_other_images_flow(monkeypatch):
    # decode_image turns every failure of the image libraries into a reason: inject one it does not.
    real = s4_decode.decode_image

    def failing_on_empty(data, **kwargs):
        if not data:
            raise MemoryError("injected")
        return real(data, **kwargs)

    monkeypatch.setattr(s4_decode, "decode_image", failing_on_empty)
    good = FetchedImage(make_record(1), _jpeg(), "mem://1", "mirror")
    broken = FetchedImage(make_record(2), b"", "mem://2", "mirror")

    def build(pipeline):
        out = pipeline | beam.Create([good, broken]) | DecodeImages()
        assert_that(out.main | beam.Map(lambda d: d.record.photo_id), equal_to([1]), label="decoded")
        assert_that(_error_summary(out.rejects), equal_to([("decode", "2", "MemoryError")]))

    assert _run(build)["decode.error"] == 1


def test_annotate_error_is_a_reject_and_other_photos_flow():
    def annotated(photo_id):
        return AnnotatedPhoto(photo=make_photo((64, 48), photo_id), annotator="fdh",
                              keypoint_dets=Detections.empty())

    nobody = Detections.empty()
    broken = Detections(boxes=np.zeros((1,), np.float32), scores=np.ones(1, np.float32))  # 1-D boxes

    def build(pipeline):
        results = (pipeline | beam.Create([(annotated(1), nobody), (annotated(2), broken)])
                   | beam.ParDo(AttachKeypointsFn(0.3, 32 * 32, no_embeddings=True)).with_outputs(
                       DENSE_TAG, REJECTS_TAG, main="done"))
        assert_that(results.done | beam.Map(lambda a: a.photo.record.photo_id), equal_to([1]),
                    label="done")
        assert_that(_error_summary(results[REJECTS_TAG]), equal_to([("annotate", "2", "TypeError")]))

    assert _run(build)["annotate.error"] == 1


def test_select_error_is_a_reject_and_other_photos_flow(monkeypatch):
    real = s6_select.select_persons

    def failing_on_two(annotated, *args, **kwargs):
        if annotated.photo.record.photo_id == 2:
            raise ValueError("injected")
        return real(annotated, *args, **kwargs)

    monkeypatch.setattr(s6_select, "select_persons", failing_on_two)
    photos = [lite_scene(make_photo((300, 300), photo_id), 100, 50) for photo_id in (1, 2)]

    def build(pipeline):
        out = pipeline | beam.Create(photos) | SelectPersons()
        assert_that(out.main | beam.Map(lambda s: s.photo.record.photo_id), equal_to([1]), label="kept")
        assert_that(_error_summary(out.rejects), equal_to([("select", "2", "ValueError")]))

    assert _run(build)["select.error"] == 1


def test_crop_error_is_a_reject_and_other_photos_flow():
    def selected(photo_id, mask):
        photo = make_photo((300, 300), photo_id)
        person = Person(index=0, box=np.array([100, 50, 160, 200], np.float32), score=1.0,
                        mask=mask, keypoints=np.zeros((17, 3), np.float32))
        return SelectedPhoto(photo=photo, annotator="lite", persons=[person])

    mask = np.zeros((300, 300), bool)
    mask[50:200, 100:160] = True

    def build(pipeline):
        out = pipeline | beam.Create([selected(1, mask), selected(2, None)]) | CropPersons()
        assert_that(out.main | beam.Map(lambda s: s.key), equal_to(["1000"]), label="samples")
        assert_that(_error_summary(out.rejects), equal_to([("crop", "2", "AttributeError")]))

    assert _run(build)["crop.error"] == 1


def test_split_error_is_a_reject_and_other_samples_flow():
    broken = make_sample(2, with_embeddings=False, user_nsid="")
    # neither a user nor a photo id to hash
    broken = dataclasses.replace(broken, record=dataclasses.replace(broken.record, photo_id=None))

    def build(pipeline):
        out = (pipeline | beam.Create([make_sample(1, with_embeddings=False), broken])
               | AssignSplit(by="user_nsid"))
        assert_that(out.main | beam.Map(lambda s: s.key), equal_to(["1000"]), label="split")
        assert_that(out.rejects | beam.Map(lambda r: (r.stage, r.reason, r.detail.split(":")[0])),
                    equal_to([("split", "error", "TypeError")]))

    assert _run(build)["split.error"] == 1
