"""Pipeline construction shared by every job: offline-safe local runs, metrics read-back."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from transforms.records import METRICS_NAMESPACE

class UsageError(ValueError):
    """A mistake in how a job was called (a flag, an input path, a missing model): the job ends
    with one line on stderr and exit 2, no traceback (see `run_main`)."""


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


class JobOptions(PipelineOptions):
    """Base of every job's own options class (RebuildOptions, ScanOptions, VerifyOptions, ...).

    Beam registers the flags of every *direct* PipelineOptions subclass in one global parser
    whenever options are parsed, so two jobs that both define --output clash when imported into
    one process (argparse: conflicting option string), and a `required` flag of one job breaks
    every other. Job options subclass this empty class instead: their flags are parsed only by
    `split_job_flags`, and the pipeline gets the remaining (Beam/Dataflow) flags. Job values are
    read at launch and handed to the transforms, so workers never need them.
    """


def split_job_flags(options_class: type, argv: Optional[Sequence[str]] = None,
                    description: Optional[str] = None) -> tuple[Any, PipelineOptions]:
    """(the job's options, PipelineOptions of the remaining flags) for `argv` (default sys.argv).

    `--help` prints the job's flags (with `description`) and exits; any flag the job does not
    define passes through to Beam (--runner, --project, --direct_num_workers, ...).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=description, allow_abbrev=False,
        epilog="Any Beam / Dataflow pipeline flag (--runner, --project, --region, "
               "--direct_num_workers, ...) passes through.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    options_class._add_argparse_args(parser)  # pylint: disable=protected-access
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        raise SystemExit(0)
    _, pipeline_flags = parser.parse_known_args(argv)
    return options_class(argv), PipelineOptions(pipeline_flags)


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
        raise ValueError("--report=gs://... is required with a remote runner")
    return FileSystems.join(tempfile.mkdtemp(prefix="fdh-beam-"), filename)
