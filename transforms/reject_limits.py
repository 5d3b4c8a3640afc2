"""Loud failure: a job whose stages reject too much ends non-zero (issue 10, finding 10).

Each stage has a maximum reject rate, rate = the stage's rejects / the elements entering it,
both read from the funnel (stats.json "funnel", `transforms.funnel`). `--max_reject_rate` sets
them: `0.3` for every limited stage, `read=0.1,fetch=0.5` per stage, both mixed
(`0.3,fetch=0.6`), `STAGE=none` to lift one, `none` to lift all; rates may be written `10%`. A
run that kept no sample from one or more candidates fails as well (`empty=none` lifts that). The failure is one line: each stage over its
limit and the top reasons, each with one example (record id and detail, read from
OUTPUT/rejects/*.parquet).

prefilter and select have no default limit: dropping most lines (other licences, no person) is
what they are for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

from transforms.funnel import STAGE_ORDER, STEP_PREFIX, step_key

DEFAULT_MAX_REJECT_RATES: dict[str, float] = {
    "read": 0.10, "fetch": 0.50, "decode": 0.20, "annotate": 0.20, "crop": 0.50,
    "split": 0.01, "consent": 0.1, "write": 0.01,
}
# Stages whose limit counts only some reasons: the consent check's decisions (deleted, private,
# relicensed, no_cv) are what it is for; only checks that kept failing count toward its limit.
LIMITED_REASONS: dict[str, tuple[str, ...]] = {"consent": ("check_failed",)}
NO_LIMIT = ("none", "off")
# Not a stage: `empty=none` (or a bare `none`) lets a run that kept no sample end with exit 0.
EMPTY_RUN = "empty"
TOP_REASONS = 3
EXAMPLE_CHARS = 160
FLAG = "--max_reject_rate"
FLAG_HELP = ("maximum share of the elements entering a stage that it may reject before the job "
             "fails (exit 1, one line naming the top reasons): a rate for every limited stage "
             "and/or STAGE=RATE overrides, e.g. 0.3 or read=0.1,fetch=0.5 or 0.3,fetch=none; "
             "a run that kept no sample fails too unless empty=none; none lifts every limit "
             f"(defaults: {', '.join(f'{k}={v:g}' for k, v in DEFAULT_MAX_REJECT_RATES.items())}; "
             "prefilter and select unlimited)")


class RejectRateExceeded(SystemExit):
    """The job ran but failed loudly: the message is printed on stderr and the exit status is 1."""


def _rate(text: str, item: str) -> Optional[float]:
    text = text.strip().lower()
    if text in NO_LIMIT:
        return None
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"{FLAG}: {item!r} is not a rate (0..1, N%, or none)") from None
    if not 0 <= value <= 1:
        raise ValueError(f"{FLAG}: {item!r} is not between 0 and 1")
    return value


def parse_max_reject_rates(spec: Optional[str]) -> dict[str, Optional[float]]:
    """The limit of each stage from the flag value (None: the defaults). ValueError, one line, for
    a bad rate or an unknown stage; call it at launch so that a bad flag fails before the run."""
    limits: dict[str, Optional[float]] = {**DEFAULT_MAX_REJECT_RATES, EMPTY_RUN: 0.0}
    known = set(STAGE_ORDER) - {"takedown"} | {EMPTY_RUN}
    overrides: dict[str, Optional[float]] = {}
    for item in (part.strip() for part in (spec or "").split(",")):
        if not item:
            continue
        stage, sep, value = item.partition("=")
        if not sep:
            rate = _rate(item, item)
            limits = {**{name: rate for name in DEFAULT_MAX_REJECT_RATES},
                      EMPTY_RUN: None if rate is None else limits[EMPTY_RUN]}
            continue
        stage = stage.strip()
        if stage not in known:
            raise ValueError(f"{FLAG}: unknown stage {stage!r} (one of {', '.join(sorted(known))})")
        overrides[stage] = _rate(value, item)
    return {**limits, **overrides}


def stage_totals(funnel: Mapping[str, int]) -> dict[str, int]:
    """Rejects per stage (the "STAGE.REASON" counts summed)."""
    totals: dict[str, int] = {}
    for key, count in funnel.items():
        if not key.startswith(STEP_PREFIX) and "." in key:
            stage = key.split(".", 1)[0]
            totals[stage] = totals.get(stage, 0) + int(count)
    return totals


def limited_totals(funnel: Mapping[str, int]) -> dict[str, int]:
    """Rejects per stage that count toward its limit (`LIMITED_REASONS` narrows some stages)."""
    totals = stage_totals(funnel)
    for stage, reasons in LIMITED_REASONS.items():
        if stage in totals:
            totals[stage] = sum(int(funnel.get(f"{stage}.{reason}", 0)) for reason in reasons)
    return totals


def entering(funnel: Mapping[str, int], stage: str) -> Optional[int]:
    """How many elements entered `stage` (None when the funnel cannot say)."""
    def step(name: str) -> Optional[int]:
        value = funnel.get(step_key(name))
        return None if value is None else int(value)

    rejects = stage_totals(funnel)
    counts = {
        "read": step("lines_read"),
        "prefilter": None if step("lines_read") is None else step("lines_read") - rejects.get("read", 0),
        "fetch": step("candidates"),
        "decode": None if step("candidates") is None else step("candidates") - rejects.get("fetch", 0),
        "annotate": step("decoded"),
        "select": step("annotated"),
        "crop": None if step("samples") is None else step("samples") + rejects.get("crop", 0),
        "split": step("samples"),
        "consent": step("photos_with_person"),  # photos with a sample, one check each
        "write": step("samples"),
    }
    return counts.get(stage)


@dataclass(frozen=True)
class OverLimit:
    """A stage that rejected more than its limit."""

    stage: str
    rejects: int
    entered: int
    limit: float

    def describe(self) -> str:
        return (f"{self.stage} rejected {self.rejects:,} of {self.entered:,} "
                f"({self.rejects / self.entered:.0%}, max {self.limit:.0%})")


def stages_over_limit(funnel: Mapping[str, int],
                      limits: Mapping[str, Optional[float]]) -> list[OverLimit]:
    """The stages whose reject rate is above their limit, in funnel order."""
    over = []
    order = {stage: index for index, stage in enumerate(STAGE_ORDER)}
    for stage, rejects in sorted(limited_totals(funnel).items(), key=lambda i: order.get(i[0], len(order))):
        limit, entered = limits.get(stage), entering(funnel, stage)
        if limit is not None and entered and rejects / entered > limit:
            over.append(OverLimit(stage, rejects, entered, limit))
    return over


def top_reasons(funnel: Mapping[str, int], stages: Iterable[str], n: int = TOP_REASONS) -> list[tuple[str, int]]:
    """The `n` most frequent "STAGE.REASON" keys of `stages`, largest first."""
    wanted = set(stages)
    found = [(key, int(count)) for key, count in funnel.items()
             if not key.startswith(STEP_PREFIX) and key.split(".", 1)[0] in wanted and count]
    return sorted(found, key=lambda item: (-item[1], item[0]))[:n]


def nothing_kept(funnel: Mapping[str, int]) -> bool:
    """True when the run had candidates and kept no sample (a job that keeps no samples, such
    as scan, has no "funnel.samples" and never fails this way)."""
    candidates, samples = funnel.get(step_key("candidates")), funnel.get(step_key("samples"))
    return bool(candidates) and samples is not None and int(samples) == 0


def failure_reasons(funnel: Mapping[str, int],
                    limits: Mapping[str, Optional[float]]) -> tuple[list[str], list[str]]:
    """(what failed, the "STAGE.REASON" keys to show examples for); empty when the run is fine."""
    over = stages_over_limit(funnel, limits)
    failed = [item.describe() for item in over]
    stages = [item.stage for item in over]
    if limits.get(EMPTY_RUN, 0.0) is not None and nothing_kept(funnel):
        failed.append(f"kept 0 samples from {int(funnel[step_key('candidates')]):,} candidates")
        stages = [s for s in stage_totals(funnel) if s != "prefilter"]
    return failed, [key for key, _ in top_reasons(funnel, stages)]


def failure_summary(funnel: Mapping[str, int], limits: Mapping[str, Optional[float]],
                    examples: Callable[[list[str]], Mapping[str, str]]) -> Optional[str]:
    """The one-line failure of a finished run, or None when it is within its limits.

    `examples(keys)` returns one example detail per "STAGE.REASON" key it can find.
    """
    failed, keys = failure_reasons(funnel, limits)
    if not failed:
        return None
    found = examples(keys) if keys else {}
    reasons = []
    for key in keys:
        example = found.get(key)
        shown = f" (e.g. {_shorten(example)})" if example else ""
        reasons.append(f"{key} {int(funnel[key]):,}{shown}")
    return ("FAILED: " + "; ".join(failed) + (": top reasons " + ", ".join(reasons) if reasons else "")
            + f" (limits: {FLAG})")


def _shorten(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS - 3] + "..."


def reject_examples(rejects_glob: str) -> Callable[[list[str]], dict[str, str]]:
    """An `examples` reader over the rejects Parquet files (local or gs://) matching `rejects_glob`:
    the first record of each wanted "STAGE.REASON", as "RECORD_ID: DETAIL"; stops reading once
    every key has one."""
    def read(keys: list[str]) -> dict[str, str]:
        import pyarrow.parquet as pq
        from apache_beam.io.filesystems import FileSystems

        wanted, found = set(keys), {}
        paths = sorted(m.path for r in FileSystems.match([rejects_glob]) for m in r.metadata_list)
        for path in paths:
            with FileSystems.open(path) as handle:
                reader = pq.ParquetFile(handle)
                for batch in reader.iter_batches(columns=["record_id", "stage", "reason", "detail"]):
                    for row in batch.to_pylist():
                        key = f"{row['stage']}.{row['reason']}"
                        if key in wanted and key not in found:
                            found[key] = f"{row['record_id']}: {row['detail'] or ''}".rstrip(": ")
                    if len(found) == len(wanted):
                        return found
        return found
    return read


def check_reject_rates(funnel: Mapping[str, int], spec: Optional[str], rejects_glob: str) -> None:
    """Raise RejectRateExceeded (exit 1, the one-line summary) when the finished run failed loudly."""
    summary = failure_summary(funnel, parse_max_reject_rates(spec), reject_examples(rejects_glob))
    if summary:
        raise RejectRateExceeded(summary)
