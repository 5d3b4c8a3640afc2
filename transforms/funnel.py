"""The funnel of a rebuild: what stats.json's "funnel" holds and the invariants it must satisfy.

stats.json "funnel" maps names to counts:
  * "funnel.STEP" for the elements that got through a step (`STEPS`, in pipeline order);
  * "STAGE.REASON" for the elements a stage rejected (`transforms.rejects`), e.g. "fetch.not_found";
  * "takedown.samples_removed" once a takedown ran.
Each reject stage sits between two steps (`STAGE_AFTER_STEP`), so the funnel reads top-down as
"lines read, minus these rejects, gives the candidates, minus these, ...".
"""
from __future__ import annotations

from typing import Mapping

STEP_PREFIX = "funnel."
# (step, label) in pipeline order.
STEPS = (
    ("lines_read", "lines read"),
    ("candidates", "candidates (after prefilter)"),
    ("decoded", "photos fetched and decoded"),
    ("annotated", "photos annotated"),
    ("photos_with_person", "photos with >= 1 kept person"),
    ("samples", "samples cropped"),
)
# The rejects of each stage are taken out between the step it follows and the next one.
STAGE_AFTER_STEP = {
    "read": "lines_read", "prefilter": "lines_read",
    "fetch": "candidates", "decode": "candidates",
    "annotate": "decoded",
    "select": "annotated",
    "crop": "photos_with_person", "split": "samples", "consent": "samples", "write": "samples",
    "takedown": "samples",
}
STAGE_ORDER = tuple(STAGE_AFTER_STEP)
# Stages whose rejects happen before a photo reaches annotation.
PRE_ANNOTATION_STAGES = ("read", "prefilter", "fetch", "decode")
# select rejects that drop a whole photo (the others drop one person of a photo); 'error' is
# the dead-letter reject of an unexpected exception on a photo (transforms.stage).
WHOLE_PHOTO_SELECT_REASONS = ("no_person", "bad_annotation", "error")
TAKEDOWN_KEY = "takedown.samples_removed"


def step_key(step: str) -> str:
    return STEP_PREFIX + step


def _stage_total(funnel: Mapping[str, int], stages: tuple[str, ...]) -> int:
    return sum(int(n) for key, n in funnel.items()
               if not key.startswith(STEP_PREFIX) and key.split(".", 1)[0] in stages)


def accounting_errors(funnel: Mapping[str, int]) -> list[str]:
    """Check the funnel invariants of the design (section 2); returns the violations.

    lines read = rejects before annotation + photos decoded;
    photos decoded = photos annotated + annotate rejects;
    photos annotated = photos with >= 1 kept person + photos select rejected whole.
    """
    errors = []
    lines = funnel.get(step_key("lines_read"), 0)
    pre = _stage_total(funnel, PRE_ANNOTATION_STAGES)
    decoded = funnel.get(step_key("decoded"), 0)
    if lines != pre + decoded:
        errors.append(f"lines read {lines} != rejects before annotation {pre} + photos decoded {decoded}")
    annotated = funnel.get(step_key("annotated"), 0)
    failed = _stage_total(funnel, ("annotate",))
    if decoded != annotated + failed:
        errors.append(f"photos decoded {decoded} != annotated {annotated} + annotate rejects {failed}")
    whole = sum(funnel.get(f"select.{reason}", 0) for reason in WHOLE_PHOTO_SELECT_REASONS)
    with_person = funnel.get(step_key("photos_with_person"), 0)
    if annotated != with_person + whole:
        errors.append(f"photos annotated {annotated} != with a kept person {with_person} + "
                      f"rejected whole by select {whole}")
    return errors


def funnel_rows(funnel: Mapping[str, int]) -> list[tuple[str, int, bool]]:
    """(label, count, is_step) rows top-down: each step, then the rejects taken out after it.

    Names that are neither a known step nor a known stage come last, as they are.
    """
    rows: list[tuple[str, int, bool]] = []
    placed = set()
    for step, label in STEPS:
        key = step_key(step)
        if key in funnel:
            rows.append((label, int(funnel[key]), True))
            placed.add(key)
        rejects = sorted(((key, n) for key, n in funnel.items()
                          if not key.startswith(STEP_PREFIX)
                          and STAGE_AFTER_STEP.get(key.split(".", 1)[0]) == step),
                         key=lambda item: (STAGE_ORDER.index(item[0].split(".", 1)[0]), item[0]))
        for key, n in rejects:
            rows.append((f"  - {key}", int(n), False))
            placed.add(key)
    rows.extend((key, int(n), False) for key, n in sorted(funnel.items()) if key not in placed)
    return rows
