"""The fdh cascade as one step (`cascade.CascadeFn`, local runs) against the RunInference cascade.

Random-weight torchvision models at tiny sizes, no CSE (detectron2 is not installed here): the
two forms must give the same AnnotatedPhotos, rejects and counters; a local fdh rebuild the same
shards; and a local rebuild's graph must have no multi-input Flatten of AnnotatedPhotos (the
in-process runner holds such a Flatten's inputs whole).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs import rebuild
from beam_jobs.common import make_pipeline, read_counters
from tests.test_annotate_fdh import TINY, _photo
from transforms.records import AnnotatedPhoto, Detections
from transforms.s5_annotate import Annotate
from transforms.s5_annotate import cascade
from transforms.s5_annotate.cascade import CascadeFn

FLATTEN_URN = "beam:transform:flatten:v1"
ARRAY_FIELDS = ("boxes", "scores", "masks", "keypoints", "vertices")


def _digest(dets: Detections | None) -> list | None:
    if dets is None:
        return None
    arrays = [getattr(dets, name) for name in ARRAY_FIELDS]
    return [None if a is None else [str(a.dtype), list(a.shape), hashlib.sha256(a.tobytes()).hexdigest()]
            for a in arrays]


def _fingerprint(annotated: AnnotatedPhoto) -> str:
    """Everything an AnnotatedPhoto carries, as one JSON line (array bytes hashed)."""
    return json.dumps([annotated.photo.record.photo_id, annotated.annotator,
                       _digest(annotated.keypoint_dets), _digest(annotated.mask_dets),
                       _digest(annotated.cse_dets)])


def _annotate(tmp_path, name: str, one_step: bool, max_batch_size: int, person_score: float):
    """(sorted fingerprints, sorted rejects, fdh counters) of an fdh Annotate on fixed photos."""
    photos = [_photo(1, 64, 96, 1), _photo(2, 120, 80, 2), _photo(3, 100, 100, 3), _photo(5, 72, 60, 5)]
    bad = dataclasses.replace(_photo(4, 50, 50), image=np.zeros((50, 50), np.uint8))
    pipeline = make_pipeline(PipelineOptions([]))
    outputs = pipeline | beam.Create(photos[:2] + [bad] + photos[2:]) | Annotate(
        annotator="fdh", no_embeddings=True, random_weights=True, max_batch_size=max_batch_size,
        person_score=person_score, min_box_area=0, one_step=one_step,
        model_options=dict(TINY, mask_model="maskrcnn_resnet50_fpn"))
    _ = (outputs.main | "Fingerprint" >> beam.Map(_fingerprint)
         | "WriteMain" >> beam.io.WriteToText(str(tmp_path / f"{name}-main"), shard_name_template=""))
    _ = (outputs.rejects | "RejectJson" >> beam.Map(lambda r: json.dumps(dataclasses.asdict(r)))
         | "WriteRejects" >> beam.io.WriteToText(str(tmp_path / f"{name}-rejects"), shard_name_template=""))
    result = pipeline.run()
    result.wait_until_finish()
    lines = {part: sorted((tmp_path / f"{name}-{part}").read_text().splitlines()) for part in ("main", "rejects")}
    return lines["main"], lines["rejects"], read_counters(result)


@pytest.mark.pipeline
@pytest.mark.slow
@pytest.mark.parametrize("person_score", [0.0, float("inf")], ids=["all_dense", "all_skipped"])
def test_one_step_gives_what_the_runinference_cascade_gives(tmp_path, person_score):
    cascade = _annotate(tmp_path, "cascade", one_step=False, max_batch_size=1, person_score=person_score)
    one_step = _annotate(tmp_path, "one_step", one_step=True, max_batch_size=1, person_score=person_score)
    main, rejects, counters = cascade
    assert len(main) == 4 and [json.loads(r)["reason"] for r in rejects] == ["model_error"]
    assert counters["annotate.photos"] == 4 and counters["annotate.model_error"] == 1
    skipped = 4 if person_score == float("inf") else 0
    assert counters.get("annotate.cascade_skipped", 0) == skipped
    assert one_step == cascade


@pytest.mark.pipeline
@pytest.mark.slow
def test_one_step_batches_per_bundle_and_isolates_a_bad_image(tmp_path):
    """max_batch_size=3 over 5 photos: a full batch in process(), the rest in finish_bundle
    (windowed outputs); the bad image fails alone, its batch-mates are annotated."""
    main, rejects, counters = _annotate(tmp_path, "batched", one_step=True, max_batch_size=3, person_score=0.0)
    assert [json.loads(line)[0] for line in main] == [1, 2, 3, 5]
    assert [(json.loads(r)["photo_id"], json.loads(r)["reason"]) for r in rejects] == [(4, "model_error")]
    assert counters["annotate.photos"] == 4 and counters["annotate.model_error"] == 1


class _FailingHandler:
    """A handler whose whole batch call raises (not image by image)."""

    def run_inference(self, batch, model):
        raise RuntimeError("device lost")


def test_a_failing_batch_becomes_one_reject_per_photo():
    annotate = Annotate(annotator="fdh", no_embeddings=True, random_weights=True, max_batch_size=2)
    fn = CascadeFn(annotate._fdh_settings())
    fn._steps = [cascade._LoadedModel(_FailingHandler(), None, cascade.AttachKeypointsFn(0.0, 0, True))]
    fn.start_bundle()
    outputs = [*fn.process(_photo(1, 40, 40)), *fn.process(_photo(2, 40, 40)), *fn.finish_bundle()]
    assert [(o.tag, o.value.photo_id, o.value.reason) for o in outputs] == [
        ("rejects", 1, "error"), ("rejects", 2, "error")]
    assert "device lost" in outputs[0].value.detail


def test_single_dofn_is_the_one_step_cascade_only_when_asked():
    options = dict(annotator="fdh", no_embeddings=True, random_weights=True)
    assert Annotate(**options).single_dofn() is None  # Dataflow: RunInference per model
    fn = Annotate(**options, one_step=True, max_batch_size=6).single_dofn()
    assert isinstance(fn, CascadeFn) and fn._batch_size == 6  # batches inside the store's step


def test_one_step_checks_the_weights_at_construction(tmp_path):
    annotate = Annotate(annotator="fdh", no_embeddings=True, model_dir=str(tmp_path), one_step=True)
    from transforms import assets

    with pytest.raises(assets.AssetMissingError):
        annotate.single_dofn()  # the annotation store's path: no expand() to check in


# --- the rebuild job -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from beam_jobs import demo

    return demo.build_sample(str(tmp_path_factory.mktemp("sample")))


def _rebuild_args(sample, output, *extra) -> list[str]:
    yfcc, mirror = sample
    return [f"--yfcc={yfcc}", f"--output={output}", f"--image_source=mirror:{mirror}",
            "--annotator=fdh", "--no_embeddings", "--random_weights", "--max_batch_size=1",
            "--crawl_time=1637341702.1145487", "--max_reject_rate=none", *extra]


def _annotated_flattens(proto) -> list[str]:
    """Names of the multi-input Flattens whose output reaches SelectPersons (AnnotatedPhotos)."""
    from tests.dataflow_proto import leaf_transforms

    consumers: dict[str, list] = {}
    for _, transform in leaf_transforms(proto):
        for pcoll in transform.inputs.values():
            consumers.setdefault(pcoll, []).append(transform)

    def reaches_select(pcoll: str, seen: set) -> bool:
        for consumer in consumers.get(pcoll, []):
            if "SelectPersons" in consumer.unique_name:
                return True
            if consumer.unique_name not in seen and consumer.spec.urn == FLATTEN_URN:
                seen.add(consumer.unique_name)
                if any(reaches_select(out, seen) for out in consumer.outputs.values()):
                    return True
        return False

    return sorted(transform.unique_name for _, transform in leaf_transforms(proto)
                  if transform.spec.urn == FLATTEN_URN and len(transform.inputs) > 1
                  and any(reaches_select(out, set()) for out in transform.outputs.values()))


@pytest.mark.pipeline
@pytest.mark.parametrize("store", [[], ["--annotation_store=none"]], ids=["store", "no_store"])
def test_a_local_fdh_rebuild_has_no_flatten_of_annotated_photos(sample, tmp_path, store):
    from tests.dataflow_proto import build_rebuild_proto

    local = build_rebuild_proto(_rebuild_args(sample, tmp_path / "local", *store))
    assert _annotated_flattens(local) == []
    assert any("FdhCascade" in t.unique_name or "StoreOrAnnotate" in t.unique_name
               for t in local.components.transforms.values())
    remote = build_rebuild_proto(_rebuild_args(sample, tmp_path / "remote", *store, "--runner=PrismRunner"))
    assert _annotated_flattens(remote) != []  # the RunInference cascade, kept off the local runner
    assert any(t.unique_name.endswith("/KeypointRCNN") for t in remote.components.transforms.values())


def _shard_bytes(output) -> dict:
    import glob
    import os

    return {os.path.relpath(path, output): open(path, "rb").read()
            for path in sorted(glob.glob(f"{output}/*/*/out-*.*"))}


def _store_entries(output) -> dict:
    from dataset import annotations as store_format

    entries = {}
    for directory in store_format.model_dirs(store_format.default_store(str(output))):
        for path in store_format.part_paths(directory):
            entries.update({(directory.rsplit("/", 1)[1], *key): entry
                            for key, entry in store_format.read_entries(path).items()})
    return entries


def _tiny_annotate(**kwargs) -> Annotate:
    """`Annotate` as rebuild builds it, at tiny model sizes (2 shared CPUs)."""
    return Annotate(**kwargs, model_options=dict(TINY, mask_model="maskrcnn_resnet50_fpn"))


@pytest.mark.pipeline
@pytest.mark.slow
def test_a_local_fdh_rebuild_writes_the_same_outputs_either_way(sample, tmp_path, monkeypatch):
    """Same stats, shards and stored annotations (payload bytes) from the one-step cascade
    (what a local rebuild runs) and the RunInference cascade. Random weights keep nobody, so the
    shards are empty here: the stored annotations are what carries the comparison."""
    monkeypatch.setattr(rebuild, "Annotate", _tiny_annotate)
    one_step = rebuild.run(_rebuild_args(sample, tmp_path / "one_step"))
    # the RunInference cascade (the Dataflow form), run locally
    monkeypatch.setattr(rebuild, "Annotate", lambda **kwargs: _tiny_annotate(**{**kwargs, "one_step": False}))
    cascade_run = rebuild.run(_rebuild_args(sample, tmp_path / "cascade"))
    assert one_step["funnel"] == cascade_run["funnel"] and one_step["funnel"]["funnel.annotated"] == 5
    assert _shard_bytes(tmp_path / "one_step") == _shard_bytes(tmp_path / "cascade")
    entries = _store_entries(tmp_path / "one_step")
    assert len(entries) == 5 and entries == _store_entries(tmp_path / "cascade")
