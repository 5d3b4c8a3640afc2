"""Export a built dataset to FDH's own layout, so DP2's FDH configs load it.

    python -m beam_jobs.export --dataset=OUT --licenses=cc-by-2,cc-by-sa-2,... --output=DIR

Writes DIR/train/out-%06d.tar and DIR/val/out-%06d.tar (numbered contiguously across the chosen
licences, in the order given; 3,000 samples / 200 MiB per shard as FDH), their Parquet,
metadata.json and manifest.json (see `dataset.export`). Point DP2's `configs/datasets/fdh.py`
`data_dir` at DIR (and its shard ranges at the counts printed here).
"""
from __future__ import annotations

from typing import Optional, Sequence

from beam_jobs.common import JobOptions, UsageError, run_main, split_job_flags
from dataset.export import MAX_BYTES, MAX_SAMPLES, export_fdh_layout


class ExportOptions(JobOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--dataset", required=True, help="A built dataset (manifest.json).")
        parser.add_argument("--licenses", required=True,
                            help="Comma-separated licence slugs to export, in order, e.g. "
                                 "cc-by-2,cc-by-sa-2,cc-by-nc-2,cc-by-nc-sa-2 (FDH's four).")
        parser.add_argument("--output", required=True, help="An empty directory for the export.")
        parser.add_argument("--max_samples", type=int, default=MAX_SAMPLES, help="Samples per shard.")
        parser.add_argument("--max_bytes", type=int, default=MAX_BYTES, help="Tar bytes per shard.")


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the export; returns the new manifest."""
    args, _ = split_job_flags(ExportOptions, argv, __doc__)
    licenses = [name.strip() for name in args.licenses.split(",") if name.strip()]
    try:
        manifest = export_fdh_layout(args.dataset, licenses, args.output, args.max_samples, args.max_bytes)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from error
    for split in ("train", "val"):
        count = sum(1 for entry in manifest["shards"] if entry["split"] == split)
        last = f"out-{{000000..{count - 1:06d}}}.tar" if count else "(none)"
        print(f"{split}: {count} shards {last}")
    print(f"exported {manifest['samples']} samples of {','.join(licenses)} to {args.output}")
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(run, argv)


if __name__ == "__main__":
    main()
