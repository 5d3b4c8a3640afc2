"""Ask Flickr again about every photo of a built dataset; take down what owners no longer allow.

    python -m beam_jobs.recheck --dataset=OUT --flickr_api_key=K [--flickr_api_url=URL]
        [--flickr_requests_per_second=1] [--max_failed_fraction=0.001] [--report=PATH]

Maintainers run it before each release. Every photo of the dataset (photo id, owner NSID and
licence from the shards' Parquet files) goes through the consent check of `rebuild
--consent_check=api` (transforms/consent.py: getInfo per photo or the owner's public listing,
whichever costs fewer calls; Flickr's rate limit job-wide; retries on 429, 5xx and code 105).
A photo that is deleted, private, not public, tagged `no_cv` in any spelling, or relicensed to
a licence FDH may not use is taken down through the takedown core (dataset/takedown.py, the
path `beam_jobs.takedown` uses): its samples leave the tar and Parquet shards, metadata.json,
manifest.json and stats.json, and `photo:ID  # recheck DATE: consent.REASON (detail)` is
appended to OUT/opt_out.txt. The reason rides in a trailing comment: the opt-out parser
(transforms/opt_out.py) ignores comments, so the entries read back unchanged and every rebuild
into OUT keeps honouring them. Samples of photos or users already listed in opt_out.txt (a
takedown that was interrupted) are removed without asking Flickr.

A failed check (Flickr down or answering garbage after the retries) never removes a photo and
is never a silent keep: every such photo is listed in the report and printed, and the job exits
1 when the failed photos exceed `--max_failed_fraction` of the photos checked (after taking down
the photos Flickr did answer about). Run it again: it re-asks only about the photos left.

Idempotent: a second run finds every photo it removed gone, asks only about the rest, and
changes nothing when Flickr's answers have not changed. `verify` passes afterwards.

    manifest shards ─ReadRows (Parquet, 4 columns)─► rows ─Route─► opted out already ─┐
      └─► CheckConsent (group by owner) ─► kept / rejects ─CoGroupByKey(photo)─► Decide ─┤
    removals ─GroupByKey(shard)─► rewrite_shard ─ToList─► Finish: update_run_files + report

Rate: `--flickr_requests_per_second` is for the whole job and split over its processes
(`--direct_num_workers` locally, `--max_num_workers` on a remote runner, where it is required;
run Dataflow with one SDK process per worker, `--experiments=no_use_multiple_sdk_containers`).
At Flickr's 3,600 calls per hour one process is enough: the job is bound by the rate, not CPU.
Exit status: 0, or 1 past the failure limit, 2 for bad flags.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, WorkerOptions

from beam_jobs.common import (JobOptions, UsageError, is_local, make_pipeline, read_counters,
                              report_path_for, run_main, split_job_flags)
from dataset import fs
from dataset.layout import OPT_OUT_FILE, shard_parquet_path
from dataset.manifest import load_manifest
from dataset.schema import KEY_COLUMN, PHOTO_COLUMN, USER_COLUMN
from dataset.search import Match
from dataset.shards import read_parquet_rows
from dataset.takedown import rewrite_shard, update_run_files
from transforms.consent import (GET_INFO, GET_LICENSES, GET_PUBLIC_PHOTOS, REASONS, CheckConsent,
                                add_consent_arguments)
from transforms.consent import STAGE as CONSENT_STAGE
from transforms.opt_out import OptOut, parse_opt_out
from transforms.records import METRICS_NAMESPACE

REPORT_FILE = "recheck_report.json"
LICENSE_COLUMN = "license_slug"
ROW_COLUMNS = [KEY_COLUMN, PHOTO_COLUMN, USER_COLUMN, LICENSE_COLUMN]
FAILED_REASON = "check_failed"
REMOVE_REASONS = frozenset(REASONS) - {FAILED_REASON}  # Flickr answered: the owner says no
OPTED_OUT = "opt_out"  # already listed in opt_out.txt
DEFAULT_MAX_FAILED_FRACTION = 0.001
CALL_COUNTERS = {f"{CONSENT_STAGE}.calls_{method}": method
                 for method in (GET_INFO, GET_PUBLIC_PHOTOS, GET_LICENSES)}


class RecheckOptions(JobOptions):
    """Flags of the recheck job (any Beam / Dataflow flag passes through)."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument("--dataset", required=True,
                            help="Root of the dataset to re-check (local path or gs://).")
        add_consent_arguments(parser, key_required=True)
        parser.add_argument("--flickr_retries", type=int, default=5,
                            help="Retries of a call on HTTP 429/5xx, code 105 or no connection.")
        parser.add_argument("--flickr_backoff", type=float, default=1.0,
                            help="Seconds before the first retry, doubled each retry (a "
                                 "Retry-After header waits longer).")
        parser.add_argument("--max_failed_fraction", type=float,
                            default=DEFAULT_MAX_FAILED_FRACTION,
                            help="Exit 1 when more than this fraction of the photos checked "
                                 "could not be checked.")
        parser.add_argument("--report", default=None,
                            help="Where the job writes its JSON report (default: a temp file "
                                 "for local runs; required on remote runners).")


class SampleRow(NamedTuple):
    """One sample of the dataset as the recheck sees it (from its shard's Parquet row)."""

    key: str
    photo_id: int
    nsid: Optional[str]
    shard: str  # the tar's path relative to the dataset root
    license: str  # the licence slug it was published under

    @property
    def user_nsid(self) -> str:
        """The owner the consent check groups by. A row without an NSID is its own group, so
        that it is asked about by photo id and never through the listing of an empty user."""
        return self.nsid or f"no-owner:{self.photo_id}"

    def match(self) -> Match:
        return Match(self.key, self.nsid, self.photo_id)


class Removal(NamedTuple):
    """A sample to take down: why ('consent.REASON', or OPTED_OUT when opt_out.txt lists it
    already) and its opt-out comment (empty for OPTED_OUT: nothing new is recorded)."""

    row: SampleRow
    reason: str
    comment: str = ""


# ---------------------------------------------------------------------------- Beam steps ---

def shard_rows(entry: Mapping[str, Any], dataset: str) -> Iterator[Any]:
    """Manifest shard entry -> a SampleRow per Parquet row; a row without a photo id is a
    failure (it cannot be checked)."""
    path = shard_parquet_path(entry)
    for row in read_parquet_rows(fs.join(dataset, path), columns=ROW_COLUMNS):
        if row[PHOTO_COLUMN] is None:
            yield beam.pvalue.TaggedOutput(FAILED_REASON, failure(
                None, row[USER_COLUMN], [row[KEY_COLUMN]], "no_photo_id", f"{path}: no photo id"))
            continue
        yield SampleRow(row[KEY_COLUMN], int(row[PHOTO_COLUMN]), row[USER_COLUMN], entry["path"],
                        row[LICENSE_COLUMN] or entry["license"])


def route(row: SampleRow, opted_out: OptOut) -> Iterator[Any]:
    """Rows already opted out go straight to removal (tag OPTED_OUT); the rest to the check."""
    if opted_out.excludes(row.nsid, row.photo_id):
        yield beam.pvalue.TaggedOutput(OPTED_OUT, Removal(row, OPTED_OUT))
    else:
        yield row


def failure(photo_id: Optional[int], user_nsid: Optional[str], keys: list[str], reason: str,
            detail: str) -> dict[str, Any]:
    """A photo the recheck could not decide about: kept, and listed in the report."""
    return {"photo_id": photo_id, "user_nsid": user_nsid, "keys": sorted(keys),
            "reason": reason, "detail": detail}


def removal(row: SampleRow, reason: str, detail: str, day: str) -> Removal:
    """The removal of `row` for a consent reject; its opt-out comment reads
    'recheck DAY: consent.REASON (detail)'."""
    if reason == "license_changed":
        detail = f"{row.license} -> {detail}"
    name = f"{CONSENT_STAGE}.{reason}"
    comment = f"recheck {day}: {name}" + (f" ({detail[:120]})" if detail else "")
    return Removal(row, name, comment)


def decide(element: tuple[Optional[int], Mapping[str, Iterable[Any]]], day: str) -> Iterator[Any]:
    """(photo id, {row, kept, rejected}) -> a Removal per sample of a photo Flickr says must go;
    a failure (tag FAILED_REASON) for a photo without a definite answer; tag 'kept' otherwise."""
    photo_id, grouped = element
    rows = sorted(grouped["row"], key=lambda row: row.key)
    rejects = list(grouped["rejected"])
    definite = [r for r in rejects if r.reason in REMOVE_REASONS]
    if rows and definite:
        for row in rows:
            yield removal(row, definite[0].reason, definite[0].detail, day)
    elif rows and not rejects and any(True for _ in grouped["kept"]):
        yield beam.pvalue.TaggedOutput("kept", photo_id)
    else:  # a failed check, a reject without its photo, or no result at all
        first = rejects[0] if rejects else None
        yield beam.pvalue.TaggedOutput(FAILED_REASON, failure(
            photo_id, rows[0].nsid if rows else getattr(first, "user_nsid", None),
            [row.key for row in rows], first.reason if first else "no_result",
            first.detail if first else "the check gave no result"))


def rewrite(element: tuple[str, Iterable[Removal]], dataset: str,
            shards: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """(shard path, removals) -> `rewrite_shard`'s summary plus the opt-out reasons."""
    path, removals = element
    removals = list(removals)
    result = rewrite_shard(dataset, dict(shards[path]), [r.row.match() for r in removals])
    result["reasons"] = {f"photo:{r.row.photo_id}": r.comment for r in removals if r.comment}
    result["reason_of"] = {str(r.row.photo_id): r.reason for r in removals}
    return result


class Finish(beam.DoFn):
    """All shard rewrites (one list) -> run-level files updated; writes the JSON report."""

    def __init__(self, dataset: str, report: str, max_failed_fraction: float):
        self._dataset = dataset
        self._report = report
        self._max_failed_fraction = max_failed_fraction

    def process(self, rewrites: list[dict[str, Any]], failures: list[dict[str, Any]],
                kept: int) -> Iterator[dict[str, Any]]:
        reasons = {line: why for r in rewrites for line, why in r["reasons"].items()}
        reason_of = {photo: why for r in rewrites for photo, why in r["reason_of"].items()}
        request = OptOut(photo_ids=frozenset(int(photo) for photo, why in reason_of.items()
                                             if why != OPTED_OUT))
        report = update_run_files(self._dataset, request, rewrites, reasons=reasons)
        report.update(summarize(reason_of, failures, kept, self._max_failed_fraction))
        report["removed_reasons"] = dict(sorted(reasons.items()))
        fs.write_json(self._report, report)
        yield report


def summarize(reason_of: Mapping[str, str], failures: list[dict[str, Any]], kept: int,
              max_failed_fraction: float) -> dict[str, Any]:
    """The recheck's own report fields: photos checked (asked Flickr about), kept, removed by
    reason ({photo id: reason}), failed, and whether the failures stay within the limit."""
    by_reason = dict(sorted(Counter(reason_of.values()).items()))
    asked = kept + len(failures) + sum(n for name, n in by_reason.items() if name != OPTED_OUT)
    fraction = len(failures) / asked if asked else 0.0
    return {"photos_checked": asked, "photos_kept": kept, "photos_removed": len(reason_of),
            "removed_by_reason": by_reason,
            "failed": sorted(failures, key=lambda f: (f["photo_id"] is None, f["photo_id"] or 0)),
            "failed_fraction": fraction, "max_failed_fraction": max_failed_fraction,
            "ok": fraction <= max_failed_fraction}


class Recheck(beam.PTransform):
    """Re-check every sample of the dataset's `shards` and take down what must go."""

    def __init__(self, dataset: str, shards: list[dict], opted_out: OptOut, check: CheckConsent,
                 report: str, max_failed_fraction: float, day: str):
        super().__init__()
        self._dataset = dataset
        self._shards = shards
        self._opted_out = opted_out
        self._check = check
        self._report = report
        self._max_failed_fraction = max_failed_fraction
        self._day = day

    def expand(self, pbegin):
        rows = (pbegin
                | "ManifestShards" >> beam.Create(self._shards, reshuffle=True)
                | "ReadRows" >> beam.FlatMap(shard_rows, self._dataset).with_outputs(
                    FAILED_REASON, main="rows"))
        routed = rows.rows | "Route" >> beam.FlatMap(route, self._opted_out).with_outputs(
            OPTED_OUT, main="check")
        checked = routed.check | "CheckConsent" >> self._check
        verdicts = (
            {"row": routed.check | "RowByPhoto" >> beam.Map(lambda row: (row.photo_id, row)),
             "kept": checked.main | "KeptByPhoto" >> beam.Map(
                 lambda pair: (pair[0].photo_id, pair[1].license_id)),
             "rejected": checked.rejects | "RejectByPhoto" >> beam.Map(
                 lambda reject: (reject.photo_id, reject))}
            | "ByPhoto" >> beam.CoGroupByKey()
            | "Decide" >> beam.FlatMap(decide, self._day).with_outputs(
                FAILED_REASON, "kept", main="removals"))
        failures = ((rows[FAILED_REASON], verdicts[FAILED_REASON])
                    | "Failures" >> beam.Flatten())
        kept = verdicts.kept | "CountKept" >> beam.combiners.Count.Globally()
        by_shard = {entry["path"]: entry for entry in self._shards}
        return (
            (verdicts.removals, routed[OPTED_OUT]) | "Removals" >> beam.Flatten()
            | "ByShard" >> beam.Map(lambda removal: (removal.row.shard, removal))
            | "GroupByShard" >> beam.GroupByKey()
            | "RewriteShard" >> beam.Map(rewrite, self._dataset, by_shard)
            | "Collect" >> beam.combiners.ToList()
            | "Finish" >> beam.ParDo(Finish(self._dataset, self._report, self._max_failed_fraction),
                                     beam.pvalue.AsList(failures), beam.pvalue.AsSingleton(kept)))


# ------------------------------------------------------------------------------ launcher ---

def process_count(options: PipelineOptions) -> int:
    """The processes that share the job-wide Flickr rate: --direct_num_workers locally,
    --max_num_workers on a remote runner (required there)."""
    if is_local(options):
        return max(1, options.view_as(DirectOptions).direct_num_workers or 1)
    workers = options.view_as(WorkerOptions).max_num_workers
    if not workers:
        raise UsageError("--max_num_workers=N is required with a remote runner: the job-wide "
                         "Flickr rate is shared out per worker")
    return workers


def consent_stage(recheck: RecheckOptions, options: PipelineOptions) -> CheckConsent:
    """The CheckConsent stage of the flags (ValueError for a bad key, URL or rate)."""
    if recheck.flickr_retries < 0 or recheck.flickr_backoff < 0:
        raise UsageError("--flickr_retries and --flickr_backoff must be >= 0")
    return CheckConsent(recheck.flickr_api_url, recheck.flickr_api_key,
                        recheck.flickr_requests_per_second, process_count(options),
                        retries=recheck.flickr_retries, backoff_factor=recheck.flickr_backoff)


def read_recorded_opt_out(dataset: str) -> OptOut:
    """What OUT/opt_out.txt lists already (empty when there is none)."""
    path = fs.join(dataset, OPT_OUT_FILE)
    return parse_opt_out(fs.read_text(path) or "", path)


def format_report(report: dict[str, Any]) -> str:
    """What the job prints: totals, every removal with its reason, every failed check."""
    lines = [f"Rechecked {report['photos_checked']} photos of {report['dataset']} with Flickr: "
             f"{report['photos_kept']} kept, {report['photos_removed']} removed, "
             f"{len(report['failed'])} could not be checked."]
    calls = report.get("api_calls")
    if calls is not None:
        lines.append("  API calls: " + ", ".join(f"{name} {count}"
                                                  for name, count in calls.items()))
    reasons = report["removed_reasons"]
    for match in report["removed"]:
        why = reasons.get(f"photo:{match['photo_id']}", "already in opt_out.txt")
        lines.append(f"  removed {match['key']} (photo id {match['photo_id']}, user_nsid "
                     f"{match['user_nsid']}): {why}")
    for shard in report["shards"]:
        lines.append(f"  rewrote {shard['path']}: removed {shard['removed']}, "
                     f"{shard['samples']} samples left")
    for failed in report["failed"]:
        lines.append(f"  NOT CHECKED, kept: photo id {failed['photo_id']} (user_nsid "
                     f"{failed['user_nsid']}, samples {', '.join(failed['keys']) or '-'}): "
                     f"{failed['reason']}: {failed['detail']}")
    if not report["ok"]:
        lines.append(f"FAILED: {report['failed_fraction']:.2%} of the photos could not be "
                     f"checked (limit {report['max_failed_fraction']:.2%}): run recheck again")
    return "\n".join(lines)


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the recheck; returns the report (also printed)."""
    recheck, options = split_job_flags(RecheckOptions, argv, __doc__)
    if not 0 <= recheck.max_failed_fraction <= 1:
        raise UsageError("--max_failed_fraction must be between 0 and 1")
    dataset = recheck.dataset.rstrip("/")
    shards = load_manifest(dataset)["shards"]
    check = consent_stage(recheck, options)
    report_path = report_path_for(recheck.report, options, REPORT_FILE)
    pipeline = make_pipeline(options)
    _ = pipeline | "Recheck" >> Recheck(
        dataset, shards, read_recorded_opt_out(dataset), check, report_path,
        recheck.max_failed_fraction, time.strftime("%Y-%m-%d", time.gmtime()))
    result = pipeline.run()
    result.wait_until_finish()
    report = fs.read_json(report_path)
    counters = read_counters(result, METRICS_NAMESPACE)
    report["api_calls"] = {method: counters.get(name, 0) for name, method in CALL_COUNTERS.items()}
    print(format_report(report))
    return report


def main(argv: Optional[list[str]] = None) -> None:
    run_main(run, argv, exit_code=lambda report: 0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
