"""The rebuild as Dataflow would get it, built offline: a job template to a local file, the staged
pipeline proto on gs:// through the GCS emulator (tests/gcs_emulator.py), no network.

Asserts what a real GPU rebuild depends on: the accelerator hint (GPU type, count and the GPU
workers' machine type) sits on exactly the GPU composite's steps; every environment runs the
worker image; no local path of the launcher is captured; and only two edges cross between the
CPU and GPU environments: the fetched bytes going in, and encoded samples, rejects and funnel
counts coming out (tests/dataflow_proto.py reads the proto).
"""
from __future__ import annotations

import json

import pytest
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2

from beam_jobs.demo import build_sample
from tests.dataflow_proto import cross_environment_edges, steps_by_hint

pytestmark = [pytest.mark.pipeline, pytest.mark.slow]

IMAGE = "us-docker.pkg.dev/fdh-test/fdh/fdh-beam-worker:0123abc"
ACCELERATOR = b"type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver"
INTO_GPU = {("FetchImages/FetchBytes/ParDo(_FetchDoFn)", "GpuStage/DecodeImages/DecodeBytes/ParDo(_DecodeDoFn)")}
# The composite's outputs: encoded samples (main), rejects (one Flatten), funnel counts.
OUT_OF_GPU = {"GpuStage/EncodeSamples/Encode/ParDo(_EncodeFn)", "GpuStage/Rejects", "GpuStage/Counts"}


@pytest.fixture(scope="module")
def template(gcs_emulator, tmp_path_factory):
    """(template dict, pipeline proto, local work dir) of the README's GPU command, built offline."""
    work = tmp_path_factory.mktemp("template")
    yfcc, mirror = build_sample(str(work / "input"))
    gcs_emulator.upload_file(yfcc, "in/yfcc.txt")
    template_file = work / "template.json"
    done = gcs_emulator.run_job(
        "beam_jobs.rebuild", f"--yfcc={gcs_emulator.url('in/yfcc.txt')}",
        f"--output={gcs_emulator.url('out')}", f"--image_source=mirror:{gcs_emulator.url('mirror')}",
        "--annotator=fdh", "--no_embeddings", "--random_weights", "--device=GPU",
        "--gpu_type=nvidia-l4", "--gpu_machine_type=g2-standard-8", "--max_num_workers=4",
        "--runner=DataflowRunner", "--project=fdh-test", "--region=us-central1",
        f"--temp_location={gcs_emulator.url('tmp')}", f"--staging_location={gcs_emulator.url('staging')}",
        f"--sdk_container_image={IMAGE}", "--sdk_location=container",
        f"--template_location={template_file}")
    assert done.returncode == 0, done.stderr[-3000:]
    staged = [name for name in gcs_emulator.names("staging/") if name.endswith("/pipeline.pb")]
    assert len(staged) == 1, staged
    proto = beam_runner_api_pb2.Pipeline.FromString(gcs_emulator.read(staged[0]))
    return json.loads(template_file.read_text()), proto, work


def test_the_gpu_hint_sits_on_exactly_the_gpu_composite(template):
    _, proto, _ = template
    hinted, plain = steps_by_hint(proto, ACCELERATOR)
    assert hinted and all(name.startswith("GpuStage/") for name in hinted)
    assert not any(name.startswith("GpuStage/") for name in plain)
    for stage in ("DecodeImages", "Annotate/KeypointRCNN", "SelectPersons", "CropPersons",
                  "AssignSplit", "EncodeSamples"):
        assert any(name.startswith("GpuStage/") and f"/{stage}" in name for name in hinted), stage
    assert any(name.startswith("FetchImages/") for name in plain)
    assert any(name.startswith("WriteShards/") for name in plain)


def test_only_bytes_go_in_and_encoded_samples_come_out(template):
    _, proto, _ = template
    edges = cross_environment_edges(proto)
    into = {(producer, consumer) for producer, _, consumer, into_gpu in edges if into_gpu}
    out = {producer for producer, _, _, into_gpu in edges if not into_gpu}
    assert into == INTO_GPU
    assert out == OUT_OF_GPU


def test_every_environment_runs_the_worker_image(template):
    job, proto, _ = template
    docker = common_urns.environments.DOCKER.urn
    images = {beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
              for env in proto.components.environments.values() if env.urn == docker}
    assert images == {IMAGE}
    options = {item["key"]: item["value"] for item in job["environment"]["sdkPipelineOptions"]["display_data"]}
    assert options["sdk_container_image"] == IMAGE


def test_no_local_path_is_captured(template):
    job, proto, work = template
    text = json.dumps({key: value for key, value in job.items()})
    # The template's own location is the one local path it may name.
    assert text.count(str(work)) == text.count(str(work / "template.json"))
    assert str(work).encode() not in proto.SerializeToString()
