"""What every stage shares: its typed output and its dead-letter policy.

Every stage PTransform returns a `StageOutput(main, rejects)` (Beam's `RunInferenceDLQ` style:
a NamedTuple, never a string-keyed dict). Every stage DoFn subclasses `StageDoFn` and implements
`process_element`: an unexpected exception on one element becomes a `Rejected` with reason
`error` (the exception class and message in the detail, counted as `fdh/<stage>.error`), so one
bad element never fails a 100M-line job. Configuration errors are raised at launch (in
`__init__`, `expand` or `setup`), where they still fail the job loudly.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator, NamedTuple, Optional

import apache_beam as beam

from transforms.records import REJECTS_TAG
from transforms.rejects import reject

ERROR_REASON = "error"


class StageOutput(NamedTuple):
    """The two PCollections a stage yields: what goes on, and what it dropped (`Rejected`)."""

    main: beam.PCollection
    rejects: beam.PCollection


def record_of(element: Any) -> Any:
    """The `YfccRecord` an element carries (itself, `.record`, `.photo.record`), or None."""
    for _ in range(4):
        if element is None or (hasattr(element, "photo_id") and hasattr(element, "user_nsid")):
            return element
        if isinstance(element, tuple) and element:
            element = element[0]
            continue
        element = getattr(element, "record", None) or getattr(element, "photo", None)
    return None


def error_reject(stage: str, element: Any, error: BaseException,
                 record_id: Optional[str] = None) -> beam.pvalue.TaggedOutput:
    """The `{stage}.error` reject for an element whose processing raised `error`; its record id
    is `record_id` if given, else the photo id (or source) of the record the element carries."""
    record = record_of(element)
    photo_id = getattr(record, "photo_id", None)
    if record_id is None:
        record_id = str(photo_id) if photo_id is not None else (getattr(record, "source", "") or "unknown")
    logging.warning("%s: unexpected %s on %s: %s", stage, type(error).__name__, record_id, error)
    return reject(stage, ERROR_REASON, record_id, f"{type(error).__name__}: {error}",
                  photo_id=photo_id, user_nsid=getattr(record, "user_nsid", None))


class StageDoFn(beam.DoFn):
    """A stage's DoFn: `process_element` does the work; an unexpected exception is a reject.

    Subclasses set `stage` and implement `process_element(element)` (a generator of main outputs
    and `reject(...)` TaggedOutputs). Outputs yielded before the exception are kept.
    """

    stage: str = "unknown"

    def process_element(self, element: Any) -> Iterable[Any]:
        raise NotImplementedError

    def element_id(self, element: Any) -> Optional[str]:
        """The record id of an error reject for `element`; None: that of the record it carries."""
        return None

    def process(self, element: Any) -> Iterator[Any]:
        try:
            yield from self.process_element(element)
        except Exception as error:  # the dead-letter policy: see the module docstring
            yield error_reject(self.stage, element, error, self.element_id(element))


class WindowedStageDoFn(StageDoFn):
    """A `StageDoFn` whose `process_element(element, timestamp, window)` also gets the element's
    timestamp and window (for DoFns that emit outputs later, e.g. in `finish_bundle`)."""

    def process_element(self, element: Any, timestamp: Any = None, window: Any = None) -> Iterable[Any]:
        raise NotImplementedError

    def process(self, element: Any, timestamp: Any = beam.DoFn.TimestampParam,
                window: Any = beam.DoFn.WindowParam) -> Iterator[Any]:
        try:
            yield from self.process_element(element, timestamp, window)
        except Exception as error:  # the dead-letter policy: see the module docstring
            yield error_reject(self.stage, element, error, self.element_id(element))


def error_rejects_for_batch(stage: str, batch: Iterable[Any],
                            error: BaseException) -> Iterator[beam.pvalue.TaggedOutput]:
    """One `{stage}.error` reject per element of a batch whose processing raised `error`."""
    for element in batch:
        yield error_reject(stage, element, error)


def stage_output(outputs: beam.pvalue.DoOutputsTuple, main_tag: str = "main") -> StageOutput:
    """`StageOutput` of a `ParDo(...).with_outputs(REJECTS_TAG, main=main_tag)` result."""
    return StageOutput(main=outputs[main_tag], rejects=outputs[REJECTS_TAG])
