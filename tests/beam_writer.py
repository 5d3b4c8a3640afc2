"""Write a whole dataset from in-memory samples through the Beam writer, as the rebuild does:
`AssignSplit | WriteShards | WriteRunOutputs` in a local pipeline (tests and benches)."""
from __future__ import annotations

import collections
from typing import Any, Iterable, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs.common import make_pipeline
from dataset import fs
from dataset.layout import MANIFEST_FILE
from transforms.records import FdhSample
from transforms.rejects import CountRejects
from transforms.s8_write import MAX_BYTES, MAX_SAMPLES, AssignSplit, WriteRunOutputs, WriteShards


def _add_counts(reject_counts: dict, given: dict) -> dict:
    return dict(collections.Counter(given) + collections.Counter(reject_counts))


def write_with_beam(output_dir: str, samples: Iterable[FdhSample], *, no_embeddings: bool = False,
                    max_samples: int = MAX_SAMPLES, max_bytes: int = MAX_BYTES,
                    crawl_time: Optional[float] = None, val_fraction: Optional[float] = None,
                    counts: Optional[dict] = None, versions: Optional[dict] = None,
                    config: Optional[dict] = None) -> dict[str, Any]:
    """Write `samples` as a dataset in `output_dir`; returns its manifest. Samples keep their
    split unless `val_fraction` is given; `counts` are added to the reject counts in stats.json."""
    output_dir = str(output_dir)
    with make_pipeline(PipelineOptions([])) as pipeline:
        split = pipeline | beam.Create(list(samples))
        if val_fraction is not None:
            split = (split | AssignSplit(val_fraction=val_fraction)).main
        write = WriteShards(output_dir, no_embeddings=no_embeddings, max_samples=max_samples,
                            max_bytes=max_bytes, crawl_time=crawl_time)
        written = split | write
        funnel = (written.rejects | CountRejects()
                  | beam.Map(_add_counts, given=dict(counts or {})))
        _ = {"shards": written.main, "counts": funnel} | WriteRunOutputs(
            output_dir, config={**write.config, **(config or {})}, versions=versions,
            crawl_time=crawl_time)
    return fs.load_json(output_dir, MANIFEST_FILE)
