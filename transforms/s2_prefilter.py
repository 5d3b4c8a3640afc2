"""Stage 2, prefilter: keep only the YFCC records that may be used, before any fetching.

A record is dropped (and rejected with a reason) when it is a video ('video'), its licence is
not CC ('license_unknown') or not in the allowlist ('license_not_allowed'), its owner tagged it
with an opt-out tag such as `no_cv` ('no_cv_tag'), its owner or the photo is on an opt-out list
('user_opt_out', 'photo_opt_out'), or its photo id was already seen ('duplicate_photo_id': the
record with the lowest source file:line is kept, so the choice does not depend on the runner).

The pure core is `PrefilterRules.check` and `keep_first_of_each_photo` (with
`order_duplicates`); `Prefilter` is the Beam wrapper.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from transforms.opt_out import OptOut, read_opt_out
from transforms.records import FDH_LICENSES, LICENSES, METRICS_NAMESPACE, REJECTS_TAG, YfccRecord
from transforms.rejects import reject
from transforms.s1_read import RECORD_FIELDS, record_from_fields, record_to_fields

STAGE = "prefilter"
DEFAULT_DROP_TAGS = ("no_cv",)
VALID_LICENSE_SLUGS = tuple(slug for slug, _ in LICENSES.values())


def validate_licenses(licenses: Iterable[str]) -> tuple[str, ...]:
    """Check licence slugs (e.g. 'cc-by-2'); raise ValueError listing the valid ones."""
    licenses = tuple(licenses)
    unknown = [slug for slug in licenses if slug not in VALID_LICENSE_SLUGS]
    if unknown or not licenses:
        raise ValueError(
            f"unknown licence(s) {unknown or '(none given)'}; valid licences are "
            f"{', '.join(VALID_LICENSE_SLUGS)} (FDH publishes {', '.join(FDH_LICENSES)})")
    return licenses


@dataclass(frozen=True)
class PrefilterRules:
    """The per-record rules: which licences are allowed, which tags and people opt out."""

    licenses: frozenset[str] = frozenset(FDH_LICENSES)
    drop_tags: frozenset[str] = frozenset(DEFAULT_DROP_TAGS)  # lower case
    opt_out: OptOut = OptOut()

    @classmethod
    def create(cls, licenses: Iterable[str] = FDH_LICENSES,
               drop_tags: Iterable[str] = DEFAULT_DROP_TAGS,
               opt_out: OptOut = OptOut()) -> "PrefilterRules":
        return cls(frozenset(validate_licenses(licenses)),
                   frozenset(tag.strip().lower() for tag in drop_tags), opt_out)

    def check(self, record: YfccRecord) -> Optional[tuple[str, str]]:
        """(reason, detail) when the record must be dropped, else None."""
        if record.marker != 0:
            return "video", ""
        if record.license is None:
            return "license_unknown", record.license_name
        if record.license not in self.licenses:
            return "license_not_allowed", record.license
        if self.drop_tags:
            for tag in record.user_tags:
                if tag.strip().lower() in self.drop_tags:
                    return "no_cv_tag", tag
        excluded = self.opt_out.excludes(record.user_nsid, record.photo_id)
        if excluded:
            return excluded, ""
        return None


def source_order(record: YfccRecord) -> tuple[str, int]:
    """Sort key of where a record was read: (file, line number), numbers compared as numbers."""
    path, _, line = record.source.rpartition(":")
    return (path, int(line)) if line.isdigit() else (record.source, -1)


def order_duplicates(records: Iterable[YfccRecord]) -> list[YfccRecord]:
    """Records sharing a photo id, the one to keep first (lowest source), then the duplicates."""
    return sorted(records, key=source_order)


# The duplicate check shuffles the candidates in batches keyed by a bucket of photo ids
# (photo_id % ID_BUCKETS) instead of one element per photo: the per-element cost of a shuffle
# (runner bookkeeping, coder calls) is paid once per batch, and a record travels as the plain
# tuple of its fields, which Beam's C coder encodes fast. The buckets spread the check over
# workers; a batch is sent when BATCH_SIZE records of one bucket are buffered.
ID_BUCKETS = 64
BATCH_SIZE = 256
_PHOTO_ID = RECORD_FIELDS.index("photo_id")


def keep_first_of_each_photo(records: Iterable[YfccRecord],
                             photo_id_counts: Optional[Mapping[int, int]] = None
                             ) -> Iterator[tuple[YfccRecord, list[YfccRecord]]]:
    """(record to keep, its duplicates) per photo id of `records`, in any order.

    Streams: only the photo id counts are held in memory (counted in a first pass over the
    re-iterable `records` unless given), plus the records of repeated ids (rare), which are
    ordered by `order_duplicates`.
    """
    counts = photo_id_counts or Counter(record.photo_id for record in records)
    repeated: dict[int, list[YfccRecord]] = {}
    for record in records:
        if counts[record.photo_id] == 1:
            yield record, []
        else:
            repeated.setdefault(record.photo_id, []).append(record)
    for same_photo in repeated.values():
        kept, *duplicates = order_duplicates(same_photo)
        yield kept, duplicates


class _ApplyRulesFn(beam.DoFn):
    """Apply `PrefilterRules`; the opt-out lists are read once per worker in setup().

    Emits the rejects, and the candidates as (bucket, [record fields]) batches for the
    duplicate check (the last, partial, batches at the end of the bundle).
    """

    def __init__(self, licenses: Sequence[str], drop_tags: Sequence[str],
                 opt_out_paths: Sequence[str]):
        self._licenses = tuple(licenses)
        self._drop_tags = tuple(drop_tags)
        self._opt_out_paths = tuple(opt_out_paths)
        self._rules: Optional[PrefilterRules] = None
        self._batches: dict[int, list[tuple]] = {}
        self._passed = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.passed_rules")

    def setup(self):
        self._rules = PrefilterRules.create(self._licenses, self._drop_tags,
                                            read_opt_out(self._opt_out_paths))

    def start_bundle(self):
        self._batches = {}

    def process(self, record: YfccRecord):
        verdict = self._rules.check(record)
        if verdict is None:
            bucket = record.photo_id % ID_BUCKETS
            batch = self._batches.setdefault(bucket, [])
            batch.append(record_to_fields(record))
            if len(batch) >= BATCH_SIZE:
                self._passed.inc(len(batch))
                yield bucket, self._batches.pop(bucket)
        else:
            reason, detail = verdict
            yield reject(STAGE, reason, str(record.photo_id), detail,
                         photo_id=record.photo_id, user_nsid=record.user_nsid)

    def finish_bundle(self):
        # Prefilter.expand checks that the input is in the global window.
        for bucket, batch in self._batches.items():
            self._passed.inc(len(batch))
            yield GlobalWindows.windowed_value((bucket, batch))
        self._batches = {}


class _KeepFirstOfPhotoFn(beam.DoFn):
    """Keep one record per photo id of a bucket (lowest source); reject the others."""

    def __init__(self):
        self._kept = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.candidates")

    def process(self, bucket_batches):
        _, batches = bucket_batches
        records = _ReiterableRecords(batches)
        kept_count = 0
        for kept, duplicates in keep_first_of_each_photo(records, records.photo_id_counts()):
            kept_count += 1
            yield kept
            for duplicate in duplicates:
                yield reject(STAGE, "duplicate_photo_id", str(kept.photo_id),
                             f"{duplicate.source} repeats {kept.source}",
                             photo_id=kept.photo_id, user_nsid=duplicate.user_nsid)
        self._kept.inc(kept_count)


class _ReiterableRecords:
    """The records of a grouped bucket's batches, decoded again on each iteration (so that a
    bucket's records never need to be in memory all at once, as lists of records)."""

    def __init__(self, batches: Iterable[list[tuple]]):
        # Runners give re-iterable GroupByKey values; a one-shot iterator is kept as a list.
        self._batches = batches if iter(batches) is not batches else list(batches)

    def __iter__(self) -> Iterator[YfccRecord]:
        for batch in self._batches:
            yield from map(record_from_fields, batch)

    def photo_id_counts(self) -> Counter:
        """How often each photo id occurs, read off the field tuples (no records built)."""
        return Counter(fields[_PHOTO_ID] for batch in self._batches for fields in batch)


class Prefilter(beam.PTransform):
    """Keep the usable photos of a PCollection of `YfccRecord`s (in the global window).

    Returns {"main": YfccRecord (unique photo ids), "rejects": Rejected}. The rules run first,
    so only candidates are shuffled, in batches by bucket of photo ids, for the duplicate check.
    """

    def __init__(self, licenses: Iterable[str] = FDH_LICENSES,
                 opt_out_paths: Iterable[str] = (),
                 drop_tags: Iterable[str] = DEFAULT_DROP_TAGS):
        super().__init__()
        self._licenses = validate_licenses(licenses)
        self._opt_out_paths = tuple(path for path in opt_out_paths if path)
        self._drop_tags = tuple(drop_tags)

    def expand(self, records):
        if not isinstance(records.windowing.windowfn, GlobalWindows):
            raise ValueError("Prefilter needs its input in the global window (a batch job)")
        # Read the opt-out lists once now, so that a missing or malformed file fails early.
        read_opt_out(self._opt_out_paths)
        checked = records | "ApplyRules" >> beam.ParDo(
            _ApplyRulesFn(self._licenses, self._drop_tags, self._opt_out_paths)
        ).with_outputs(REJECTS_TAG, main="main")
        unique = (
            checked.main
            | "GroupByIdBucket" >> beam.GroupByKey()
            | "KeepFirst" >> beam.ParDo(_KeepFirstOfPhotoFn()).with_output_types(YfccRecord)
            .with_outputs(REJECTS_TAG, main="main"))
        rejects = ((checked[REJECTS_TAG], unique[REJECTS_TAG])
                   | "MergeRejects" >> beam.Flatten())
        return {"main": unique.main, "rejects": rejects}
