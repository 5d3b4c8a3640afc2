"""The GPU composite: decode -> annotate -> select -> crop -> split -> encode, on the GPU workers.

    FetchedImage ──► [ GpuStage: DecodeImages -> Annotate -> SelectPersons -> CropPersons ->
                       AssignSplit -> EncodeSamples ] ──► EncodedSample, Rejected, funnel counts

Steps in different Beam environments cannot fuse, so whatever crosses the CPU/GPU boundary is
materialised and shuffled. Only the fetched, size-checked encoded bytes plus the record
(`FetchedImage`) go in; only encoded samples (PNG/npy members + Parquet row, `EncodedSample`),
rejects and the funnel's step counts come out. Decoded pixels, full-frame masks and crops stay
inside one fused stage. The split is a pure hash of the record, and the encoder needs it (it is
in each sample's `json` member and Parquet row), so it runs inside too.

`accelerator_hint` builds Dataflow's right-fitting accelerator value (GPU type, count and machine
type for the GPU workers only); the rest of the job keeps the job's default machine type.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import apache_beam as beam

from transforms.funnel import step_key
from transforms.s4_decode import DecodeImages
from transforms.s5_annotate import Annotate
from transforms.s6_select import SelectPersons
from transforms.s7_crop import CropPersons
from transforms.s8_write import AssignSplit
from transforms.s8_write.write import EncodeSamples
from transforms.spill import flatten_spilling_to

# The funnel steps counted inside the composite: the main outputs of decode, annotate, select, crop.
COUNTED_STEPS = ("decoded", "annotated", "photos_with_person", "samples")


def accelerator_hint(gpu_type: str, gpu_count: int = 1, machine_type: Optional[str] = None) -> str:
    """Dataflow's `accelerator` resource hint value: `type:T;count:N[;machine_type:M];
    install-nvidia-driver` (Dataflow right fitting: the machine type of the GPU workers only)."""
    if not gpu_type or ";" in gpu_type or ":" in gpu_type:
        raise ValueError(f"--gpu_type must be an accelerator name such as nvidia-tesla-t4, "
                         f"got {gpu_type!r}")
    if int(gpu_count) < 1:
        raise ValueError(f"--gpu_count must be >= 1, got {gpu_count}")
    parts = [f"type:{gpu_type}", f"count:{int(gpu_count)}"]
    if machine_type:
        if ";" in machine_type or ":" in machine_type:
            raise ValueError(f"--gpu_machine_type must be a machine type, got {machine_type!r}")
        parts.append(f"machine_type:{machine_type}")
    return ";".join(parts + ["install-nvidia-driver"])


def count_step(pcoll: beam.PCollection, step: str) -> beam.PCollection:
    """A singleton (step_key(step), number of elements of `pcoll`) for the stats funnel."""
    label = step.title().replace("_", "")
    return (pcoll
            | f"Count{label}" >> beam.combiners.Count.Globally()
            | f"Key{label}" >> beam.Map(lambda n, key=step_key(step): (key, n)))


class GpuStageOutput(NamedTuple):
    """What leaves the GPU composite: encoded samples, rejects, and (step key, count) pairs."""

    main: beam.PCollection
    rejects: beam.PCollection
    counts: beam.PCollection


class GpuStage(beam.PTransform):
    """FetchedImage -> GpuStageOutput(EncodedSample, Rejected, funnel counts); see module doc.

    Args:
      annotate, select, crop, split, encode: the stage transforms, configured by the job.
      decode: the decode stage (default `DecodeImages()`).
      accelerator: an `accelerator_hint` value; None: no hint (local runs, the lite annotator).
      staging_dir: local runs: the rejects cross their Flatten as `transforms.spill.SpilledBatch`
        references to files there (load them with `LoadSpilled`); None: plain `Rejected`.
    """

    def __init__(self, annotate: Annotate, select: SelectPersons, crop: CropPersons,
                 split: AssignSplit, encode: EncodeSamples, decode: Optional[DecodeImages] = None,
                 accelerator: Optional[str] = None, staging_dir: Optional[str] = None):
        super().__init__()
        self._stages = (("DecodeImages", decode or DecodeImages()), ("Annotate", annotate),
                        ("SelectPersons", select), ("CropPersons", crop),
                        ("AssignSplit", split), ("EncodeSamples", encode))
        self._staging_dir = staging_dir
        if accelerator:
            self.with_resource_hints(accelerator=accelerator)

    def expand(self, fetched: beam.PCollection) -> GpuStageOutput:
        outputs, pcoll = [], fetched
        for label, stage in self._stages:
            output = pcoll | label >> stage
            outputs.append(output)
            pcoll = output.main
        counts = tuple(count_step(output.main, step) for step, output in zip(COUNTED_STEPS, outputs))
        rejects = (tuple(output.rejects for output in outputs)
                   | "Rejects" >> flatten_spilling_to(self._staging_dir))
        return GpuStageOutput(main=pcoll, rejects=rejects,
                              counts=counts | "Counts" >> beam.Flatten())
