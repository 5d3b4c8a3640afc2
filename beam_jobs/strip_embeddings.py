"""Derive the no-embeddings variant of a built FDH dataset, without re-annotating.

    python -m beam_jobs.strip_embeddings --dataset=IN --output=OUT [Beam flags]

Every tar shard is rewritten without `e_mask.png`/`vertices.npy` (one shard per Beam element, in
parallel); Parquet, metadata.json, opt_out.txt and rejects are copied; the manifest and stats are
rewritten (config.no_embeddings = true). Like FDH's `download_no_embeddings.py`, but from a local
or gs:// dataset.
"""
from __future__ import annotations

from typing import Optional, Sequence

import apache_beam as beam

from beam_jobs.common import JobOptions, make_pipeline, run_main, split_job_flags
from dataset.manifest import check_manifest_paths
from transforms.s8_write.no_embeddings import check_strip_paths, finish_strip, strip_shard


class StripEmbeddingsOptions(JobOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--dataset", required=True,
                            help="A built dataset (directory or gs:// prefix with manifest.json).")
        parser.add_argument("--output", required=True,
                            help="Where to write the no-embeddings variant (must differ from --dataset).")


def build(pipeline: beam.Pipeline, dataset: str, output: str, manifest: dict):
    """Strip every shard listed in `manifest`, then write the run-level files; returns the manifest PCollection."""
    return (
        pipeline
        | "Shards" >> beam.Create(manifest["shards"])
        | "Spread" >> beam.Reshuffle()
        | "StripShard" >> beam.Map(lambda entry: strip_shard(dataset, output, entry))
        | "Collect" >> beam.combiners.ToList()
        | "Finish" >> beam.Map(lambda entries: finish_strip(dataset, output, entries, manifest)))


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the job; returns the new manifest's summary {"shards", "samples"}."""
    args, options = split_job_flags(StripEmbeddingsOptions, argv, __doc__)
    if not args.dataset or not args.output:
        raise ValueError("strip_embeddings needs --dataset=IN and --output=OUT")
    dataset, output = args.dataset.rstrip("/"), args.output.rstrip("/")
    manifest = check_strip_paths(dataset, output)
    check_manifest_paths(dataset, manifest)
    pipeline = make_pipeline(options)
    build(pipeline, dataset, output, manifest)
    pipeline.run().wait_until_finish()
    summary = {"shards": len(manifest["shards"]),
               "samples": sum(int(e["samples"]) for e in manifest["shards"])}
    print(f"wrote the no-embeddings variant: {summary['shards']} shards, {summary['samples']} samples")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(run, argv)


if __name__ == "__main__":
    main()
