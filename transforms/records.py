"""The typed records that flow between the stages of the rebuild pipeline.

Every stage reads one of these and emits the next (or a `Rejected`):

    YfccRecord -> FetchedImage -> DecodedImage -> AnnotatedPhoto -> Person -> FdhSample

They are plain dataclasses so that the pure-Python cores of the stages can be tested without
Beam, and they pickle cleanly for Beam's default coder. Arrays are NumPy, in the full-image
pixel frame of the decoded photo unless a field says otherwise.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

# Beam Metrics namespace shared by every stage.
METRICS_NAMESPACE = "fdh"

# Tag of the side output that carries `Rejected` records out of every stage.
REJECTS_TAG = "rejects"

# COCO keypoint order (17), as torchvision and FDH use it.
COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
HEAD_KEYPOINTS = (0, 1, 2, 3, 4)

# Default keypoint score threshold per annotator, when none is configured: torchvision keypoint
# R-CNN scores are heatmap logits (> 0: more likely visible than not); the lite annotator's are
# BlazePose visibilities in [0, 1], 0.5 as in its own settings.
# 'fdh_detectron2' (DP2's detectron2 detectors): keypoint scores are probabilities, visible at 0.5
# (DP2 compute_oks.py: "Same as used for annotating FDH").
DEFAULT_SCORE_THRESHOLDS = {"fdh": 0.0, "fdh_detectron2": 0.5, "lite": 0.5}
FDH_ANNOTATORS = ("fdh", "fdh_detectron2")  # annotator names of the FDH cascade, per --detector


def score_threshold_for(annotator: str, configured: Optional[float]) -> float:
    """The configured keypoint score threshold, else the annotator's default (0.0 if unknown)."""
    if configured is not None:
        return float(configured)
    return DEFAULT_SCORE_THRESHOLDS.get(annotator, 0.0)


# Crop size of an FDH sample, height x width.
CROP_HEIGHT = 288
CROP_WIDTH = 160

# Number of vertices of the DensePose CSE mesh `smpl_27554`.
NUM_CSE_VERTICES = 27554

# YFCC100M licence name -> (FDH subset slug, licence URL). All CC 2.0.
LICENSES = {
    "Attribution License": ("cc-by-2", "http://creativecommons.org/licenses/by/2.0/"),
    "Attribution-ShareAlike License": ("cc-by-sa-2", "http://creativecommons.org/licenses/by-sa/2.0/"),
    "Attribution-NoDerivs License": ("cc-by-nd-2", "http://creativecommons.org/licenses/by-nd/2.0/"),
    "Attribution-NonCommercial License": ("cc-by-nc-2", "http://creativecommons.org/licenses/by-nc/2.0/"),
    "Attribution-NonCommercial-ShareAlike License": (
        "cc-by-nc-sa-2", "http://creativecommons.org/licenses/by-nc-sa/2.0/"),
    "Attribution-NonCommercial-NoDerivs License": (
        "cc-by-nc-nd-2", "http://creativecommons.org/licenses/by-nc-nd/2.0/"),
}
# The four subsets FDH publishes (no NoDerivs licence allows derived crops).
FDH_LICENSES = ("cc-by-2", "cc-by-sa-2", "cc-by-nc-2", "cc-by-nc-sa-2")


# Persons per photo that a sample key can number: key = photo_id * KEY_PERSONS_PER_PHOTO + index.
KEY_PERSONS_PER_PHOTO = 1000


def sample_key(photo_id: int, person_index: int) -> str:
    """FDH-compatible sample key: the decimal integer photo_id * 1000 + person_index.

    FDH's keys are integers (its download_no_embeddings.py calls `int(key)`), so ours are too:
    unique per person (person_index < 1000 is checked), deterministic, digits only (no dot, no
    slash). `photo_id_of_key` inverts it. The sample's `id` field stays the Flickr photo id,
    shared by every person of the photo.
    """
    photo_id, person_index = int(photo_id), int(person_index)
    if photo_id < 0:
        raise ValueError(f"photo id must be >= 0, got {photo_id}")
    if not 0 <= person_index < KEY_PERSONS_PER_PHOTO:
        raise ValueError(f"person index {person_index} outside [0, {KEY_PERSONS_PER_PHOTO}): "
                         f"the integer sample key cannot number it")
    return str(photo_id * KEY_PERSONS_PER_PHOTO + person_index)


def photo_id_of_key(key: str) -> tuple[int, int]:
    """(photo_id, person_index) of a `sample_key`."""
    return divmod(int(key), KEY_PERSONS_PER_PHOTO)


@dataclass(frozen=True)
class YfccRecord:
    """One decoded YFCC100M metadata line (23- or 25-column layout)."""

    photo_id: int
    photo_hash: str  # md5 of the download URL, '%x' per byte (mirror key); computed for 23-col rows
    user_nsid: str
    user_nickname: str
    date_taken: Optional[str]  # 'YYYY-MM-DD HH:MM:SS.0' or None for 'null'
    date_uploaded: int  # unix seconds
    capture_device: str
    title: str
    description: str
    user_tags: tuple[str, ...]
    machine_tags: tuple[str, ...]
    longitude: Optional[float]
    latitude: Optional[float]
    accuracy: Optional[int]
    page_url: str
    download_url: str
    license_name: str
    license_url: str
    license: Optional[str]  # FDH slug such as 'cc-by-2'; None when the licence is not CC
    server_id: str
    farm_id: str
    secret: str
    secret_original: str
    original_extension: str
    marker: int  # 0 photo, 1 video
    line_idx: Optional[int] = None  # 0-based YFCC line number (column 0 of the 25-column layout)
    source: str = ""  # 'file:line' where the record was read, for rejects and debugging

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DETAIL_MAX_CHARS = 300  # a reject's detail is cut to this many characters (the last three "...")


@dataclass(frozen=True)
class Rejected:
    """A record dropped by a stage, with the reason; rejects never carry image data."""

    record_id: str  # photo id, or 'file:line' when no id could be parsed
    stage: str  # 'read', 'prefilter', 'fetch', 'decode', 'annotate', 'select', 'crop', 'write'
    reason: str  # short machine-readable reason, e.g. 'licence_not_allowed'
    detail: str = ""  # short human-readable detail (cut to DETAIL_MAX_CHARS characters)
    photo_id: Optional[int] = None
    user_nsid: Optional[str] = None

    def __post_init__(self) -> None:
        if len(self.detail) > DETAIL_MAX_CHARS:
            object.__setattr__(self, "detail", self.detail[:DETAIL_MAX_CHARS - 3] + "...")


@dataclass
class FetchedImage:
    """The raw bytes of one photo and where they came from."""

    record: YfccRecord
    data: bytes
    url: str  # the URL / path the bytes came from (after redirects)
    source: str  # the image source that served it: 'mirror' or 'flickr'


@dataclass(frozen=True)
class StoredPhoto:
    """A photo a re-derive does not fetch (transforms.annotation_store.PrecheckStore): its sole
    stored entry yields no sample. Fetch passes it through; decode turns it into a pixel-free
    stand-in of the stored sha256 and decoded size (`s4_decode.stand_in`)."""

    record: YfccRecord
    sha256: str  # of the source file the stored entry was made from
    height: int  # of the decoded photo the entry describes
    width: int


@dataclass
class DecodedImage:
    """A validated RGB photo (EXIF orientation applied)."""

    record: YfccRecord
    image: np.ndarray  # uint8 (H, W, 3)
    sha256: str  # of the source bytes
    original_size: tuple[int, int]  # (width, height) of the source as stored
    url: str = ""


@dataclass
class Detections:
    """One model's detections of people on one photo, in the full-image pixel frame."""

    boxes: np.ndarray  # float32 (N, 4) x0, y0, x1, y1
    scores: np.ndarray  # float32 (N,)
    masks: Optional[np.ndarray] = None  # bool (N, H, W)
    keypoints: Optional[np.ndarray] = None  # float32 (N, 17, 3): x, y, score
    vertices: Optional[np.ndarray] = None  # int16 (N, H, W) CSE vertex ids, valid where masks
    # CSE only: per detection a transforms.cse_vertices.CseEmbedding (box-frame S and E), which
    # the crop stage maps into crop coordinates as DP2 does; None when not kept.
    embeddings: Optional[list[Any]] = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @staticmethod
    def empty() -> "Detections":
        """No detections (a photo with nobody in it)."""
        return Detections(boxes=np.zeros((0, 4), np.float32), scores=np.zeros((0,), np.float32))

    @staticmethod
    def empty_for_image(height: int, width: int, vertices: bool = False) -> "Detections":
        """No detections, with (0, H, W) masks (and vertices) so consumers need no None checks."""
        empty = Detections.empty()
        empty.masks = np.zeros((0, height, width), bool)
        if vertices:
            empty.vertices = np.zeros((0, height, width), np.int16)
        return empty


@dataclass
class AnnotatedPhoto:
    """A photo with the raw outputs of the annotators, before the FDH rules run."""

    photo: DecodedImage
    annotator: str  # 'fdh' (keypoint R-CNN + mask + CSE) or 'lite' (mediapipe)
    keypoint_dets: Detections  # keypoints set
    mask_dets: Optional[Detections] = None  # masks set
    cse_dets: Optional[Detections] = None  # masks (CSE coarse segmentation) and vertices set


@dataclass
class Person:
    """One person in a photo after combining the models' detections."""

    index: int  # position in the photo's person list (part of the sample key)
    box: np.ndarray  # float32 (4,) union box of mask and CSE detections
    mask: np.ndarray  # bool (H, W) person mask (union of mask and CSE masks)
    keypoints: np.ndarray  # float32 (17, 3): x, y, score in image pixels
    score: float  # detection score
    e_mask: Optional[np.ndarray] = None  # bool (H, W): where the CSE has an embedding
    vertices: Optional[np.ndarray] = None  # int16 (H, W) CSE vertex ids, 0 outside e_mask
    cse: Optional[Any] = None  # transforms.cse_vertices.CseEmbedding of its CSE detection
    extra: dict[str, Any] = field(default_factory=dict)  # scores and matching details


@dataclass
class FdhSample:
    """One 288x160 FDH sample ready to be written."""

    key: str  # sample_key(photo_id, person_index)
    record: YfccRecord
    person_index: int
    image: np.ndarray  # uint8 (288, 160, 3)
    mask: np.ndarray  # bool (288, 160): 1 = background (NOT dilated person mask)
    maskrcnn_mask: np.ndarray  # bool (288, 160): 1 = background (NOT person mask)
    keypoints: np.ndarray  # float32 (17, 3): x/W, y/H in the crop, visibility 0/1
    crop_box: tuple[int, int, int, int]  # x0, y0, x1, y1 in the source photo (may exceed it)
    source_sha256: str
    detection_score: float = 0.0
    keypoint_scores: Optional[np.ndarray] = None  # float32 (17,)
    e_mask: Optional[np.ndarray] = None  # bool (288, 160): 1 where the CSE has an embedding
    vertices: Optional[np.ndarray] = None  # int16 (288, 160)
    split: Optional[str] = None  # 'train' or 'val', set by AssignSplit
    annotator: str = ""
