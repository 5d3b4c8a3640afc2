"""Pipeline construction shared by every job: offline-safe local runs, metrics read-back.

The command-line contract (JobOptions, split_job_flags, run_main, UsageError) lives in
beam_jobs/cli.py and is re-exported here, where the jobs import it from.
"""
from __future__ import annotations

import logging
from typing import Optional

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_jobs.cli import (JobOptions, UsageError, run_main, show_third_party_logs,  # noqa: F401
                           split_job_flags)
from transforms.records import METRICS_NAMESPACE

# Runner names that mean "run here, in this process". Beam >= 2.68 maps DirectRunner to the Prism
# runner, which downloads a binary from the internet; we map them to the in-process FnApiRunner.
LOCAL_RUNNERS = (None, "", "DirectRunner", "direct", "FnApiRunner", "SwitchingDirectRunner")


def make_pipeline(options: PipelineOptions) -> beam.Pipeline:
    """A Pipeline for `options`; local runs use the in-process FnApiRunner (never downloads).

    Pass `--direct_num_workers=N --direct_running_mode=multi_processing` to use N cores locally.
    Any other runner (DataflowRunner, PrismRunner, ...) is used as named.
    """
    runner_name = options.view_as(StandardOptions).runner
    if runner_name in LOCAL_RUNNERS:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=options)
    show_third_party_logs()  # a remote runner reports the job's progress through Beam's logs
    return beam.Pipeline(options=options)


def is_local(options: PipelineOptions) -> bool:
    """True when `make_pipeline` would run the job in this process."""
    return options.view_as(StandardOptions).runner in LOCAL_RUNNERS


def read_counters(result: beam.runners.runner.PipelineResult,
                  namespace: str = METRICS_NAMESPACE) -> dict[str, int]:
    """The committed values of every counter in `namespace`, summed over steps."""
    counters: dict[str, int] = {}
    try:
        query = result.metrics().query(MetricsFilter().with_namespace(namespace))
    except Exception as error:  # some runners do not report metrics
        logging.warning("could not read metrics: %s", error)
        return counters
    for counter in query["counters"]:
        value: Optional[int] = counter.committed if counter.committed is not None else counter.attempted
        counters[counter.key.metric.name] = counters.get(counter.key.metric.name, 0) + int(value or 0)
    return dict(sorted(counters.items()))


def split_list(value: Optional[str]) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c'] for comma-separated flags."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def report_path_for(report: Optional[str], options: PipelineOptions, filename: str) -> str:
    """Where a job's final DoFn writes its JSON report for the launcher to read back: `report`,
    else a local temp file (remote runners need a shared path such as gs://...)."""
    import tempfile

    from apache_beam.io.filesystems import FileSystems

    if report:
        return report
    if not is_local(options):
        raise UsageError("--report=gs://... is required with a remote runner")
    return FileSystems.join(tempfile.mkdtemp(prefix="fdh-beam-"), filename)
