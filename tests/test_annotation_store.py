"""The annotation store: lossless codec, resume and re-derive through real Beam pipelines with the
lite (mediapipe) annotator, takedown without a trace, verify and stats."""
from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import pytest
import skimage.data

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from beam_jobs.common import make_pipeline, read_counters
from dataset import annotations as store_format
from tests.factories import make_record
from transforms.annotation_store import AnnotateWithStore, annotate_versions, check_store_has
from transforms.records import DecodedImage
from transforms.s5_annotate import Annotate
from transforms.s6_select import SelectPersons
from transforms.s7_crop import CropPersons
from transforms.s8_write.encode import encode_sample

RNG = np.random.default_rng(7)


def _decoded(photo_id: int, image: np.ndarray, user: str = "12345678@N00") -> DecodedImage:
    return DecodedImage(record=make_record(photo_id, user_nsid=user), image=image,
                        sha256=hashlib.sha256(image.tobytes()).hexdigest(),
                        original_size=(image.shape[1], image.shape[0]))


def _photos() -> list[DecodedImage]:
    """Two people (one per user), a photo with nobody, and one the model rejects (grayscale)."""
    return [_decoded(1, skimage.data.astronaut(), "userA@N00"),
            _decoded(2, skimage.data.coffee(), "userA@N00"),
            _decoded(3, np.ascontiguousarray(skimage.data.astronaut()[:, ::-1]), "userB@N00"),
            _decoded(4, skimage.data.camera(), "userB@N00")]


class _SaveSample(beam.DoFn):
    """Write each sample's encoded members' digest to DIR/<key> (a real file per sample)."""

    def __init__(self, directory: str):
        self._directory = directory

    def process(self, sample):
        members = encode_sample(dataclasses.replace(sample, split="train"), no_embeddings=True)
        digest = hashlib.sha256(b"".join(
            k.encode() + (v if isinstance(v, bytes) else v.encode()) for k, v in sorted(members.items())))
        with open(os.path.join(self._directory, sample.key), "w") as handle:
            handle.write(digest.hexdigest())


def _run(photos, store: str, samples_dir: str, annotate) -> dict[str, int]:
    """photos -> AnnotateWithStore -> select -> crop -> encode (digests in samples_dir); counters."""
    os.makedirs(samples_dir, exist_ok=True)
    versions = annotate_versions(Annotate(annotator="lite"))
    pipeline = make_pipeline(PipelineOptions([]))
    annotated = (pipeline | beam.Create(photos, reshuffle=False)
                 | "AnnotateWithStore" >> AnnotateWithStore(annotate, store, versions))
    cropped = (annotated.main | SelectPersons()).main | CropPersons()
    _ = cropped.main | beam.ParDo(_SaveSample(samples_dir))
    _ = annotated.rejects | beam.Map(
        lambda r, d=samples_dir: open(os.path.join(d, f"reject-{r.photo_id}"), "w").write(r.reason))
    result = pipeline.run()
    result.wait_until_finish()
    return read_counters(result)


def _tree(directory: str) -> dict[str, str]:
    return {name: open(os.path.join(directory, name)).read() for name in sorted(os.listdir(directory))}


def test_planes_round_trip_bool_and_int16_losslessly():
    masks = RNG.random((3, 37, 53)) > 0.7
    masks[1] = False
    masks[2, :10] = False
    vertices = np.where(masks, RNG.integers(0, 27554, masks.shape), 0).astype(np.int16)
    for planes in (masks, vertices, np.zeros((0, 5, 6), bool)):
        parts = store_format.encode_planes(planes)
        back = store_format.decode_planes(parts["boxes"], parts["data"], planes.shape[1], planes.shape[2],
                                          planes.dtype)
        assert back.dtype == planes.dtype and np.array_equal(back, planes)
    assert store_format.encode_planes(masks)["boxes"][1].tolist() == [0, 0, 0, 0]


def test_packed_arrays_round_trip_and_are_deterministic():
    arrays = {"b.x": np.arange(5, dtype=np.float32), "a.y": np.array("<i2"), "c": np.zeros((2, 0), bool)}
    blob = store_format.pack_arrays(arrays)
    assert blob == store_format.pack_arrays(dict(reversed(list(arrays.items()))))
    back = store_format.unpack_arrays(blob)
    assert sorted(back) == sorted(arrays)
    for name in arrays:
        assert back[name].dtype == arrays[name].dtype and np.array_equal(back[name], arrays[name])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One lite run through the store (all misses) and a second one (all hits)."""
    root = tmp_path_factory.mktemp("store")
    store = str(root / "annotations")
    first = _run(_photos(), store, str(root / "first"), Annotate(annotator="lite"))
    second = _run(_photos(), store, str(root / "second"), Annotate(annotator="lite"))
    return root, store, first, second


@pytest.mark.model
def test_second_run_hits_every_photo_with_no_model_call_and_same_bytes(full_run):
    root, _, first, second = full_run
    assert first["annotate.store_miss"] == 4 and "annotate.store_hit" not in first
    assert first["annotate.photos"] == 3 and first["annotate.model_error"] == 1
    assert first["annotate.store_written"] == 4  # three annotated + the reject
    assert second["annotate.store_hit"] == 4 and "annotate.store_miss" not in second
    assert "annotate.photos" not in second  # the model never ran
    assert second["annotate.model_error"] == 1  # the stored reject comes out again
    samples = _tree(str(root / "first"))
    assert {"1000", "3000", "reject-4"} <= set(samples) and samples["reject-4"] == "model_error"
    assert samples == _tree(str(root / "second"))


@pytest.mark.model
def test_rederive_from_the_store_alone_is_byte_identical(full_run, tmp_path):
    root, store, _, _ = full_run
    changed = _decoded(5, skimage.data.astronaut()[::2, ::2].copy())
    counters = _run(_photos() + [changed], store, str(tmp_path / "rederived"), annotate=None)
    assert counters["annotate.store_hit"] == 4 and counters["annotate.store_miss"] == 1
    assert "annotate.photos" not in counters
    rederived = _tree(str(tmp_path / "rederived"))
    assert rederived.pop("reject-5") == "not_in_store"
    assert rederived == _tree(str(root / "first"))


@pytest.mark.model
def test_a_killed_run_keeps_its_finished_entries(tmp_path):
    store = str(tmp_path / "annotations")
    half = _run(_photos()[:2], store, str(tmp_path / "half"), Annotate(annotator="lite"))
    rest = _run(_photos(), store, str(tmp_path / "all"), Annotate(annotator="lite"))
    assert half["annotate.store_miss"] == 2
    assert rest["annotate.store_hit"] == 2 and rest["annotate.store_miss"] == 2
    assert rest["annotate.photos"] + rest["annotate.model_error"] == 2


@pytest.mark.model
def test_takedown_leaves_no_trace_and_verify_and_stats_see_the_store(tmp_path):
    store = str(tmp_path / "annotations")
    _run(_photos(), store, str(tmp_path / "run"), Annotate(annotator="lite"))
    assert store_format.verify_store(store) == []
    stats = store_format.store_stats(store)
    (model,) = stats["models"].values()
    assert (model["entries"], model["annotated"], model["rejected"]) == (4, 3, 1)
    assert model["versions"]["annotator"] == "lite" and model["bytes"] > 0
    before = {p: open(p, "rb").read() for p in _parts(store)}

    result = store_format.remove_entries(store, user_nsids=["userB@N00"], photo_ids=[1])
    assert result["entries_removed"] == 3
    after = _parts(store)
    assert not set(after) & {p for p in before if b"userB@N00" in before[p]}  # old files are gone
    for path in after:
        table = store_format.read_table(path)
        assert table.column("photo_id").to_pylist() == [2]
        assert b"userB@N00" not in open(path, "rb").read()
    assert store_format.verify_store(store) == []
    assert next(iter(store_format.store_stats(store)["models"].values()))["entries"] == 1


def test_verify_reports_a_tampered_part_file(tmp_path):
    directory = store_format.ensure_models_file(str(tmp_path), {"annotator": "lite"})
    entry = store_format.Entry(photo_id=9, sha256="ab", user_nsid="u", height=1, width=1,
                               annotator="lite", status=store_format.REJECTED, reason="model_error")
    path = store_format.write_part(directory, [entry])
    assert store_format.verify_store(str(tmp_path)) == []
    with open(path, "ab") as handle:
        handle.write(b"x")
    (problem,) = store_format.verify_store(str(tmp_path))
    assert "does not match its name" in problem


def test_rederive_from_a_store_without_these_models_is_a_clear_error(tmp_path):
    store_format.ensure_models_file(str(tmp_path), {"annotator": "fdh"})
    with pytest.raises(ValueError, match="holds no annotations of these models"):
        check_store_has(str(tmp_path), {"annotator": "lite"})


def _parts(store: str) -> list[str]:
    return [p for d in store_format.model_dirs(store) for p in store_format.part_paths(d)]


def _store_entry(photo_id: int, user: str) -> store_format.Entry:
    return store_format.Entry(photo_id=photo_id, sha256=f"{photo_id:064x}", user_nsid=user, height=2, width=2,
                              annotator="lite", status=store_format.REJECTED, reason="model_error")


def test_takedown_verify_and_stats_jobs_cover_the_default_store(dataset, capsys):
    from beam_jobs import stats, takedown, verify
    from tests.jobs_dataset import OTHER, VICTIM

    store = store_format.default_store(str(dataset))
    directory = store_format.ensure_models_file(store, {"annotator": "lite"})
    store_format.write_part(directory, [_store_entry(1001, VICTIM), _store_entry(2001, OTHER)])
    store_format.write_part(directory, [_store_entry(2002, OTHER)])
    assert verify.run([f"--dataset={dataset}"])["ok"]
    stats.run([f"--dataset={dataset}"])
    assert "3 entries (0 annotated, 3 rejected), 2 files" in capsys.readouterr().out

    report = takedown.run([f"--dataset={dataset}", f"--user_nsid={VICTIM}"])
    assert report["annotation_store"] == {"entries_removed": 1, "files_rewritten": 1}
    left = [row for p in _parts(store) for row in store_format.read_table(p).to_pylist()]
    assert sorted(r["photo_id"] for r in left) == [2001, 2002]
    assert not any(VICTIM.encode() in open(p, "rb").read() for p in _parts(store))
    assert verify.run([f"--dataset={dataset}"])["ok"]

    store_format.write_part(directory, [_store_entry(1002, VICTIM)])  # e.g. a stale writer
    report = verify.run([f"--dataset={dataset}"])
    assert not report["ok"]
    assert any("opted-out photos [1002]" in p for p in report["problems"])


def test_with_annotation_store_picks_the_store_the_flags_name(tmp_path):
    from transforms.annotation_store import NO_STORE, with_annotation_store

    lite = Annotate(annotator="lite")
    assert with_annotation_store(lite, str(tmp_path), NO_STORE) is lite
    default = with_annotation_store(lite, str(tmp_path))
    assert default._annotate is lite
    assert default._directory.startswith(store_format.default_store(str(tmp_path)) + "/")
    with pytest.raises(ValueError, match="it holds: nothing"):
        with_annotation_store(lite, str(tmp_path), from_annotations=str(tmp_path / "empty"))
    store_format.ensure_models_file(str(tmp_path / "shared"), annotate_versions(lite))
    rederive = with_annotation_store(lite, str(tmp_path), from_annotations=str(tmp_path / "shared"))
    assert rederive._annotate is None


def _rebuild_has_store_flags() -> bool:
    import argparse

    from beam_jobs import rebuild

    parser = argparse.ArgumentParser()
    rebuild.RebuildOptions._add_argparse_args(parser)
    return {"annotation_store", "from_annotations"} <= set(vars(parser.parse_args([])))


@pytest.mark.pipeline
@pytest.mark.skipif(not _rebuild_has_store_flags(),
                    reason="rebuild.py does not wire --annotation_store / --from_annotations yet")
def test_rebuild_resumes_and_rederives_through_the_store(tmp_path):
    import glob

    from beam_jobs import demo, rebuild

    yfcc, mirror = demo.build_sample(str(tmp_path / "sample"))

    def run(output, *extra):
        return rebuild.run([f"--yfcc={yfcc}", f"--output={output}", f"--image_source=mirror:{mirror}",
                            "--annotator=lite", "--crawl_time=1637341702.1145487", *extra])

    def shards(output):
        return {os.path.relpath(p, output): open(p, "rb").read()
                for p in sorted(glob.glob(f"{output}/*/*/out-*.*"))}

    full = str(tmp_path / "full")
    run(full)
    store = store_format.default_store(full)
    parts = _parts(store)
    assert parts and store_format.verify_store(store) == []
    run(full)  # every photo hits: no new part file
    assert _parts(store) == parts

    subset, rederived = str(tmp_path / "by"), str(tmp_path / "by_rederived")
    run(subset, "--licenses=cc-by-2", "--annotation_store=none")
    stats = run(rederived, "--licenses=cc-by-2", f"--from_annotations={store}")
    assert shards(rederived) == shards(subset) and stats["totals"]["samples"] > 0
    assert open(f"{rederived}/manifest.json", "rb").read() == open(f"{subset}/manifest.json", "rb").read()
    assert not glob.glob(f"{subset}/annotations/*") and not glob.glob(f"{rederived}/annotations/*")
