"""Launch-time validation for remote runners: fail on the launcher, before anything is staged.

Shared helper (not a job). `check_remote_launch(job_options, pipeline_options)` is called by the
rebuild job right after parsing its flags, before the pipeline is built or submitted. On a remote
runner (anything `beam_jobs.common.is_local` does not run in this process) a missing piece would
otherwise surface late and once per worker: without --model_dir every worker downloads the
weights itself and SelectPersons fails on every photo with a person (issue 11, finding 3); a
model dir without part_table.npy fails at the first photo. Each failure raises
`beam_jobs.common.UsageError` with one line.
"""
from __future__ import annotations

from typing import Any, Optional

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_jobs.common import UsageError, is_local
from beam_jobs.model_dir import PART_TABLE, check_model_dir
from transforms.assets import FETCH_HINT
from transforms.s3_fetch import parse_image_sources
from transforms.s5_annotate.cascade import FdhSettings


def is_dataflow(options: PipelineOptions) -> bool:
    """True for Dataflow (`--runner=DataflowRunner`, `dataflow`, or the runner class)."""
    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) else type(runner).__name__
    return "dataflow" in (name or "").lower()


def required_model_entries(job_options: Any) -> list[str]:
    """What the run loads from --model_dir: the FDH cascade's weights (none with
    --random_weights) and, when it computes embeddings, the part table. Lite needs nothing."""
    if getattr(job_options, "annotator", "fdh") != "fdh":
        return []
    no_embeddings = bool(getattr(job_options, "no_embeddings", False))
    names = [] if getattr(job_options, "random_weights", False) else FdhSettings(
        no_embeddings=no_embeddings).asset_names()
    return names + ([] if no_embeddings else [PART_TABLE])


def check_model_dir_for_launch(model_dir: str, names: list[str], dataflow: bool) -> None:
    """UsageError unless every entry of `names` is in `model_dir` with a good checksum."""
    if dataflow and "://" not in model_dir:
        raise UsageError(f"--model_dir={model_dir} is a local path: Dataflow workers cannot read "
                         "it; use a gs:// model dir (" + FETCH_HINT.format(model_dir="gs://...") + ")")
    problems = [status for status in check_model_dir(model_dir, names) if not status.ok]
    if problems:
        listed = "; ".join(f"{status.name} {status.status}" for status in problems)
        raise UsageError(f"--model_dir={model_dir} is not ready ({listed}): run "
                         f"`{FETCH_HINT.format(model_dir=model_dir)}`, then "
                         f"`python -m beam_jobs.assets verify --model_dir={model_dir}`")


def _uses_flickr(image_source: Optional[str]) -> bool:
    """Whether `flickr` is one of the --image_source specs (a bad spec is a UsageError)."""
    if not image_source:
        return False
    try:
        return any(source.kind == "flickr" for source in parse_image_sources(image_source))
    except ValueError as error:
        raise UsageError(f"--image_source={image_source}: {error}") from error


def check_remote_launch(job_options: Any, pipeline_options: PipelineOptions) -> None:
    """Raise UsageError (one line) when a remote run lacks what it needs; no-op for local runs.

    Checks, in order: --temp_location; a worker image (--sdk_container_image) on Dataflow;
    --max_num_workers when `flickr` is an image source (the job-wide politeness budget is shared
    out per worker); --model_dir given, complete and verified for what the run loads.
    """
    if is_local(pipeline_options):
        return
    values = pipeline_options.get_all_options()
    runner = pipeline_options.view_as(StandardOptions).runner
    dataflow = is_dataflow(pipeline_options)
    if not values.get("temp_location"):
        raise UsageError(f"--temp_location=gs://BUCKET/tmp is required with --runner={runner} "
                         "(staging and temporary files go there)")
    if dataflow and not values.get("sdk_container_image"):
        raise UsageError("--sdk_container_image=IMAGE is required on Dataflow: the workers need "
                         "the image built from docker/Dockerfile (see docker/README.md)")
    if not values.get("max_num_workers") and _uses_flickr(getattr(job_options, "image_source", None)):
        raise UsageError("--max_num_workers=N is required when `flickr` is an image source: the "
                         "job-wide Flickr rate is shared out per worker")
    names = required_model_entries(job_options)
    if not names:
        return
    model_dir = getattr(job_options, "model_dir", None)
    if not model_dir:
        raise UsageError(f"--model_dir is required with --runner={runner} (else every worker "
                         f"downloads the weights itself): run `{FETCH_HINT.format(model_dir='gs://BUCKET/models')}`")
    check_model_dir_for_launch(model_dir, names, dataflow)
