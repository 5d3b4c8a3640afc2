"""Train/val split: a deterministic hash of the user NSID (default) or photo id.

All persons of one photo share the record, hence the split; by NSID one user's photos never leak
across splits. FDH's val split is ~1.7% (24 of 1,448 shards), so `val_fraction` defaults to 0.017.
"""
from __future__ import annotations

import dataclasses
import hashlib

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.records import METRICS_NAMESPACE, REJECTS_TAG, FdhSample, YfccRecord
from transforms.stage import StageDoFn, StageOutput, stage_output

SPLIT_BY = ("user_nsid", "photo_id")
DEFAULT_VAL_FRACTION = 0.017
DEFAULT_SPLIT_SEED = "fdh"


def split_value(record: YfccRecord, by: str = "user_nsid") -> str:
    """The string hashed for the split: the NSID (photo id when a record has none) or the photo id."""
    if by not in SPLIT_BY:
        raise ValueError(f"split by must be one of {SPLIT_BY}, not {by!r}")
    if by == "user_nsid" and record.user_nsid:
        return f"user:{record.user_nsid}"
    return f"photo:{int(record.photo_id)}"


def split_of(record: YfccRecord, val_fraction: float = DEFAULT_VAL_FRACTION,
             by: str = "user_nsid", seed: str = DEFAULT_SPLIT_SEED) -> str:
    """'val' for a `val_fraction` share of users (or photos), chosen by sha256, else 'train'."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], not {val_fraction}")
    digest = hashlib.sha256(f"{seed}\0{split_value(record, by)}".encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


def assign_split(sample: FdhSample, val_fraction: float = DEFAULT_VAL_FRACTION,
                 by: str = "user_nsid", seed: str = DEFAULT_SPLIT_SEED) -> FdhSample:
    """A copy of `sample` with its split set."""
    return dataclasses.replace(sample, split=split_of(sample.record, val_fraction, by, seed))


class _AssignSplitFn(StageDoFn):
    stage = "split"

    def __init__(self, val_fraction: float, by: str, seed: str):
        self._val_fraction, self._by, self._seed = val_fraction, by, seed

    def setup(self):
        self._counters = {name: Metrics.counter(METRICS_NAMESPACE, f"split.{name}")
                          for name in ("train", "val")}

    def process_element(self, sample: FdhSample):
        sample = assign_split(sample, self._val_fraction, self._by, self._seed)
        self._counters[sample.split].inc()
        yield sample


class AssignSplit(beam.PTransform):
    """Set `FdhSample.split` to 'train' or 'val' by a deterministic hash (see `split_of`)."""

    def __init__(self, val_fraction: float = DEFAULT_VAL_FRACTION, by: str = "user_nsid",
                 seed: str = DEFAULT_SPLIT_SEED):
        super().__init__()
        if by not in SPLIT_BY:
            raise ValueError(f"AssignSplit(by=...) must be one of {SPLIT_BY}, not {by!r}")
        if not 0.0 <= val_fraction <= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1], not {val_fraction}")
        self._val_fraction, self._by, self._seed = val_fraction, by, seed

    def expand(self, samples: beam.PCollection) -> StageOutput:
        return stage_output(samples | "Split" >> beam.ParDo(_AssignSplitFn(
            self._val_fraction, self._by, self._seed)).with_outputs(REJECTS_TAG, main="main"))
