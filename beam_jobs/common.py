"""Pipeline construction shared by every job: offline-safe local runs, metrics read-back."""
from __future__ import annotations

import logging
from typing import Optional

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

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
