"""Stage 2, prefilter: keep only the YFCC records that may be used, before any fetching.

A record is dropped (and rejected with a reason) when it is a video ('video'), its licence is
not CC ('license_unknown') or not in the allowlist ('license_not_allowed'), its owner tagged it
with an opt-out tag such as `no_cv` ('no_cv_tag'), its owner or the photo is on an opt-out list
('user_opt_out', 'photo_opt_out'), or its photo id was already seen ('duplicate_photo_id': the
record with the lowest source file:line is kept, so the choice does not depend on the runner).

The pure core is `PrefilterRules.check` and `order_duplicates`; `Prefilter` is the Beam wrapper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.opt_out import OptOut, read_opt_out
from transforms.records import FDH_LICENSES, LICENSES, METRICS_NAMESPACE, REJECTS_TAG, YfccRecord
from transforms.rejects import reject
from transforms.s1_read import YfccRecordCoder  # noqa: F401  (registers the YfccRecord coder)

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


class _ApplyRulesFn(beam.DoFn):
    """Apply `PrefilterRules`; the opt-out lists are read once per worker in setup()."""

    def __init__(self, licenses: Sequence[str], drop_tags: Sequence[str],
                 opt_out_paths: Sequence[str]):
        self._licenses = tuple(licenses)
        self._drop_tags = tuple(drop_tags)
        self._opt_out_paths = tuple(opt_out_paths)
        self._rules: Optional[PrefilterRules] = None
        self._passed = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.passed_rules")

    def setup(self):
        self._rules = PrefilterRules.create(self._licenses, self._drop_tags,
                                            read_opt_out(self._opt_out_paths))

    def process(self, record: YfccRecord):
        verdict = self._rules.check(record)
        if verdict is None:
            self._passed.inc()
            yield record.photo_id, record  # keyed for the duplicate check
        else:
            reason, detail = verdict
            yield reject(STAGE, reason, str(record.photo_id), detail,
                         photo_id=record.photo_id, user_nsid=record.user_nsid)


class _KeepFirstOfPhotoFn(beam.DoFn):
    """Keep one record per photo id (lowest source); reject the others as duplicates."""

    def __init__(self):
        self._kept = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.candidates")

    def process(self, keyed):
        photo_id, records = keyed
        kept, *duplicates = order_duplicates(records)
        self._kept.inc()
        yield kept
        for duplicate in duplicates:
            yield reject(STAGE, "duplicate_photo_id", str(photo_id),
                         f"{duplicate.source} repeats {kept.source}",
                         photo_id=photo_id, user_nsid=duplicate.user_nsid)


class Prefilter(beam.PTransform):
    """Keep the usable photos of a PCollection of `YfccRecord`s.

    Returns {"main": YfccRecord (unique photo ids), "rejects": Rejected}. The rules run first,
    so only candidates are shuffled by photo id for the duplicate check.
    """

    def __init__(self, licenses: Iterable[str] = FDH_LICENSES,
                 opt_out_paths: Iterable[str] = (),
                 drop_tags: Iterable[str] = DEFAULT_DROP_TAGS):
        super().__init__()
        self._licenses = validate_licenses(licenses)
        self._opt_out_paths = tuple(path for path in opt_out_paths if path)
        self._drop_tags = tuple(drop_tags)

    def expand(self, records):
        # Read the opt-out lists once now, so that a missing or malformed file fails early.
        read_opt_out(self._opt_out_paths)
        checked = records | "ApplyRules" >> beam.ParDo(
            _ApplyRulesFn(self._licenses, self._drop_tags, self._opt_out_paths)
        ).with_output_types(tuple[int, YfccRecord]).with_outputs(REJECTS_TAG, main="main")
        unique = (
            checked.main
            | "GroupByPhotoId" >> beam.GroupByKey()
            | "KeepFirst" >> beam.ParDo(_KeepFirstOfPhotoFn()).with_output_types(YfccRecord)
            .with_outputs(REJECTS_TAG, main="main"))
        rejects = ((checked[REJECTS_TAG], unique[REJECTS_TAG])
                   | "MergeRejects" >> beam.Flatten())
        return {"main": unique.main, "rejects": rejects}
