"""SelectPersons (stage 6): combine each photo's detections into persons and keep those that pass
the FDH rules.

Pure core: `select_persons(annotated, part_table, rule)` -> `Selection` (kept persons with their
crop box in `person.extra['crop_box']`, and what was dropped and why). See combine.py for how
detections become persons, rules.py for the rule, parts.py for the part table.

Beam: `SelectPersons(...)` maps AnnotatedPhoto -> StageOutput(main=SelectedPhoto(photo,
annotator, kept persons) — one element per photo with >= 1 kept person —, rejects=Rejected).
Rejects, all stage 'select':
  * per dropped person, record_id = sample_key(photo_id, person.index): 'no_keypoints',
    'too_few_keypoint_matches', 'head_rule', 'empty_mask' (no-CSE forms);
  * per unpaired detection, record_id = photo id: 'no_cse_match' (a Mask R-CNN person with no CSE
    detection), 'no_mask_match' (a CSE detection with no Mask R-CNN person);
  * per photo, record_id = photo id: 'no_person' (no person kept: none detected or all dropped),
    'bad_annotation' (arrays that do not fit together, unknown annotator), 'error' (an
    unexpected exception: transforms.stage).
Counters (namespace fdh): select.photos_with_person + select.photos_without_person = photos in;
select.persons_kept; select.keypoint_dets_unassigned; and one per reject reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from transforms.crop_geometry import MIN_BOX_AREA, box_area, crop_box_for_person, is_too_small
from transforms.records import (METRICS_NAMESPACE, REJECTS_TAG, AnnotatedPhoto, Person, sample_key,
                                score_threshold_for)
from transforms.rejects import reject
from transforms.s6_select.combine import (IOU_COMBINE_THRESHOLD, MIN_KEYPOINT_BOX_IOU, Dropped,
                                          SelectedPhoto, annotation_problem, combine_detections)
from transforms.s6_select.parts import load_part_table, validate_table
from transforms.s6_select.rules import FdhRule, apply_rule, keypoint_status
from transforms.stage import StageDoFn, StageOutput, stage_output

STAGE = "select"

__all__ = ["SelectPersons", "SelectedPhoto", "Selection", "select_persons", "FdhRule"]


@dataclass
class Selection:
    """Outcome of the FDH selection on one photo."""

    kept: list[Person] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    detected: int = 0  # persons formed from the detections (before the rule)
    unassigned_keypoint_dets: int = 0


def select_persons(annotated: AnnotatedPhoto, part_table: Optional[np.ndarray], rule: FdhRule,
                   iou_threshold: float = IOU_COMBINE_THRESHOLD,
                   min_keypoint_box_iou: float = MIN_KEYPOINT_BOX_IOU,
                   min_box_area: int = MIN_BOX_AREA) -> Selection:
    """Combine the detections of one photo and apply the FDH rule to each person.

    A person whose crop box is under `min_box_area` pixels is dropped ('too_small') before the
    rule, as DeepPrivacy2 does, so that a photo counted "with person" always yields a sample.
    'fdh' photos with CSE detections need `part_table`; 'lite' photos and 'fdh' photos annotated
    without embeddings (cse_dets None) use the mask form of the rule.
    Call `combine.annotation_problem` first: this assumes consistent arrays.
    """
    combined = combine_detections(annotated, iou_threshold, min_keypoint_box_iou)
    selection = Selection(dropped=list(combined.dropped),
                          unassigned_keypoint_dets=combined.unassigned_keypoint_dets)
    selection.detected = len(combined.persons) + sum(d.person_index is not None for d in combined.dropped)
    image_hw = tuple(annotated.photo.image.shape[:2])
    use_cse = annotated.annotator != "lite" and annotated.cse_dets is not None
    if use_cse and part_table is None and combined.persons:
        raise ValueError("SelectPersons needs a part table for 'fdh' photos with CSE (part_table=...)")
    threshold = score_threshold_for(annotated.annotator, rule.keypoint_score_threshold)
    for person in combined.persons:
        box = crop_box_for_person(person.box, image_hw, int(np.count_nonzero(person.mask)))
        person.extra["crop_box"] = box
        if is_too_small(box, min_box_area):
            selection.dropped.append(Dropped(
                "too_small", f"crop box {box} has area {box_area(box)} < {min_box_area}", person.index))
            continue
        status = keypoint_status(
            person.keypoints, box, person.mask,
            e_mask=person.e_mask if use_cse else None,
            vertices=person.vertices if use_cse else None,
            part_table=part_table if use_cse else None,
            score_threshold=threshold)
        result = apply_rule(status, rule)
        person.extra["keypoint_status"] = status
        person.extra["keypoint_matches"] = result.matches
        person.extra["head_matches"] = result.head_matches
        if result.kept:
            selection.kept.append(person)
        else:
            selection.dropped.append(Dropped(result.reason, result.detail(), person.index))
    return selection


class _SelectPersonsFn(StageDoFn):
    """AnnotatedPhoto -> SelectedPhoto (>= 1 kept person) and the rejects of what was dropped."""

    stage = STAGE

    def __init__(self, part_table: Union[str, np.ndarray, None], rule: FdhRule, iou_threshold: float,
                 min_keypoint_box_iou: float):
        self._part_table_source = part_table
        self._rule = rule
        self._iou_threshold = iou_threshold
        self._min_keypoint_box_iou = min_keypoint_box_iou
        self._part_table: Optional[np.ndarray] = None
        self._with_person = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.photos_with_person")
        self._without_person = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.photos_without_person")
        self._persons_kept = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.persons_kept")
        self._unassigned = Metrics.counter(METRICS_NAMESPACE, f"{STAGE}.keypoint_dets_unassigned")

    def setup(self) -> None:
        source = self._part_table_source
        if isinstance(source, str):
            self._part_table = load_part_table(source)
        elif source is not None:
            self._part_table = validate_table(source)

    def process_element(self, annotated: AnnotatedPhoto) -> Iterable:
        record = annotated.photo.record
        photo_key = str(record.photo_id)
        problem = annotation_problem(annotated)
        if problem is not None:
            self._without_person.inc()
            yield reject(STAGE, "bad_annotation", photo_key, problem, record.photo_id, record.user_nsid)
            return
        selection = select_persons(annotated, self._part_table, self._rule, self._iou_threshold,
                                   self._min_keypoint_box_iou)
        self._unassigned.inc(selection.unassigned_keypoint_dets)
        for dropped in selection.dropped:
            record_id = (photo_key if dropped.person_index is None
                         else sample_key(record.photo_id, dropped.person_index))
            yield reject(STAGE, dropped.reason, record_id, dropped.detail, record.photo_id,
                         record.user_nsid)
        if not selection.kept:
            self._without_person.inc()
            yield reject(STAGE, "no_person", photo_key,
                         f"{selection.detected} person(s) detected, none kept", record.photo_id,
                         record.user_nsid)
            return
        self._with_person.inc()
        self._persons_kept.inc(len(selection.kept))
        yield SelectedPhoto(photo=annotated.photo, annotator=annotated.annotator, persons=selection.kept)


class SelectPersons(beam.PTransform):
    """Apply the FDH person rules to annotated photos (see the module docstring for outputs).

    `part_table`: path of part_table.npy (or its directory; local or gs://), or the array itself;
    needed for 'fdh' photos, may be None when only 'lite' photos come in.
    `keypoint_score_threshold`: keypoints scoring below it are ignored by the rule; None = per
    annotator (rules.DEFAULT_SCORE_THRESHOLDS: 0.0 for keypoint R-CNN logits, 0.5 for BlazePose).
    """

    def __init__(self, part_table: Union[str, np.ndarray, None] = None, min_keypoint_matches: int = 4,
                 min_head_matches: int = 2, keypoint_score_threshold: Optional[float] = None,
                 iou_threshold: float = IOU_COMBINE_THRESHOLD,
                 min_keypoint_box_iou: float = MIN_KEYPOINT_BOX_IOU):
        super().__init__()
        if isinstance(part_table, np.ndarray):
            part_table = validate_table(part_table)
        elif isinstance(part_table, str):
            from apache_beam.io.filesystems import FileSystems

            path = part_table if part_table.endswith(".npy") else part_table.rstrip("/") + "/part_table.npy"
            if not FileSystems.exists(path):
                raise FileNotFoundError(f"part table not found: {path} "
                                        "(build it with python -m beam_jobs.part_table --output=DIR)")
        elif part_table is not None:
            raise TypeError(f"part_table must be a path or an array, got {type(part_table)}")
        if min_keypoint_matches < 0 or min_head_matches < 0:
            raise ValueError("match thresholds must be >= 0")
        if not 0 < iou_threshold <= 1:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        self._part_table = part_table
        self._rule = FdhRule(min_keypoint_matches, min_head_matches, keypoint_score_threshold)
        self._iou_threshold = iou_threshold
        self._min_keypoint_box_iou = min_keypoint_box_iou

    def expand(self, photos: beam.PCollection) -> StageOutput:
        return stage_output(photos | "Select" >> beam.ParDo(_SelectPersonsFn(
            self._part_table, self._rule, self._iou_threshold, self._min_keypoint_box_iou)
        ).with_outputs(REJECTS_TAG, main="main"))
