"""End-to-end runs of `beam_jobs.rebuild` on the built-in sample (real photos, real mediapipe
models, real Beam pipelines on the in-process runner, a real local mirror)."""
from __future__ import annotations

import glob
import io
import json
import os
import subprocess

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from beam_jobs import demo, rebuild
from beam_jobs.common import UsageError, split_job_flags
from tests.pipeline_graph import outputs_of
from transforms import s6_select, s7_crop
from transforms.funnel import accounting_errors
from transforms.records import CROP_HEIGHT, CROP_WIDTH

PEOPLE = {"9000001000", "9000002000", "9000003000"}  # astronaut, Grace Hopper, cameraman


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return demo.build_sample(str(tmp_path_factory.mktemp("sample")))


def _rebuild(sample, output, *extra):
    yfcc, mirror = sample
    return rebuild.run([f"--yfcc={yfcc}", f"--output={output}", f"--image_source=mirror:{mirror}",
                        "--annotator=lite", "--crawl_time=1637341702.1145487", *extra])


@pytest.fixture(scope="module")
def built(sample, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("out") / "dataset")
    return output, _rebuild(sample, output)


def _shard_bytes(output):
    return {os.path.relpath(path, output): open(path, "rb").read()
            for path in sorted(glob.glob(f"{output}/*/*/out-*.*"))}


@pytest.mark.pipeline
def test_lite_rebuild_keeps_the_people_and_accounts_for_every_line(built):
    output, stats = built
    funnel = stats["funnel"]
    assert accounting_errors(funnel) == []
    assert funnel["funnel.lines_read"] == len(demo.SAMPLE_PHOTOS) + 1  # + the malformed line
    assert funnel["read.bad_field_count"] == 1
    assert funnel["prefilter.license_not_allowed"] == 1  # the NoDerivs rocket
    assert funnel["prefilter.video"] == 1
    assert funnel["prefilter.no_cv_tag"] == 1
    assert funnel["fetch.not_found"] == 1
    assert funnel["select.no_person"] == 2  # coffee and the cat
    assert stats["totals"]["samples"] == 3
    assert set(stats["written"]) == {"cc-by-2", "cc-by-sa-2", "cc-by-nc-2"}

    rejects = pd.read_parquet(os.path.join(output, "rejects"))
    assert set(rejects[rejects.reason == "no_person"].record_id) == {"9000004", "9000005"}
    assert "image" not in " ".join(rejects.columns)  # rejects keep no image data


@pytest.mark.pipeline
def test_lite_rebuild_shards_load_like_deepprivacy2(built):
    output, _ = built
    urls = sorted(glob.glob(f"{output}/*/*/out-*.tar"))
    keys = set()
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("rgb8"):
        keys.add(sample["__key__"])
        image = sample["image.png"]
        assert image.shape == (CROP_HEIGHT, CROP_WIDTH, 3)
        assert image.dtype == np.uint8
        keypoints = sample["keypoints.npy"]
        assert keypoints.shape == (17, 3) and keypoints.dtype == np.float32
        visible = keypoints[:, 2] > 0
        assert visible.sum() >= 4
        assert (keypoints[visible, :2] >= 0).all() and (keypoints[visible, :2] <= 1).all()
        assert "vertices.npy" not in sample  # lite has no CSE: the no-embeddings variant
    assert keys == PEOPLE
    with open(os.path.join(output, "metadata.json")) as handle:
        metadata = json.load(handle)
    assert set(metadata) == PEOPLE
    assert {entry["user_nsid"] for entry in metadata.values()} == {
        "10000001@N01", "10000002@N02", "10000003@N03"}


@pytest.mark.pipeline
def test_astronaut_crop_centres_the_person(built):
    output, _ = built
    [shard] = glob.glob(f"{output}/cc-by-2/train/out-000000.tar")
    sample = next(iter(wds.WebDataset(shard, shardshuffle=False)))
    background = np.asarray(Image.open(io.BytesIO(sample["maskrcnn_mask.png"]))).astype(bool)
    person_columns = np.flatnonzero((~background).any(axis=0))
    centre = (person_columns.min() + person_columns.max()) / 2
    assert abs(centre - CROP_WIDTH / 2) < CROP_WIDTH * 0.2
    assert (~background).mean() > 0.2  # the astronaut fills a good part of her crop


@pytest.mark.pipeline
def test_rebuild_is_byte_identical_on_rerun_and_honours_the_opt_out_file(sample, built, tmp_path):
    output, _ = built
    again = str(tmp_path / "again")
    _rebuild(sample, again)
    assert _shard_bytes(again) == _shard_bytes(output)
    assert open(f"{again}/manifest.json", "rb").read() == open(f"{output}/manifest.json", "rb").read()

    # A takedown leaves OUTPUT/opt_out.txt behind: the next rebuild into that output honours it.
    with open(f"{again}/opt_out.txt", "w") as handle:
        handle.write("user:10000002@N02\nphoto:9000003\n")
    stats = _rebuild(sample, again)
    assert stats["totals"]["samples"] == 1
    assert stats["funnel"]["prefilter.user_opt_out"] == 1
    assert stats["funnel"]["prefilter.photo_opt_out"] == 1
    assert accounting_errors(stats["funnel"]) == []
    assert set(stats["written"]) == {"cc-by-2"}
    assert not glob.glob(f"{again}/cc-by-sa-2/*/out-*.tar")


@pytest.mark.pipeline
def test_licence_subset_flag(sample, tmp_path):
    stats = _rebuild(sample, str(tmp_path / "by"), "--licenses=cc-by-2")
    assert set(stats["written"]) == {"cc-by-2"}
    assert stats["funnel"]["prefilter.license_not_allowed"] == 4  # by-sa, by-nc, by-nc-sa, by-nd
    assert accounting_errors(stats["funnel"]) == []


@pytest.mark.pipeline
def test_errors_after_decode_are_rejects_and_the_funnel_still_balances(sample, tmp_path, monkeypatch):
    """An unexpected exception in select (one photo) and in crop (another) ends as 'select.error'
    and 'crop.error' rejects; the job completes and every line is still accounted for."""
    real_select, real_crop = s6_select.select_persons, s7_crop.make_sample

    def select_failing_on_hopper(annotated, *args, **kwargs):
        if annotated.photo.record.photo_id == 9000002:
            raise ValueError("injected select failure")
        return real_select(annotated, *args, **kwargs)

    def crop_failing_on_cameraman(photo, *args, **kwargs):
        if photo.record.photo_id == 9000003:
            raise ValueError("injected crop failure")
        return real_crop(photo, *args, **kwargs)

    monkeypatch.setattr(s6_select, "select_persons", select_failing_on_hopper)
    monkeypatch.setattr(s7_crop, "make_sample", crop_failing_on_cameraman)
    stats = _rebuild(sample, str(tmp_path / "errors"))
    funnel = stats["funnel"]
    assert funnel["select.error"] == 1 and funnel["crop.error"] == 1
    assert accounting_errors(funnel) == []
    assert stats["totals"]["samples"] == 1  # the astronaut
    rejects = pd.read_parquet(tmp_path / "errors" / "rejects")
    errors = rejects[rejects.reason == "error"]
    assert sorted(zip(errors.stage, errors.record_id)) == [("crop", "9000003"), ("select", "9000002")]
    assert all(detail.startswith("ValueError: injected") for detail in errors.detail)


@pytest.mark.pipeline
def test_manifest_records_the_whole_run_configuration(sample, built):
    output, _ = built
    yfcc, mirror = sample
    with open(f"{output}/manifest.json") as handle:
        config = json.load(handle)["config"]
    assert config["yfcc"] == yfcc and config["image_source"] == f"mirror:{mirror}"
    assert config["annotator"] == "lite" and config["no_embeddings"] is True
    assert config["licenses"] == "cc-by-2,cc-by-sa-2,cc-by-nc-2,cc-by-nc-sa-2"  # the default, spelled out
    for flag in ("model_dir", "val_fraction", "split_by", "opt_out", "random_weights",
                 "device", "fetch_threads", "crawl_time"):
        assert flag in config, flag
    assert "output" not in config  # a rebuild elsewhere gives the same manifest


def test_run_config_reads_the_flags_that_vars_does_not_show():
    options, _ = split_job_flags(rebuild.RebuildOptions, [
        "--yfcc=a.txt", "--output=out", "--annotator=lite", "--val_fraction=0.5", "--opt_out=o.txt"])
    assert "yfcc" not in vars(options)  # the values live in the job's own namespace
    config = rebuild.run_config(options)
    assert (config["yfcc"], config["annotator"], config["val_fraction"], config["opt_out"]) == (
        "a.txt", "lite", 0.5, "o.txt")
    assert config["licenses"] is None and config["split_by"] == "user_nsid"


@pytest.mark.pipeline
def test_fdh_annotator_without_detectron2_fails_before_running(sample, tmp_path):
    pytest.importorskip("torchvision")
    try:
        import detectron2  # noqa: F401
        pytest.skip("detectron2 is installed here")
    except ImportError:
        pass
    yfcc, mirror = sample
    with pytest.raises(ImportError, match="detectron2"):
        rebuild.run([f"--yfcc={yfcc}", f"--output={tmp_path / 'x'}",
                     f"--image_source=mirror:{mirror}", "--annotator=fdh"])
    assert not os.path.exists(tmp_path / "x" / "manifest.json")


@pytest.mark.pipeline
@pytest.mark.slow
def test_fdh_annotator_plumbing_with_random_weights(sample, tmp_path):
    """Random-weight torchvision models: proves the plumbing of the fdh path end to end, not the
    detections (random weights find nobody, or nonsense)."""
    yfcc, mirror = sample
    stats = rebuild.run([f"--yfcc={yfcc}", f"--output={tmp_path / 'fdh'}",
                         f"--image_source=mirror:{mirror}", "--annotator=fdh", "--no_embeddings",
                         "--random_weights", "--max_batch_size=2",
                         "--max_reject_rate=none"])  # random weights keep nobody
    funnel = stats["funnel"]
    assert funnel["funnel.decoded"] == 5
    assert accounting_errors(funnel) == []


@pytest.mark.pipeline
def test_gpu_resource_hint_sits_on_the_gpu_composite_only(sample, tmp_path):
    """Dataflow right fitting: only the GPU composite (decode .. encode) asks for GPU workers of
    --gpu_machine_type, so photos cross to them once. Built, not run, for a remote runner."""
    from tests.dataflow_proto import build_rebuild_proto, steps_by_hint

    yfcc, _ = sample
    proto = build_rebuild_proto([
        f"--yfcc={yfcc}", f"--output={tmp_path / 'out'}", "--image_source=mirror:gs://b/yfcc",
        "--annotator=fdh", "--no_embeddings", "--device=GPU", "--gpu_type=nvidia-l4",
        "--gpu_count=2", "--gpu_machine_type=g2-standard-24", "--runner=PrismRunner"])
    hinted, plain = steps_by_hint(proto, b"type:nvidia-l4;count:2;machine_type:g2-standard-24;"
                                         b"install-nvidia-driver")
    assert hinted and all(name.startswith("GpuStage/") for name in hinted)
    for stage in ("DecodeImages", "Annotate/KeypointRCNN", "Annotate/MaskRCNN", "SelectPersons",
                  "CropPersons", "AssignSplit", "EncodeSamples"):
        assert any(name.startswith("GpuStage/") and f"/{stage}" in name for name in hinted), stage
    assert not any(name.startswith("GpuStage/") for name in plain)
    assert any(name.startswith("FetchImages/") for name in plain)
    assert any(name.startswith("WriteShards/") for name in plain)


def test_gpu_type_needs_the_gpu_fdh_annotator(sample, tmp_path):
    yfcc, mirror = sample
    with pytest.raises(UsageError, match="--gpu_type needs --device=GPU --annotator=fdh"):
        rebuild.run([f"--yfcc={yfcc}", f"--output={tmp_path / 'x'}", "--annotator=lite",
                     f"--image_source=mirror:{mirror}", "--gpu_type=nvidia-tesla-t4"])


@pytest.mark.pipeline
def test_the_manifest_waits_for_the_rejects(sample, tmp_path):
    """Finalize (which writes manifest.json last) depends on every step of WriteRejects, so a
    manifest never precedes a complete rejects/ (finding 8 of issue 11)."""
    from tests.dataflow_proto import build_rebuild_proto, leaf_transforms, upstream_step_names

    yfcc, mirror = sample
    proto = build_rebuild_proto([f"--yfcc={yfcc}", f"--output={tmp_path / 'out'}",
                                 f"--image_source=mirror:{mirror}", "--annotator=lite"])
    finalize = next(transform.unique_name for _, transform in leaf_transforms(proto)
                    if transform.unique_name.startswith("WriteRunOutputs/Finalize"))
    upstream = upstream_step_names(proto, finalize)
    finalize_rejects = {transform.unique_name for _, transform in leaf_transforms(proto)
                        if transform.unique_name.startswith("WriteRejects/")
                        and "FinalizeWrite" in transform.unique_name}
    assert finalize_rejects and finalize_rejects <= upstream, sorted(finalize_rejects - upstream)


def test_manifest_versions_name_the_image_and_the_code(monkeypatch):
    """The image tag and the code version go into manifest.json's "versions" (finding 7)."""
    options, _ = rebuild.split_job_flags(rebuild.RebuildOptions, ["--yfcc=a", "--output=o"])
    monkeypatch.delenv("FDH_BEAM_IMAGE", raising=False)
    monkeypatch.delenv("FDH_BEAM_GIT_SHA", raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(rebuild.__file__),
                          capture_output=True, text=True).stdout.strip()
    assert rebuild.launch_versions(options) == {"image": "none", "git_sha": head or "unknown"}
    monkeypatch.setenv("FDH_BEAM_IMAGE", "reg/fdh-beam-worker:abc")
    monkeypatch.setenv("FDH_BEAM_GIT_SHA", "abc123")
    assert rebuild.launch_versions(options) == {"image": "reg/fdh-beam-worker:abc", "git_sha": "abc123"}
    flagged, _ = rebuild.split_job_flags(rebuild.RebuildOptions, [
        "--yfcc=a", "--output=o", "--sdk_container_image=reg/fdh-beam-worker:def"])
    assert rebuild.launch_versions(flagged)["image"] == "reg/fdh-beam-worker:def"


@pytest.mark.parametrize("flag, expected", [
    ([], ("noai", "noimageai", "noimageindex", "noindex")),
    (["--x_robots_tag_directives=NoAI, noindex"], ("noai", "noindex")),
    (["--x_robots_tag_directives=none"], ()),
])
def test_x_robots_tag_directives_flag_reaches_the_fetch_stage(flag, expected):
    options, _ = split_job_flags(rebuild.RebuildOptions, ["--yfcc=a", "--output=o", *flag])
    assert rebuild.x_robots_tag_directives(options) == expected


@pytest.mark.pipeline
def test_a_local_rebuild_spills_its_shuffles_and_gives_the_same_bytes_without(sample, built, tmp_path,
                                                                                monkeypatch):
    output, _ = built
    staged = []
    remove_staging = rebuild.remove_staging

    def record_and_remove(staging_dir):
        staged.extend(sorted(os.path.splitext(name)[1] for name in os.listdir(staging_dir)))
        return remove_staging(staging_dir)

    monkeypatch.setattr(rebuild, "local_staging_dir", lambda job: str(tmp_path / "staging"))
    monkeypatch.setattr(rebuild, "remove_staging", record_and_remove)
    os.makedirs(tmp_path / "staging")
    _rebuild(sample, str(tmp_path / "spilled"))
    assert staged and set(staged) == {".pickles"}  # candidates, records and samples were staged
    assert not (tmp_path / "staging").exists()
    assert _shard_bytes(str(tmp_path / "spilled")) == _shard_bytes(output)

    monkeypatch.setattr(rebuild, "local_staging_dir", lambda job: "")  # no spill at all
    _rebuild(sample, str(tmp_path / "in_memory"))
    assert _shard_bytes(str(tmp_path / "in_memory")) == _shard_bytes(output)
    assert _reject_rows(str(tmp_path / "in_memory")) == _reject_rows(str(tmp_path / "spilled"))
    assert (_stats_without_timing(str(tmp_path / "in_memory"))
            == _stats_without_timing(str(tmp_path / "spilled")))


def _reject_rows(output: str) -> list:
    """Every row of rejects/*.parquet, sorted (the shards' names and order may differ)."""
    frame = pd.read_parquet(os.path.join(output, "rejects")).astype(object)
    rows = frame.where(frame.notna(), None).to_dict("records")
    assert rows
    return sorted(rows, key=lambda row: sorted((key, str(value)) for key, value in row.items()))


def _stats_without_timing(output: str) -> dict:
    with open(os.path.join(output, "stats.json")) as handle:
        stats = json.load(handle)
    return {key: value for key, value in stats.items() if "time" not in key}


REJECT_FLATTENS = ("AllRejects", "ReadAndPrefilter/MergeRejects", "GpuStage/Rejects")


@pytest.mark.pipeline
def test_a_local_rebuilds_rejects_cross_their_flattens_as_batch_references(sample, built, tmp_path):
    """What crosses each rejects Flatten of a local rebuild is SpilledBatch references, which
    hold every reject the parquet files of an in-memory rebuild hold (issue 13)."""
    import apache_beam as beam

    from beam_jobs.common import make_pipeline

    yfcc, mirror = sample
    options, beam_options = split_job_flags(rebuild.RebuildOptions, [
        f"--yfcc={yfcc}", f"--output={tmp_path / 'out'}", f"--image_source=mirror:{mirror}",
        "--annotator=lite", "--crawl_time=1637341702.1145487"])
    pipeline = make_pipeline(beam_options)
    rebuild.build(pipeline, options, str(tmp_path / "staging"))
    flattens = outputs_of(pipeline, REJECT_FLATTENS)
    assert set(flattens) == set(REJECT_FLATTENS)
    for index, (label, pcoll) in enumerate(sorted(flattens.items())):
        _ = (pcoll | f"Observe{index}" >> beam.combiners.ToList()
             | f"Record{index}" >> beam.Map(lambda elements, name=label: open(
                 tmp_path / name.replace("/", "-"), "w").write(json.dumps(
                     [[type(element).__name__, getattr(element, "count", 1)] for element in elements]))))
    pipeline.run().wait_until_finish()

    crossed = {label: json.loads((tmp_path / label.replace("/", "-")).read_text())
               for label in REJECT_FLATTENS}
    assert all(kind == "SpilledBatch" for elements in crossed.values() for kind, _ in elements), crossed
    rows = _reject_rows(built[0])
    assert sum(count for _, count in crossed["AllRejects"]) == len(rows)
    assert len(crossed["AllRejects"]) < len(rows)
    assert _reject_rows(str(tmp_path / "out")) == rows
