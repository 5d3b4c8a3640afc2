r"""The main job: rebuild FDH from YFCC100M metadata into per-licence WebDataset shards.

    python -m beam_jobs.rebuild --yfcc=yfcc100m_dataset-*.bz2 --output=OUT \
        --image_source=mirror:gs://my-bucket/yfcc --annotator=fdh --model_dir=gs://my-bucket/models

Stages (each a PTransform of `transforms/`, in data-flow order):
read -> prefilter -> reshuffle -> fetch (CPU workers) -> [decode -> annotate -> select -> crop ->
split -> encode] (`transforms.gpu_stage.GpuStage`: one composite, the GPU workers with --gpu_type)
-> write shards (CPU workers) -> rejects/ -> manifest, metadata.json, stats.json (last).
Only the fetched bytes cross into the GPU composite and only encoded samples and rejects cross
back (bench/bench_boundary.py measures both edges). Every dropped element is a `Rejected` record
written under OUT/rejects/ and counted in stats.json, so that
lines read = rejects before annotation + photos decoded,
photos decoded = photos annotated + annotate rejects, and
photos annotated = photos select rejected whole + photos with >= 1 kept person
(`transforms.funnel.accounting_errors`).
Any Beam/Dataflow flag passes through (--runner, --project, --region, --sdk_container_image, ...).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, WorkerOptions

from beam_jobs.common import (JobOptions, UsageError, is_local, make_pipeline, run_main,
                              split_job_flags, split_list)
from beam_jobs.launch_checks import check_remote_launch
from beam_jobs.progress import input_size, report_progress
from dataset.lock import run_lock
from dataset.ownership import OVERWRITE_HELP, check_output_ownership, remove_empty_beam_temp_folders
from dataset.stats import human_bytes
from transforms.annotation_store import AnnotateWithStore, with_annotation_store
from transforms.consent import (CheckConsent, ConsentResult, ConsentSubject,
                                add_consent_arguments, consent_from_flags)
from transforms.reject_limits import FLAG_HELP as MAX_REJECT_RATE_HELP
from transforms.reject_limits import check_reject_rates, parse_max_reject_rates
from transforms.funnel import accounting_errors, funnel_rows, step_key
from transforms.opt_out import OPT_OUT_FILENAME
from transforms.records import FDH_LICENSES
from transforms.rejects import CountRejects, WriteRejects
from transforms.s2_prefilter import ReadAndPrefilter
from transforms.gpu_stage import GpuStage, accelerator_hint, count_step
from transforms.s3_fetch import DEFAULT_X_ROBOTS_TAG_DIRECTIVES, FetchImages
from transforms.s5_annotate import Annotate
from transforms.s6_select import SelectPersons
from transforms.s7_crop import CropPersons
from dataset.fs import load_json
from dataset.layout import STATS_FILE
from transforms.s8_write import AssignSplit, EncodedSample, WriteRunOutputs, WriteShards
from transforms.s8_write.run_outputs import resolve_crawl_time
from transforms.spill import (LoadSpilled, SpilledReshuffle, flatten_spilling_to, local_staging_dir,
                              remove_staging)

DEFAULT_IMAGE_SOURCE = "mirror:https://multimedia-commons.s3-us-west-2.amazonaws.com"


class RebuildOptions(JobOptions):
    """Flags of the rebuild job (every other Beam/Dataflow flag passes through)."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--yfcc",
                            help="YFCC100M metadata files or globs, comma separated (23 or 25 "
                                 "columns; plain, .gz or .bz2; local or gs://)")
        parser.add_argument("--output", help="output dataset directory (local or gs://)")
        parser.add_argument("--image_source", default=DEFAULT_IMAGE_SOURCE,
                            help="image sources tried in order, comma separated: mirror:PREFIX "
                                 "(hash layout under an https URL, gs:// or a local dir) and/or "
                                 "flickr[:SIZE_SUFFIX] (rate-limited; opt in)")
        parser.add_argument("--annotator", default="fdh", choices=("fdh", "lite"),
                            help="fdh: keypoint R-CNN + mask R-CNN + DensePose CSE (GPU); lite: "
                                 "mediapipe pose + segmentation on the CPU, no CSE (demo, tests)")
        parser.add_argument("--detector", default="torchvision", choices=("torchvision", "detectron2"),
                            help="fdh annotator's detectors: detectron2 = DP2's own (FDH-faithful, "
                                 "needs detectron2); torchvision = other models, NOT FDH-faithful")
        parser.add_argument("--no_embeddings", action="store_true",
                            help="write FDH's no-embeddings variant (no vertices.npy / e_mask.png; "
                                 "no detectron2 needed)")
        parser.add_argument("--licenses",
                            help="licence subsets to keep, comma separated (default: FDH's four, "
                                 f"{','.join(FDH_LICENSES)})")
        parser.add_argument("--val_fraction", type=float, default=0.017,
                            help="fraction of users (or photos, see --split_by) in the val split")
        parser.add_argument("--split_by", default="user_nsid", choices=("user_nsid", "photo_id"),
                            help="what the deterministic split hashes, so one user's photos don't leak")
        parser.add_argument("--opt_out",
                            help="opt-out lists (user NSIDs / photo ids), comma separated; "
                                 "OUTPUT/opt_out.txt is always honoured when it exists")
        parser.add_argument("--model_dir", default=None,
                            help="directory (local or gs://) with the model weights and part table "
                                 "(python -m beam_jobs.assets fetch --model_dir=DIR)")
        parser.add_argument("--device", default="CPU", choices=("CPU", "GPU", "cpu", "gpu"),
                            help="where the models run; GPU fails loudly when CUDA is missing")
        parser.add_argument("--gpu_type", default=None,
                            help="Dataflow accelerator for the GPU composite only (decode .. encode), "
                                 "e.g. nvidia-tesla-t4 or nvidia-l4; with --device=GPU "
                                 "--annotator=fdh. The other steps keep the job's --machine_type")
        parser.add_argument("--gpu_count", type=int, default=1,
                            help="GPUs per GPU worker (the accelerator hint's count)")
        parser.add_argument("--gpu_machine_type", default=None,
                            help="machine type of the GPU workers only (Dataflow right fitting), "
                                 "e.g. n1-standard-8 for T4s or g2-standard-8 for L4s")
        parser.add_argument("--max_batch_size", type=int, default=4, help="images per model call")
        parser.add_argument("--fetch_threads", type=int, default=16,
                            help="concurrent image requests per worker process")
        parser.add_argument("--requests_per_second", type=float, default=None,
                            help="cap on image requests per second per worker process, all hosts "
                                 "(default: none)")
        parser.add_argument("--flickr_requests_per_second", type=float, default=4.0,
                            help="cap on image requests per second to Flickr's own hosts for the "
                                 "WHOLE job: each fetch process gets its share (this / (workers x "
                                 "SDK processes per worker), see --sdk_processes_per_worker); 0 "
                                 "for no cap")
        parser.add_argument("--flickr_concurrency", type=int, default=4,
                            help="image requests in flight to one Flickr host for the WHOLE job, "
                                 "shared out like --flickr_requests_per_second (at least 1 per "
                                 "process)")
        parser.add_argument("--x_robots_tag_directives",
                            default=",".join(DEFAULT_X_ROBOTS_TAG_DIRECTIVES),
                            help="X-Robots-Tag directives on a fetched image's response that "
                                 "refuse it (reject fetch.x_robots_tag), comma separated; 'none' "
                                 "honours none")
        parser.add_argument("--sdk_processes_per_worker", type=int, default=None,
                            help="SDK processes per worker, for the job-wide Flickr shares "
                                 "(default: the vCPUs of --machine_type, e.g. 8 for n1-standard-8, "
                                 "as Dataflow starts one per vCPU; 1 when it has no size, e.g. "
                                 "Dataflow's default n1-standard-1; --direct_num_workers for a "
                                 "local multi_processing run)")
        parser.add_argument("--crawl_time", type=float, default=None,
                            help="unix time recorded as date_crawled / unixtime_crawled, the only "
                                 "time-dependent value in the output (default: the existing "
                                 "manifest's when rebuilding into an output, else the launch time; "
                                 "pass it to get byte-identical outputs in another directory)")
        add_consent_arguments(
            parser, rate_flag="--flickr_api_requests_per_second",
            mode_help="'api': before writing, ask Flickr whether each photo that yields a sample "
                      "is still public, allowed by its licence and not tagged no_cv (rejects "
                      "consent.*; needs --flickr_api_key). 'off' trusts the 2014 snapshot: fine "
                      "offline and for tests, but a release build should use 'api' (or run "
                      "`python -m beam_jobs.recheck` on it)")
        parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
        parser.add_argument("--max_reject_rate", default=None, help=MAX_REJECT_RATE_HELP)
        parser.add_argument("--annotation_store", default=None,
                            help="annotation store (local or gs://; default OUTPUT/annotations; "
                                 "'none': no store): photos already annotated by the same models "
                                 "skip them")
        parser.add_argument("--from_annotations", default=None,
                            help="re-derive on CPU from this annotation store: no model runs; "
                                 "photos are fetched again and used only when their sha256 is the "
                                 "stored one, except a photo whose sole stored entry yields no "
                                 "sample (an annotate reject, no detection): that one is not "
                                 "fetched (see --rederive_fetch_all)")
        parser.add_argument("--rederive_fetch_all", action="store_true",
                            help="with --from_annotations: fetch every photo again, also those "
                                 "whose stored result yields no sample (the samples are the same; "
                                 "a photo deleted or replaced since is then counted fetch.* / "
                                 "annotate.not_in_store instead of its stored reject)")
        parser.add_argument("--random_weights", action="store_true",
                            help="TESTS ONLY: torchvision models with random weights (plumbing)")


def _opt_out_paths(options: RebuildOptions) -> list[str]:
    paths = split_list(options.opt_out)
    own = f"{options.output.rstrip('/')}/{OPT_OUT_FILENAME}"
    if own not in paths and FileSystems.exists(own):
        paths.append(own)
    return paths


def _sum_line_counts(line_counts):
    return (line_counts
            | "LineCountValues" >> beam.Values()
            | "SumLines" >> beam.CombineGlobally(sum)
            | "KeyLines" >> beam.Map(lambda n: (step_key("lines_read"), n)))


def run_config(options: RebuildOptions) -> dict:
    """Every flag of the job and its value, for manifest.json's "config" (except --output, so
    that a rebuild into another directory gives the same bytes, --verbose, and the flags that do
    not change what is built: --overwrite, --max_reject_rate, the annotation store's; and never
    the Flickr API key)."""
    return {name: value for name, value in sorted(options.as_dict().items())
            if name not in ("output", "verbose", "overwrite", "max_reject_rate",
                            "annotation_store", "from_annotations", "rederive_fetch_all", "flickr_api_key")}


def content_config(options: RebuildOptions) -> dict:
    """run_config with the licences and the embeddings choice as the run resolves them."""
    licenses = split_list(options.licenses) or list(FDH_LICENSES)
    return {**run_config(options), "licenses": ",".join(licenses),
            "no_embeddings": options.no_embeddings or options.annotator == "lite"}


def _checkout_sha() -> Optional[str]:
    """The git commit of the checkout this code runs from, or None (an installed package)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def launch_versions(options: RebuildOptions) -> dict[str, str]:
    """The worker image and code version for manifest.json's "versions": the image is
    --sdk_container_image, else $FDH_BEAM_IMAGE (set inside the image, docker/), else "none";
    the code is $FDH_BEAM_GIT_SHA (the image's commit), else the launcher checkout's git SHA."""
    image = (options.view_as(WorkerOptions).sdk_container_image
             or os.environ.get("FDH_BEAM_IMAGE") or "none")
    git_sha = os.environ.get("FDH_BEAM_GIT_SHA") or _checkout_sha() or "unknown"
    return {"image": image, "git_sha": git_sha}


def fetch_processes(options: RebuildOptions) -> int:
    """How many processes may run the fetch DoFn at once: --max_num_workers (1 when unset) x the
    SDK processes per worker (see --sdk_processes_per_worker's help)."""
    values = options.view_as(PipelineOptions).get_all_options()
    if is_local(options):
        local = values.get("direct_running_mode") == "multi_processing"
        return int(values.get("direct_num_workers") or 1) if local else 1
    per_worker = options.sdk_processes_per_worker
    if per_worker is None:
        size = re.fullmatch(r"[a-z0-9]+-[a-z]+-(\d+)(-[a-z0-9]+)?", values.get("machine_type") or "")
        per_worker = int(size.group(1)) if size else 1
    if per_worker < 1:
        raise UsageError(f"--sdk_processes_per_worker must be >= 1, got {per_worker}")
    return int(values.get("max_num_workers") or 1) * per_worker


def x_robots_tag_directives(options: RebuildOptions) -> tuple[str, ...]:
    """The --x_robots_tag_directives list, lower-cased; 'none' (or empty) honours none."""
    value = (options.x_robots_tag_directives or "").strip().lower()
    return () if value in ("", "none") else tuple(split_list(value))


def consent_stage(options: RebuildOptions) -> Optional[CheckConsent]:
    """The consent check the flags ask for (None with --consent_check=off)."""
    try:
        return consent_from_flags(options.consent_check, options.flickr_api_key,
                                  options.flickr_api_url, options.flickr_api_requests_per_second,
                                  max_num_workers=fetch_processes(options))
    except ValueError as error:
        raise UsageError(str(error)) from None


def consent_subject(sample) -> ConsentSubject:
    """An encoded sample as the consent check keys it (photo and owner from its Parquet row)."""
    return ConsentSubject(int(sample.row["photo_id"]), sample.row["user_nsid"], sample)


def with_consent_fields(kept: tuple[ConsentSubject, ConsentResult]) -> EncodedSample:
    """A kept encoded sample with the check time and the licence seen in its Parquet row (its
    tar members, FDH's metadata.json entry among them, stay as they are)."""
    subject, result = kept
    sample = subject.payload
    return sample._replace(row={**sample.row, **result.metadata()})


def gpu_accelerator(options: RebuildOptions) -> Optional[str]:
    """The GPU composite's accelerator hint: with --gpu_type, --device=GPU and the fdh annotator
    (the lite annotator runs on the CPU), else None."""
    if not options.gpu_type:
        return None
    if options.device.upper() != "GPU" or options.annotator != "fdh":
        raise UsageError("--gpu_type needs --device=GPU --annotator=fdh")
    try:
        return accelerator_hint(options.gpu_type, options.gpu_count, options.gpu_machine_type)
    except ValueError as error:
        raise UsageError(str(error)) from None


def trusts_store(options: RebuildOptions) -> bool:
    """Whether the re-derive skips fetching photos whose stored result yields no sample."""
    return bool(options.from_annotations) and not options.rederive_fetch_all


def annotate_stage(options: RebuildOptions, no_embeddings: bool) -> beam.PTransform:
    """The annotate stage the flags ask for, through the annotation store (or re-derived from one).
    Local runs get the fdh cascade as one step (no Flatten, which the in-process runner holds whole)."""
    local = is_local(options)
    annotate = Annotate(annotator=options.annotator, model_dir=options.model_dir,
                        device=options.device, max_batch_size=options.max_batch_size,
                        no_embeddings=no_embeddings, random_weights=options.random_weights,
                        require_detectron2_here=local and not options.from_annotations,
                        check_here=local, detector=options.detector, one_step=local)
    return with_annotation_store(annotate, options.output.rstrip("/"), options.annotation_store,
                                 options.from_annotations)


def gpu_stage(options: RebuildOptions, write_shards: WriteShards, no_embeddings: bool,
              annotate: Optional[beam.PTransform] = None,
              staging_dir: Optional[str] = None) -> GpuStage:
    """decode -> annotate -> select -> crop -> split -> encode, configured from the flags
    (`annotate`: the `annotate_stage`, when the caller built it already; `staging_dir`: where
    its rejects are staged, see `GpuStage`)."""
    annotate = annotate or annotate_stage(options, no_embeddings)
    part_table = options.model_dir if options.annotator == "fdh" and not no_embeddings else None
    return GpuStage(annotate, SelectPersons(part_table=part_table), CropPersons(),
                    AssignSplit(val_fraction=options.val_fraction, by=options.split_by),
                    write_shards.encoder(), accelerator=gpu_accelerator(options),
                    staging_dir=staging_dir)


def fetch_stage(candidates: beam.PCollection, options: RebuildOptions, annotate: beam.PTransform):
    """FetchImages over the candidates; re-deriving, `PrecheckStore` first turns the photos whose
    stored result yields no sample into StoredPhoto, which fetch passes through unfetched."""
    fetch = FetchImages(options.image_source, threads=options.fetch_threads,
                        requests_per_second=options.requests_per_second or None,
                        flickr_requests_per_second=options.flickr_requests_per_second or None,
                        flickr_concurrency=options.flickr_concurrency,
                        processes=fetch_processes(options),
                        x_robots_tag_directives=x_robots_tag_directives(options))
    if trusts_store(options) and isinstance(annotate, AnnotateWithStore):
        candidates = candidates | "StorePrecheck" >> annotate.precheck()
    return candidates | "FetchImages" >> fetch


def build(pipeline: beam.Pipeline, options: RebuildOptions, staging_dir: Optional[str] = None) -> None:
    """Compose the rebuild job on `pipeline`. With `staging_dir` (local runs), what crosses the
    shuffles (candidates, the reshuffled records, encoded samples) and the rejects' Flattens
    waits in files there, so that memory does not grow with the input (`transforms.spill`)."""
    output = options.output.rstrip("/")
    no_embeddings = options.no_embeddings or options.annotator == "lite"
    write_shards = WriteShards(output, no_embeddings=no_embeddings, crawl_time=options.crawl_time)
    annotate = annotate_stage(options, no_embeddings)
    composite = gpu_stage(options, write_shards, no_embeddings, annotate, staging_dir)

    # ReadYfcc | Prefilter fused in one step per file (same outputs, no element in between).
    licenses = split_list(options.licenses) or list(FDH_LICENSES)
    prefiltered = pipeline | "ReadAndPrefilter" >> ReadAndPrefilter(
        split_list(options.yfcc), licenses=licenses, opt_out_paths=_opt_out_paths(options),
        staging_dir=staging_dir)
    fetched = fetch_stage(prefiltered.main | "Reshuffle" >> SpilledReshuffle(staging_dir), options,
                          annotate)
    encoded = fetched.main | "GpuStage" >> composite
    stages = [prefiltered, fetched, encoded]
    samples = encoded.main
    consent = consent_stage(options)
    if consent is not None:  # only photos that yield a sample cost an API call
        checked = (samples | "ConsentSubjects" >> beam.Map(consent_subject)
                   | "CheckConsent" >> consent.spilling_to(staging_dir))
        samples = checked.main | "ConsentKept" >> beam.Map(with_consent_fields)
        stages.append(checked)
    written = samples | "WriteShards" >> write_shards.writer(staging_dir)
    stages.append(written)

    rejects = tuple(stage.rejects for stage in stages) | "AllRejects" >> flatten_spilling_to(
        staging_dir)
    if staging_dir:  # every stage's rejects crossed their Flattens as batch references
        rejects = rejects | "LoadRejects" >> LoadSpilled()
    rejects_written = rejects | "WriteRejects" >> WriteRejects(output)
    funnel = ((_sum_line_counts(prefiltered.line_counts),
               count_step(prefiltered.main, "candidates"),
               encoded.counts,
               rejects | "RejectCounts" >> CountRejects() | "RejectItems" >> beam.FlatMap(
                   lambda counts: sorted(counts.items())))
              | "FunnelItems" >> beam.Flatten()
              | "FunnelDict" >> beam.combiners.ToDict()
              # The manifest is written last, so it must wait for rejects/ (a side input is
              # complete before its consumer runs).
              | "AfterRejects" >> beam.Map(lambda counts, _: counts,
                                           beam.pvalue.AsList(rejects_written)))
    config = {**content_config(options), **write_shards.config}
    _ = {"shards": written.main, "counts": funnel} | "WriteRunOutputs" >> WriteRunOutputs(
        output, config=config, versions=launch_versions(options), crawl_time=options.crawl_time)


def summarize(output: str) -> str:
    """A short human summary: kept per licence x split, rejects per reason, where the output is."""
    stats = load_json(output, STATS_FILE)
    lines = [f"FDH rebuild finished: {output}"]
    written = stats.get("written", {})
    lines.append(f"  samples kept: {stats.get('totals', {}).get('samples', 0)}")
    for license_slug in sorted(written):
        cells = ", ".join(f"{split} {cell['samples']} ({cell['shards']} shards, "
                          f"{human_bytes(cell['bytes'])})"
                          for split, cell in sorted(written[license_slug].items()))
        lines.append(f"    {license_slug:<14} {cells}")
    funnel = stats.get("funnel", {})
    lines.append("  funnel:")
    lines.extend(f"    {label:<44} {count:>10,d}" for label, count, _ in funnel_rows(funnel))
    errors = accounting_errors(funnel)
    lines.append("  accounting: " + ("every line accounted for" if not errors else "; ".join(errors)))
    lines.append(f"  rejects:  {output}/rejects/   manifest: {output}/manifest.json")
    return "\n".join(lines)


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the job; returns the stats dict (local runs) after printing a summary."""
    rebuild_options, options = split_job_flags(RebuildOptions, argv, __doc__)
    if not rebuild_options.yfcc or not rebuild_options.output:
        raise UsageError("rebuild needs --yfcc=PATH[,PATH...] and --output=DIR (see --help)")
    parse_max_reject_rates(rebuild_options.max_reject_rate)  # a bad value fails here, exit 2
    check_remote_launch(rebuild_options, options)
    output = rebuild_options.output.rstrip("/")
    with run_lock(output, "rebuild"):
        check_output_ownership(output, content_config(rebuild_options), rebuild_options.overwrite)
        if rebuild_options.crawl_time is None:
            rebuild_options.crawl_time = resolve_crawl_time(output, None, default=time.time())
        pipeline = make_pipeline(options)
        staging_dir = local_staging_dir("rebuild") if is_local(options) else None
        build(pipeline, rebuild_options, staging_dir)
        try:
            with report_progress("rebuild", input_size(split_list(rebuild_options.yfcc))):
                result = pipeline.run()
                result.wait_until_finish()
        finally:
            if staging_dir:
                remove_staging(staging_dir)
        remove_empty_beam_temp_folders(output)
    if is_local(options) or FileSystems.exists(f"{output}/{STATS_FILE}"):
        print(summarize(output))
        stats = load_json(output, STATS_FILE)
        check_reject_rates(stats.get("funnel", {}), rebuild_options.max_reject_rate,
                           f"{output}/rejects/*.parquet")
        return stats
    return {}


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(run, argv)


if __name__ == "__main__":
    main()
