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
    arrays = {"b.x": np.arange(5, dtype=np.float32), "a.y": np.array("<i2"), "c": np.zeros((2, 0), bool),
              "d.f": np.asfortranarray(np.arange(12, dtype=">i4").reshape(3, 4)), "e": np.arange(3) > 0}
    blob = store_format.pack_arrays(arrays)
    assert blob == store_format.pack_arrays(dict(reversed(list(arrays.items()))))
    back = store_format.unpack_arrays(blob)
    assert sorted(back) == sorted(arrays)
    for name in arrays:
        assert back[name].dtype == arrays[name].dtype and np.array_equal(back[name], arrays[name])
        assert back[name].flags.writeable
    objects = store_format.pack_arrays({"o": np.zeros(2, np.int8)}).replace(b"'|i1'", b"'|O' ")
    with pytest.raises(ValueError, match="no pickles"):
        store_format.unpack_arrays(objects)


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


# ---- the index and the re-derive's trust rule (photos whose stored result yields no sample) ----

def _entry(photo_id: int, sha: str, status: str = store_format.ANNOTATED, detections: int = 1,
           height: int = 40, width: int = 30) -> store_format.Entry:
    return store_format.Entry(photo_id=photo_id, sha256=sha * 64, user_nsid="u@N00", height=height, width=width,
                              annotator="lite", status=status, detections=detections,
                              reason="model_error" if status == store_format.REJECTED else "")


def _write_part_without_detections(directory: str, entries: list) -> str:
    """A part file as written before the `detections` column existed."""
    data = store_format.table_bytes(store_format.entries_table(entries).drop(["detections"]))
    path = os.path.join(directory, store_format.part_name(data))
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def test_index_point_lookups_by_photo_id_and_sha(tmp_path):
    directory = store_format.ensure_models_file(str(tmp_path), {"annotator": "lite"})
    first = store_format.write_part(directory, [_entry(7, "a", detections=0), _entry(3, "b")])
    second = store_format.write_part(directory, [_entry(7, "c", height=9), _entry(3, "b"), _entry(5, "d")])
    old = _write_part_without_detections(directory, [_entry(11, "e", detections=0)])
    index = store_format.read_index(directory)
    assert len(index) == 5  # (3, b) is in two files: counted once
    assert [row.sha256[0] for row in index.rows_of(7)] == ["a", "c"]
    assert index.find(7, "c" * 64).height == 9 and index.find(7, "x" * 64) is None
    assert index.find(3, "b" * 64).part == min(first, second)  # the first file in path order wins
    row = index.find(7, "c" * 64)
    assert store_format.entry_at(store_format.read_table(row.part), row.row) == _entry(7, "c", height=9)
    assert (5, "d" * 64) in index and (6, "d" * 64) not in index and index.rows_of(6) == []
    assert index.find(7, "a" * 64).yields_no_sample and not index.find(5, "d" * 64).yields_no_sample
    assert index.find(11, "e" * 64).detections == -1  # unknown in an old file: not trusted
    assert not index.find(11, "e" * 64).yields_no_sample
    assert store_format.read_entries(old)[(11, "e" * 64)].detections == -1
    assert len(store_format.read_index(str(tmp_path / "missing"))) == 0


def test_precheck_trusts_only_a_sole_entry_that_yields_no_sample(tmp_path):
    from transforms.annotation_store import PrecheckStore
    from transforms.records import StoredPhoto
    from transforms.s4_decode import DecodeImages

    directory = store_format.ensure_models_file(str(tmp_path), {"annotator": "lite"})
    store_format.write_part(directory, [
        _entry(1, "a", store_format.REJECTED, detections=0),   # annotate reject: trusted
        _entry(2, "b", detections=0, height=480, width=640),   # nobody detected: trusted
        _entry(3, "c", detections=2),                          # people: fetched
        _entry(4, "d", detections=0), _entry(4, "e", detections=0)])  # which file is current? fetched
    _write_part_without_detections(directory, [_entry(6, "f", detections=0)])  # unknown: fetched
    out = tmp_path / "out"
    out.mkdir()
    pipeline = make_pipeline(PipelineOptions([]))
    checked = (pipeline | beam.Create([make_record(i) for i in range(1, 7)], reshuffle=False)
               | PrecheckStore(directory))
    decoded = (checked | beam.Filter(lambda e: isinstance(e, StoredPhoto)) | DecodeImages()).main
    _ = checked | beam.Map(lambda e, d=str(out): open(os.path.join(d, str(e.record.photo_id if isinstance(
        e, StoredPhoto) else e.photo_id)), "w").write(type(e).__name__))
    _ = decoded | beam.Map(lambda p, d=str(out): open(os.path.join(d, f"decoded-{p.record.photo_id}"), "w").write(
        f"{p.image.shape} {p.image.strides} {p.sha256[:1]} {p.original_size}"))
    result = pipeline.run()
    result.wait_until_finish()
    assert _tree(str(out)) == {
        "1": "StoredPhoto", "2": "StoredPhoto", "3": "YfccRecord", "4": "YfccRecord", "5": "YfccRecord",
        "6": "YfccRecord",
        "decoded-1": "(40, 30, 3) (0, 0, 1) a (30, 40)",  # a stand-in: no pixels, the stored size
        "decoded-2": "(480, 640, 3) (0, 0, 1) b (640, 480)"}
    assert read_counters(result)["annotate.store_not_fetched"] == 2


@pytest.fixture(scope="module")
def demo_rebuild(tmp_path_factory):
    """The demo sample rebuilt with the lite annotator into FULL (its store: FULL/annotations)."""
    from beam_jobs import demo, rebuild

    root = tmp_path_factory.mktemp("demo_rebuild")
    yfcc, mirror = demo.build_sample(str(root / "sample"))

    def run(output, *extra, mirror=mirror):
        return rebuild.run([f"--yfcc={yfcc}", f"--output={output}", f"--image_source=mirror:{mirror}",
                            "--annotator=lite", "--crawl_time=1637341702.1145487", *extra])

    full = str(root / "full")
    run(full)
    return run, full, mirror


def _reasons(output: str) -> dict[int, set[str]]:
    import pandas as pd

    rejects = pd.read_parquet(os.path.join(output, "rejects"))
    found: dict[int, set[str]] = {}
    for photo_id, stage, reason in zip(rejects.photo_id, rejects.stage, rejects.reason):
        if photo_id is not None and not pd.isna(photo_id):
            found.setdefault(int(photo_id), set()).add(f"{stage}.{reason}")
    return found


def _outputs(output: str) -> dict[str, bytes]:
    import glob

    paths = sorted(glob.glob(f"{output}/*/*/out-*.*")) + [f"{output}/manifest.json", f"{output}/stats.json"]
    return {os.path.relpath(p, output): open(p, "rb").read() for p in paths}


COFFEE, CHELSEA, ASTRONAUT, HOPPER = 9000004, 9000005, 9000001, 9000002  # demo photos (no person: 4, 5)


@pytest.mark.pipeline
@pytest.mark.skipif(not _rebuild_has_store_flags(), reason="rebuild.py does not wire the store flags")
def test_rederive_skips_fetching_stored_no_sample_photos_with_the_same_outputs(demo_rebuild, tmp_path):
    import shutil

    from beam_jobs.demo import mirror_path
    from transforms.funnel import accounting_errors

    run, full, mirror = demo_rebuild
    store = store_format.default_store(full)
    rederived = str(tmp_path / "rederived")
    run(rederived, f"--from_annotations={store}")
    assert _outputs(rederived) == _outputs(full)  # shards, manifest and stats.json (funnel) alike

    # Coffee (nobody) and the astronaut (a person) vanish from the mirror: the coffee's stored
    # result is trusted without a fetch, the astronaut is fetched, found missing, and not re-derived.
    copy = str(tmp_path / "mirror")
    shutil.copytree(mirror, copy)
    records = {r.photo_id: r for r in _demo_records()}
    for photo_id in (COFFEE, ASTRONAUT):
        os.remove(mirror_path(copy, records[photo_id].photo_hash))
    gone = str(tmp_path / "gone")
    stats = run(gone, f"--from_annotations={store}", mirror=copy)
    reasons = _reasons(gone)
    assert reasons[COFFEE] == {"select.no_person"} and reasons[CHELSEA] == {"select.no_person"}
    assert reasons[ASTRONAUT] == {"fetch.not_found"}
    assert accounting_errors(stats["funnel"]) == []
    assert stats["totals"]["samples"] == json_samples(full) - 1

    fetch_all = str(tmp_path / "fetch_all")
    stats = run(fetch_all, f"--from_annotations={store}", "--rederive_fetch_all", mirror=copy)
    assert _reasons(fetch_all)[COFFEE] == {"fetch.not_found"}
    assert {k: v for k, v in _outputs(fetch_all).items() if k != "stats.json"} == {
        k: v for k, v in _outputs(gone).items() if k != "stats.json"}  # the same samples either way
    assert accounting_errors(stats["funnel"]) == []


@pytest.mark.pipeline
@pytest.mark.skipif(not _rebuild_has_store_flags(), reason="rebuild.py does not wire the store flags")
def test_rederive_never_rederives_an_opted_out_user_or_photo(demo_rebuild, tmp_path):
    from transforms.funnel import accounting_errors

    run, full, _ = demo_rebuild
    opt_out = tmp_path / "opt_out.txt"
    records = {r.photo_id: r for r in _demo_records()}
    opt_out.write_text(f"user:{records[CHELSEA].user_nsid}\nphoto:{COFFEE}\nphoto:{HOPPER}\n")
    output = str(tmp_path / "opted_out")
    stats = run(output, f"--from_annotations={store_format.default_store(full)}", f"--opt_out={opt_out}")
    reasons = _reasons(output)
    assert reasons[CHELSEA] == {"prefilter.user_opt_out"}  # stored no-person: still never looked up
    assert reasons[COFFEE] == {"prefilter.photo_opt_out"} and reasons[HOPPER] == {"prefilter.photo_opt_out"}
    assert stats["totals"]["samples"] == json_samples(full) - 1  # Grace Hopper's sample is gone
    assert accounting_errors(stats["funnel"]) == []


def _demo_records():
    from beam_jobs.demo import SAMPLE_PHOTOS, sample_record

    return [sample_record(photo, i) for i, photo in enumerate(SAMPLE_PHOTOS)]


def json_samples(output: str) -> int:
    import json

    with open(os.path.join(output, "stats.json")) as handle:
        return json.load(handle)["totals"]["samples"]


class _PairsFn(beam.DoFn):
    """A batching annotate DoFn (two photos per batch): even photo ids annotated with no
    detection, odd ones rejected; the last partial batch comes out of finish_bundle."""

    def start_bundle(self):
        self._batch = []

    def process(self, photo):
        self._batch.append(photo)
        if len(self._batch) == 2:
            yield from self._flush()

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows
        for output in self._flush():
            tag = getattr(output, "tag", None)
            yield (GlobalWindows.windowed_value(output) if tag is None
                   else beam.pvalue.TaggedOutput(tag, GlobalWindows.windowed_value(output.value)))

    def _flush(self):
        from transforms.records import AnnotatedPhoto, Detections
        from transforms.rejects import reject
        batch, self._batch = self._batch, []
        for photo in batch:
            record = photo.record
            if record.photo_id % 2:
                yield reject("annotate", "no_person", str(record.photo_id), "",
                             record.photo_id, record.user_nsid)
            else:
                height, width = photo.image.shape[:2]
                yield AnnotatedPhoto(photo, "lite", Detections.empty_for_image(height, width))


def test_a_batching_annotate_dofn_inside_the_store_step_loses_nothing(tmp_path):
    from transforms.annotation_store import _LookupOrAnnotateFn
    image = np.zeros((20, 30, 3), np.uint8)
    photos = [_decoded(photo_id, image + photo_id) for photo_id in (10, 11, 12, 13, 14)]
    versions = {"annotator": "lite", "test": "pairs"}
    directory = store_format.model_dir(str(tmp_path), store_format.model_key(versions))
    fn = _LookupOrAnnotateFn(directory, versions, _PairsFn())
    fn.setup()
    fn.start_bundle()
    outputs = [output for photo in photos for output in fn.process(photo)]
    outputs += [getattr(output, "value", output) for output in fn.finish_bundle()]
    values = [getattr(output, "value", output) for output in outputs]
    assert sorted(getattr(value, "photo_id", None) or value.photo.record.photo_id
                  for value in values) == [10, 11, 12, 13, 14]  # 14 came out of finish_bundle
    index = store_format.read_index(directory)
    for photo in photos:  # each under its own photo's sha256, the rejects too
        assert index.find(photo.record.photo_id, photo.sha256) is not None
