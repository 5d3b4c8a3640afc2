r"""The main job: rebuild FDH from YFCC100M metadata into per-licence WebDataset shards.

    python -m beam_jobs.rebuild --yfcc=yfcc100m_dataset-*.bz2 --output=OUT \
        --image_source=mirror:gs://my-bucket/yfcc --annotator=fdh --model_dir=gs://my-bucket/models

Stages (each a PTransform of `transforms/`, in data-flow order):
read -> prefilter -> reshuffle -> fetch -> decode -> annotate (GPU) -> select -> crop -> split ->
write shards -> manifest, metadata.json, stats.json. Every dropped element is a `Rejected` record
written under OUT/rejects/ and counted in stats.json, so that
lines read = rejects before annotation + photos decoded,
photos decoded = photos annotated + annotate rejects, and
photos annotated = photos select rejected whole + photos with >= 1 kept person
(`transforms.funnel.accounting_errors`).
Any Beam/Dataflow flag passes through (--runner, --project, --region, --sdk_container_image, ...).
"""
from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_jobs.common import (JobOptions, UsageError, is_local, make_pipeline, run_main,
                              split_job_flags, split_list)
from beam_jobs.launch_checks import check_remote_launch
from transforms.funnel import accounting_errors, funnel_rows, step_key
from transforms.opt_out import OPT_OUT_FILENAME
from transforms.records import FDH_LICENSES
from transforms.rejects import CountRejects, WriteRejects
from transforms.s2_prefilter import ReadAndPrefilter
from transforms.s3_fetch import FetchImages
from transforms.s4_decode import DecodeImages
from transforms.s5_annotate import Annotate
from transforms.s6_select import SelectPersons
from transforms.s7_crop import CropPersons
from dataset.fs import load_json
from dataset.layout import STATS_FILE
from transforms.s8_write import AssignSplit, WriteRunOutputs, WriteShards
from transforms.s8_write.run_outputs import resolve_crawl_time

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
                            help="Dataflow accelerator for the annotate step only, e.g. nvidia-tesla-t4")
        parser.add_argument("--max_batch_size", type=int, default=4, help="images per model call")
        parser.add_argument("--fetch_threads", type=int, default=16,
                            help="concurrent image requests per worker process")
        parser.add_argument("--requests_per_second", type=float, default=None,
                            help="cap on image requests per second per worker process, all hosts "
                                 "(default: none)")
        parser.add_argument("--flickr_requests_per_second", type=float, default=4.0,
                            help="cap on requests per second to Flickr's own hosts, per worker "
                                 "process (the job's total is workers x this); 0 for no cap")
        parser.add_argument("--flickr_concurrency", type=int, default=4,
                            help="requests in flight to one Flickr host, per worker process")
        parser.add_argument("--crawl_time", type=float, default=None,
                            help="unix time recorded as date_crawled / unixtime_crawled, the only "
                                 "time-dependent value in the output (default: the existing "
                                 "manifest's when rebuilding into an output, else the launch time; "
                                 "pass it to get byte-identical outputs in another directory)")
        parser.add_argument("--random_weights", action="store_true",
                            help="TESTS ONLY: torchvision models with random weights (plumbing)")


def _opt_out_paths(options: RebuildOptions) -> list[str]:
    paths = split_list(options.opt_out)
    own = f"{options.output.rstrip('/')}/{OPT_OUT_FILENAME}"
    if own not in paths and FileSystems.exists(own):
        paths.append(own)
    return paths


def _count(pcoll, step: str):
    """A singleton (step_key(step), n) for the stats funnel."""
    label = step.title().replace("_", "")
    return (pcoll
            | f"Count{label}" >> beam.combiners.Count.Globally()
            | f"Key{label}" >> beam.Map(lambda n, key=step_key(step): (key, n)))


def _sum_line_counts(line_counts):
    return (line_counts
            | "LineCountValues" >> beam.Values()
            | "SumLines" >> beam.CombineGlobally(sum)
            | "KeyLines" >> beam.Map(lambda n: (step_key("lines_read"), n)))


def run_config(options: RebuildOptions) -> dict:
    """Every flag of the job and its value, for manifest.json's "config" (except --output, so
    that a rebuild into another directory gives the same bytes).

    `vars(options)` holds none of them: PipelineOptions keeps its values in private fields."""
    parser = argparse.ArgumentParser()
    RebuildOptions._add_argparse_args(parser)
    return {name: getattr(options, name) for name in sorted(vars(parser.parse_args([])))
            if name != "output"}


def build(pipeline: beam.Pipeline, options: RebuildOptions) -> None:
    """Compose the rebuild job on `pipeline`."""
    output = options.output.rstrip("/")
    no_embeddings = options.no_embeddings or options.annotator == "lite"
    annotate = Annotate(annotator=options.annotator, model_dir=options.model_dir,
                        device=options.device, max_batch_size=options.max_batch_size,
                        no_embeddings=no_embeddings, gpu_type=options.gpu_type,
                        random_weights=options.random_weights,
                        require_detectron2_here=is_local(options), check_here=is_local(options),
                        detector=options.detector)
    part_table = None
    if options.annotator == "fdh" and not no_embeddings:
        part_table = options.model_dir

    # ReadYfcc | Prefilter fused in one step per file (same outputs, no element in between).
    licenses = split_list(options.licenses) or list(FDH_LICENSES)
    prefiltered = pipeline | "ReadAndPrefilter" >> ReadAndPrefilter(
        split_list(options.yfcc), licenses=licenses, opt_out_paths=_opt_out_paths(options))
    fetched = (prefiltered.main
               | "Reshuffle" >> beam.Reshuffle()
               | "FetchImages" >> FetchImages(
                   options.image_source, threads=options.fetch_threads,
                   requests_per_second=options.requests_per_second or None,
                   flickr_requests_per_second=options.flickr_requests_per_second or None,
                   flickr_concurrency=options.flickr_concurrency))
    decoded = fetched.main | "DecodeImages" >> DecodeImages()
    annotated = decoded.main | "Annotate" >> annotate
    selected = annotated.main | "SelectPersons" >> SelectPersons(part_table=part_table)
    cropped = selected.main | "CropPersons" >> CropPersons()
    split = cropped.main | "AssignSplit" >> AssignSplit(
        val_fraction=options.val_fraction, by=options.split_by)
    write_shards = WriteShards(output, no_embeddings=no_embeddings, crawl_time=options.crawl_time)
    written = split.main | "WriteShards" >> write_shards

    stages = (prefiltered, fetched, decoded, annotated, selected, cropped, split, written)
    rejects = tuple(stage.rejects for stage in stages) | "AllRejects" >> beam.Flatten()
    _ = rejects | "WriteRejects" >> WriteRejects(output)
    funnel = ((_sum_line_counts(prefiltered.line_counts),
               _count(prefiltered.main, "candidates"),
               _count(decoded.main, "decoded"),
               _count(annotated.main, "annotated"),
               _count(selected.main, "photos_with_person"),
               _count(cropped.main, "samples"),
               rejects | "RejectCounts" >> CountRejects() | "RejectItems" >> beam.FlatMap(
                   lambda counts: sorted(counts.items())))
              | "FunnelItems" >> beam.Flatten()
              | "FunnelDict" >> beam.combiners.ToDict())
    config = {**run_config(options), "licenses": ",".join(licenses), "no_embeddings": no_embeddings,
              **write_shards.config}
    _ = {"shards": written.main, "counts": funnel} | "WriteRunOutputs" >> WriteRunOutputs(
        output, config=config, crawl_time=options.crawl_time)


def summarize(output: str) -> str:
    """A short human summary: kept per licence x split, rejects per reason, where the output is."""
    stats = load_json(output, STATS_FILE)
    lines = [f"FDH rebuild finished: {output}"]
    written = stats.get("written", {})
    lines.append(f"  samples kept: {stats.get('totals', {}).get('samples', 0)}")
    for license_slug in sorted(written):
        cells = ", ".join(f"{split} {cell['samples']} ({cell['shards']} shards, "
                          f"{cell['bytes'] / 2**20:.1f} MiB)"
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
    check_remote_launch(rebuild_options, options)
    if rebuild_options.crawl_time is None:
        rebuild_options.crawl_time = resolve_crawl_time(rebuild_options.output, None, default=time.time())
    pipeline = make_pipeline(options)
    build(pipeline, rebuild_options)
    result = pipeline.run()
    result.wait_until_finish()
    if is_local(options) or FileSystems.exists(f"{rebuild_options.output.rstrip('/')}/{STATS_FILE}"):
        print(summarize(rebuild_options.output))
        return load_json(rebuild_options.output, STATS_FILE)
    return {}


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(run, argv)


if __name__ == "__main__":
    main()
