"""Plan the cost of a rebuild from what `scan` counted: GPU-hours, CPU worker-hours, shuffle
bytes, dollars and the Flickr API calls a consent check needs, with every assumption printed.

    python -m beam_jobs.plan --scan_counts=SCAN_OUT/scan_counts.json [--gpu_ms_per_photo=60 ...]
    python -m beam_jobs.plan --candidates=68070018 --lines_read=100000000     # a paper plan

Every per-stage cost, funnel rate, byte size and price below is a flag. Each prints with where
its default comes from: [measured] = NOTES.md's `make bench` table (2-core development machine,
2026-11-27, CPU ms per core), [issue 11] = bytes measured with the pipeline's own coders,
[design.md] = published FDH / YFCC100M facts, [estimate] = not measured anywhere (replace it
with your own measurement), [example price] = a list price, not a quote (pass your region's),
[given] = you passed it. No Beam pipeline runs; nothing is fetched.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Sequence

from beam_jobs.common import JobOptions, UsageError, run_main, split_job_flags

MEASURED = "measured"
ISSUE = "issue 11"
DESIGN = "design.md"
ESTIMATE = "estimate"
PRICE = "example price"
GIVEN = "given"
MS_PER_HOUR = 3_600_000.0
NOT_MODELLED = ("network bandwidth and latency of fetching (CPU time only), the GPU hosts' "
                "own CPU work, storage, egress, start-up and retries")
# FDH's release (design.md §5): samples and bytes per licence, and the YFCC photos of its four
# licences (design.md §3: BY, BY-SA, BY-NC, BY-NC-SA).
FDH_SAMPLES = 816_664 + 236_633 + 440_855 + 365_344
FDH_BYTES = (60 + 17 + 32 + 27) * 10**9
FDH_CANDIDATES = 17_210_144 + 9_408_154 + 12_674_885 + 28_776_835


def _assume(default: float, unit: str, source: str, why: str) -> Any:
    """A field of `Assumptions`: its default, unit, where the default comes from, and why."""
    return field(default=default, metadata={"unit": unit, "source": source, "why": why})


@dataclass(frozen=True)
class Assumptions:
    """Every number the plan multiplies by (each one a flag of the same name)."""

    # funnel
    fetch_success: float = _assume(
        0.97, "of candidates", ESTIMATE,
        "share of candidates fetched and decoded (the mirror misses ~35k of 99M photos, "
        "design.md §3; dead and garbage files were never counted)")
    samples_per_candidate: float = _assume(
        round(FDH_SAMPLES / FDH_CANDIDATES, 5), "samples", DESIGN,
        f"FDH's {FDH_SAMPLES:,} released samples / the {FDH_CANDIDATES:,} YFCC photos of its "
        "four licences (§5, §3)")
    samples_per_kept_photo: float = _assume(
        1.3, "samples", ESTIMATE, "persons kept per photo that yields at least one sample")
    # GPU
    gpu_ms_per_photo: float = _assume(
        75.0, "GPU ms", ESTIMATE,
        "keypoints + mask + DensePose CSE per photo on one T4; issue 11's paper estimate "
        "(1.0-1.8k T4-hours for ~68M photos = 53-95 ms); run bench/gpu_annotate.sh for yours")
    gpu_utilisation: float = _assume(
        1.0, "", ESTIMATE, "share of GPU time spent in the models (1.0 = the GPU never waits)")
    # CPU, per core (NOTES.md "Measured")
    read_ms_per_line: float = _assume(
        round(1000 / 11_100, 4), "CPU ms", MEASURED,
        "read + prefilter as the rebuild does it (a record per candidate): the scan's record "
        "path on one local worker, 11.1k lines/s")
    fetch_decode_ms_per_candidate: float = _assume(
        1.95, "CPU ms", MEASURED, "fetch + decode, loopback nginx, 300 JPEGs")
    select_crop_ms_per_sample: float = _assume(
        1.95, "CPU ms", MEASURED, "select + crop per person, 640x480")
    encode_ms_per_sample: float = _assume(
        3.97, "CPU ms", MEASURED, "encode_sample (PNGs + npy)")
    write_mib_per_s: float = _assume(
        437.0, "MiB/s", MEASURED, "tar writer with sha256, per core")
    cpu_utilisation: float = _assume(
        1.0, "", ESTIMATE, "share of CPU time doing this work (1.0 = never idle on the network)")
    vcpus_per_worker: float = _assume(4.0, "vCPUs", ESTIMATE, "vCPUs of one CPU worker VM")
    # bytes materialised between steps (Reshuffle, the CPU<->GPU edges, the writer's grouping)
    record_bytes: float = _assume(
        1000.0, "bytes", ESTIMATE, "one candidate YfccRecord through the Reshuffle")
    gpu_in_bytes_per_photo: float = _assume(
        101_500.0, "bytes", MEASURED,
        "one photo into the GPU composite: bench_boundary.py measured 1.015x the fetched file, "
        "taken as ~100 kB (design.md §3); decoded pixels (0.92 MB at 640x480) no longer cross")
    gpu_out_bytes_per_photo: float = _assume(
        0.0, "bytes", MEASURED,
        "per photo out of the GPU composite besides its samples: rejects and counts, ~0")
    gpu_out_bytes_per_sample: float = _assume(
        70_212.0, "bytes", MEASURED,
        "one encoded sample out of the GPU composite: bench_boundary.py measured 0.96x the encoded "
        "sample, of FDH's 73,138 bytes (§5)")
    sample_bytes: float = _assume(
        round(FDH_BYTES / FDH_SAMPLES), "bytes", DESIGN,
        "one encoded sample: FDH's 136 GB / its samples (§5)")
    # Flickr consent check
    flickr_calls_per_kept_photo: float = _assume(
        1.0, "API calls", ESTIMATE, "Flickr API calls to check one kept photo's licence and owner")
    flickr_calls_per_hour: float = _assume(
        3600.0, "calls/h", ESTIMATE, "Flickr API calls per hour per key (its published limit; "
        "check yours)")
    # goal and prices
    target_hours: float = _assume(12.0, "hours", ISSUE, "wall-clock goal of a full rebuild")
    gpu_hour_price: float = _assume(
        1.0, "$/GPU-hour", PRICE,
        "one T4 with its host VM (issue 11's ~$1.1-1.6k for 1.0-1.8k T4-hours)")
    cpu_worker_hour_price: float = _assume(
        0.28, "$/worker-hour", PRICE, "4 vCPUs + 15 GB at Dataflow batch rates")
    shuffle_gb_price: float = _assume(0.011, "$/GB", PRICE, "Dataflow Shuffle, per GB processed")
    given: frozenset = field(default=frozenset(), compare=False)  # names the user passed

    def rows(self) -> list[tuple[str, float, str, str, str]]:
        """(name, value, unit, source, why) per assumption, in declaration order."""
        return [(item.name, getattr(self, item.name), item.metadata["unit"],
                 GIVEN if item.name in self.given else item.metadata["source"],
                 item.metadata["why"]) for item in fields(self) if item.metadata]


@dataclass(frozen=True)
class Plan:
    """What a rebuild of `candidates` photos is projected to cost (see `plan`)."""

    lines_read: int
    candidates: int
    photos_decoded: float
    samples: float
    kept_photos: float
    gpu_hours: float
    cpu_core_hours: float
    cpu_worker_hours: float
    shuffle_bytes: float
    flickr_api_calls: float
    gpus_for_target: int
    workers_for_target: int
    flickr_api_hours: float
    dollars_gpu: float
    dollars_cpu: float
    dollars_shuffle: float
    assumptions: Assumptions

    @property
    def dollars(self) -> float:
        return self.dollars_gpu + self.dollars_cpu + self.dollars_shuffle


def _cpu_core_ms(lines: float, candidates: float, samples: float, a: Assumptions) -> float:
    write_ms_per_sample = 1000.0 * a.sample_bytes / (a.write_mib_per_s * 2**20)
    per_sample = a.select_crop_ms_per_sample + a.encode_ms_per_sample + write_ms_per_sample
    return (lines * a.read_ms_per_line + candidates * a.fetch_decode_ms_per_candidate
            + samples * per_sample)


def _shuffle_bytes(candidates: float, decoded: float, samples: float, a: Assumptions) -> float:
    gpu_edges = (decoded * (a.gpu_in_bytes_per_photo + a.gpu_out_bytes_per_photo)
                 + samples * a.gpu_out_bytes_per_sample)
    return candidates * a.record_bytes + gpu_edges + samples * a.sample_bytes


def plan(lines_read: int, candidates: int, a: Assumptions = Assumptions()) -> Plan:
    """The projected cost of rebuilding from `candidates` (of `lines_read` lines): pure arithmetic.

    GPU-hours = decoded photos x GPU ms / utilisation; CPU core-hours = lines x read + candidates
    x fetch/decode + samples x (select/crop + encode + write), / utilisation; worker-hours =
    core-hours / vCPUs per worker; shuffle = candidates x record + decoded x (GPU in + out) +
    samples x (GPU out per sample + sample bytes); dollars = each x its price.
    """
    decoded = candidates * a.fetch_success
    samples = candidates * a.samples_per_candidate
    kept = samples / a.samples_per_kept_photo
    gpu_hours = decoded * a.gpu_ms_per_photo / MS_PER_HOUR / a.gpu_utilisation
    core_hours = _cpu_core_ms(lines_read, candidates, samples, a) / MS_PER_HOUR / a.cpu_utilisation
    worker_hours = core_hours / a.vcpus_per_worker
    shuffle = _shuffle_bytes(candidates, decoded, samples, a)
    calls = kept * a.flickr_calls_per_kept_photo
    return Plan(
        lines_read=lines_read, candidates=candidates, photos_decoded=decoded, samples=samples,
        kept_photos=kept, gpu_hours=gpu_hours, cpu_core_hours=core_hours,
        cpu_worker_hours=worker_hours, shuffle_bytes=shuffle, flickr_api_calls=calls,
        gpus_for_target=math.ceil(gpu_hours / a.target_hours),
        workers_for_target=math.ceil(worker_hours / a.target_hours),
        flickr_api_hours=calls / a.flickr_calls_per_hour,
        dollars_gpu=gpu_hours * a.gpu_hour_price,
        dollars_cpu=worker_hours * a.cpu_worker_hour_price,
        dollars_shuffle=shuffle / 1e9 * a.shuffle_gb_price, assumptions=a)


def format_plan(result: Plan, source: str = "") -> str:
    """The plan as text: totals, then every assumption with its value, unit and source."""
    a = result.assumptions
    hours = f"{a.target_hours:g} h"
    lines = [
        (f"FDH rebuild plan: {result.candidates:,} candidates of {result.lines_read:,} lines read"
         + (f" ({source})" if source else "")),
        f"  photos fetched and decoded  {result.photos_decoded:>16,.0f}",
        f"  samples                     {result.samples:>16,.0f}",
        f"  photos with a sample        {result.kept_photos:>16,.0f}",
        (f"  GPU-hours                   {result.gpu_hours:>16,.1f}   {result.gpus_for_target:,} "
         f"GPU(s) for {hours}   ${result.dollars_gpu:,.0f}"),
        (f"  CPU worker-hours            {result.cpu_worker_hours:>16,.1f}   "
         f"{result.workers_for_target:,} worker(s) for {hours} "
         f"({result.cpu_core_hours:,.1f} core-hours)   ${result.dollars_cpu:,.0f}"),
        (f"  shuffle bytes               {result.shuffle_bytes:>16,.0f}   "
         f"({result.shuffle_bytes / 1e12:,.2f} TB)   ${result.dollars_shuffle:,.0f}"),
        f"  dollars                     {result.dollars:>16,.0f}",
        (f"  Flickr API calls (consent)  {result.flickr_api_calls:>16,.0f}   "
         f"{result.flickr_api_hours:,.1f} h at {a.flickr_calls_per_hour:,.0f}/h per key"),
        "Assumptions (each a flag --NAME=VALUE):",
    ]
    lines += [f"  --{name}={value:g} {unit}".rstrip() + f"  [{source}] {why}"
              for name, value, unit, source, why in a.rows()]
    lines.append(f"Not modelled: {NOT_MODELLED}")
    return "\n".join(lines)


class PlanOptions(JobOptions):
    """Flags of the plan job: the counts, then one flag per `Assumptions` field."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--scan_counts",
                            help="scan_counts.json written by `python -m beam_jobs.scan` (local "
                                 "or gs://); or give --candidates and --lines_read")
        parser.add_argument("--candidates", type=int, help="candidate photos (instead of a scan)")
        parser.add_argument("--lines_read", type=int,
                            help="YFCC lines read (instead of a scan; default: --candidates)")
        for item in fields(Assumptions):
            if item.metadata:
                meta = item.metadata
                parser.add_argument(f"--{item.name}", type=float, default=None,
                                    help=f"{meta['why']} [{meta['unit'] or 'ratio'}; default "
                                         f"{item.default:g}, {meta['source']}]")


# Assumptions the plan divides by: they must be > 0 (the others >= 0).
_DIVISORS = ("samples_per_kept_photo", "gpu_utilisation", "cpu_utilisation", "vcpus_per_worker",
             "write_mib_per_s", "flickr_calls_per_hour", "target_hours")


def _assumptions_from(options: PlanOptions) -> Assumptions:
    """Assumptions() with the flags the user gave (each checked), marked as given."""
    given = {item.name: getattr(options, item.name) for item in fields(Assumptions)
             if item.metadata and getattr(options, item.name) is not None}
    for name, value in given.items():
        if value < 0 or (value == 0 and name in _DIVISORS):
            raise UsageError(f"--{name}={value:g}: must be {'> 0' if name in _DIVISORS else '>= 0'}")
    return replace(Assumptions(), **given, given=frozenset(given))


def _counts_from(options: PlanOptions) -> tuple[int, int, str]:
    """(lines read, candidates, where they came from) from --scan_counts or --candidates."""
    if options.scan_counts:
        from apache_beam.io.filesystems import FileSystems

        try:
            with FileSystems.open(options.scan_counts) as handle:
                counts = json.loads(handle.read().decode("utf-8"))
            return int(counts["lines_read"]), int(counts["candidates"]), options.scan_counts
        except (OSError, ValueError, KeyError) as error:
            raise UsageError(f"--scan_counts={options.scan_counts}: not a scan_counts.json "
                             f"({type(error).__name__}: {error})") from error
    if options.candidates is None:
        raise UsageError("plan needs --scan_counts=SCAN_OUT/scan_counts.json or --candidates=N")
    return options.lines_read or options.candidates, options.candidates, "given"


def run(argv: Optional[Sequence[str]] = None) -> Plan:
    """Parse flags, compute and print the plan; returns it."""
    options, _ = split_job_flags(PlanOptions, argv, __doc__)
    lines_read, candidates, source = _counts_from(options)
    result = plan(lines_read, candidates, _assumptions_from(options))
    print(format_plan(result, source))
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point: a usage error is one line on stderr and exit 2."""
    run_main(run, argv)


if __name__ == "__main__":
    main()
