"""The prefilter's rules, pure Python: which records may be used, and which copy of a repeated
photo id is kept (`PrefilterRules.check`, `keep_first_of_each_photo`)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Optional


from transforms.opt_out import OptOut
from transforms.records import (FDH_LICENSES, LICENSES, YfccRecord)
from transforms.s1_read import RECORD_FIELDS
from transforms.tags import clean_tag, find_tag

STAGE = "prefilter"
DEFAULT_DROP_TAGS = ("no_cv",)
VALID_LICENSE_SLUGS = tuple(slug for slug, _ in LICENSES.values())
USABLE_LICENSE_SLUGS = tuple(slug for slug in VALID_LICENSE_SLUGS if "-nd-" not in slug)


# Licences a dataset of crops cannot use, with the reason (FDH publishes none of them).
REFUSED_LICENSES = {
    **{slug: "a NoDerivs licence forbids derivatives, and crops are derivatives"
       for slug in VALID_LICENSE_SLUGS if "-nd-" in slug},
    **{slug: "all rights reserved: no licence to copy, let alone derive crops"
       for slug in ("all-rights-reserved", "arr", "copyright")},
}


def validate_licenses(licenses: Iterable[str]) -> tuple[str, ...]:
    """Check licence slugs (e.g. 'cc-by-2'); raise ValueError listing the valid ones, or
    saying why a NoDerivs / all-rights-reserved licence cannot be used."""
    licenses = tuple(licenses)
    refused = [f"{slug} ({REFUSED_LICENSES[slug.lower()]})" for slug in licenses
               if slug.lower() in REFUSED_LICENSES]
    if refused:
        raise ValueError(f"licence(s) refused: {'; '.join(refused)}; usable licences are "
                         f"{', '.join(USABLE_LICENSE_SLUGS)}")
    unknown = [slug for slug in licenses if slug not in VALID_LICENSE_SLUGS]
    if unknown or not licenses:
        raise ValueError(
            f"unknown licence(s) {unknown or '(none given)'}; usable licences are "
            f"{', '.join(USABLE_LICENSE_SLUGS)} (FDH publishes {', '.join(FDH_LICENSES)})")
    return licenses


@dataclass(frozen=True)
class PrefilterRules:
    """The per-record rules: which licences are allowed, which tags and people opt out."""

    licenses: frozenset[str] = frozenset(FDH_LICENSES)
    drop_tags: frozenset[str] = frozenset(map(clean_tag, DEFAULT_DROP_TAGS))  # Flickr's clean form
    opt_out: OptOut = OptOut()

    @classmethod
    def create(cls, licenses: Iterable[str] = FDH_LICENSES,
               drop_tags: Iterable[str] = DEFAULT_DROP_TAGS,
               opt_out: OptOut = OptOut()) -> "PrefilterRules":
        return cls(frozenset(validate_licenses(licenses)),
                   frozenset(filter(None, map(clean_tag, drop_tags))), opt_out)

    def check(self, record: YfccRecord) -> Optional[tuple[str, str]]:
        """(reason, detail) when the record must be dropped, else None."""
        if record.marker != 0:
            return "video", ""
        if record.license is None:
            return "license_unknown", record.license_name
        if record.license not in self.licenses:
            return "license_not_allowed", record.license
        tag = find_tag(record.user_tags, self.drop_tags)
        if tag is not None:
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
ID_BUCKETS = 256
BATCH_SIZE = 128
# The fused read step emits its rejects in lists too: a runner that materializes the merge of
# the rejects of two steps (the local FnApiRunner does) then handles few elements.
REJECTS_BATCH_SIZE = 1024
# The full scan's duplicate check holds one bucket's candidate rows at a time, so its number of
# buckets follows the input: about this much text per bucket (~100k lines, ~40 MB of candidate
# rows in Arrow). Fewer, bigger buckets are also faster: a full scan of 200k lines ran 1.6x
# faster with 16 buckets than with 1,024 (fewer tables to stage, sort and write).
SCAN_BUCKET_TEXT_BYTES = 64 << 20
MAX_SCAN_BUCKETS = 1 << 14


def scan_buckets(text_bytes: int) -> int:
    """Buckets of photo ids for the full scan's duplicate check of `text_bytes` of input text:
    the power of two that gives each about SCAN_BUCKET_TEXT_BYTES (1 to MAX_SCAN_BUCKETS)."""
    wanted = max(1, -(-text_bytes // SCAN_BUCKET_TEXT_BYTES))
    return min(MAX_SCAN_BUCKETS, 1 << (wanted - 1).bit_length())
_PHOTO_ID = RECORD_FIELDS.index("photo_id")


def keep_first_of_each_photo(records: Iterable[YfccRecord],
                             photo_id_counts: Optional[Mapping[int, int]] = None
                             ) -> Iterator[tuple[YfccRecord, list[YfccRecord]]]:
    """(record to keep, its duplicates) per photo id of `records`, in any order.

    Streams: only the photo id counts are held in memory (counted in a first pass over the
    re-iterable `records` unless given), plus the records of repeated ids (rare), which are
    ordered by `order_duplicates`.
    """
    counts = photo_id_counts
    if counts is None:
        counts = Counter(record.photo_id for record in records)
    repeated: dict[int, list[YfccRecord]] = {}
    for record in records:
        if counts[record.photo_id] == 1:
            yield record, []
        else:
            repeated.setdefault(record.photo_id, []).append(record)
    for same_photo in repeated.values():
        kept, *duplicates = order_duplicates(same_photo)
        yield kept, duplicates
