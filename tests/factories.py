"""Builders of valid records for tests: override only the fields a test is about."""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from transforms.records import (CROP_HEIGHT, CROP_WIDTH, NUM_CSE_VERTICES, FdhSample, YfccRecord,
                                sample_key)


def yfcc_hash(download_url: str) -> str:
    """YFCC's hash column: md5 of the download URL, each byte printed with '%x' (no padding)."""
    return "".join("%x" % byte for byte in hashlib.md5(download_url.encode("utf-8")).digest())


def make_record(photo_id: int = 1000, **overrides) -> YfccRecord:
    """A valid CC BY photo record; any field can be overridden."""
    download_url = overrides.pop(
        "download_url", f"http://farm1.staticflickr.com/2/{photo_id}_abcdef0123.jpg")
    fields = dict(
        photo_id=photo_id,
        photo_hash=yfcc_hash(download_url),
        user_nsid="12345678@N00",
        user_nickname="someone",
        date_taken="2013-08-21 13:21:46.0",
        date_uploaded=1377635391,
        capture_device="Canon EOS 5D",
        title="A title",
        description="",
        user_tags=("people", "street"),
        machine_tags=(),
        longitude=None,
        latitude=None,
        accuracy=None,
        page_url=f"http://www.flickr.com/photos/12345678@N00/{photo_id}/",
        download_url=download_url,
        license_name="Attribution License",
        license_url="http://creativecommons.org/licenses/by/2.0/",
        license="cc-by-2",
        server_id="2",
        farm_id="1",
        secret="abcdef0123",
        secret_original="0123abcdef",
        original_extension="jpg",
        marker=0,
        line_idx=photo_id,
        source=f"test.txt:{photo_id}",
    )
    fields.update(overrides)
    return YfccRecord(**fields)


def make_sample(photo_id: int = 1000, person_index: int = 0, seed: int | None = None,
                with_embeddings: bool = True, **record_overrides) -> FdhSample:
    """A valid FdhSample with deterministic pseudo-random pixels (seeded by key unless given)."""
    record = make_record(photo_id, **record_overrides)
    rng = np.random.default_rng(seed if seed is not None else photo_id * 100 + person_index)
    h, w = CROP_HEIGHT, CROP_WIDTH
    person = np.zeros((h, w), bool)
    person[40:260, 40:120] = True
    dilated = np.zeros((h, w), bool)
    dilated[36:264, 36:124] = True
    keypoints = np.zeros((17, 3), np.float32)
    keypoints[:, 0] = rng.uniform(0.3, 0.7, 17)
    keypoints[:, 1] = rng.uniform(0.1, 0.9, 17)
    keypoints[:, 2] = 1.0
    e_mask = person.copy() if with_embeddings else None
    vertices = None
    if with_embeddings:
        vertices = np.where(person, rng.integers(0, NUM_CSE_VERTICES, (h, w)), 0).astype(np.int16)
    return FdhSample(
        key=sample_key(photo_id, person_index),
        record=record,
        person_index=person_index,
        image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        mask=~dilated,
        maskrcnn_mask=~person,
        keypoints=keypoints,
        crop_box=(10, 20, 170, 308),
        source_sha256=hashlib.sha256(f"{photo_id}".encode()).hexdigest(),
        detection_score=0.99,
        keypoint_scores=np.full(17, 0.9, np.float32),
        e_mask=e_mask,
        vertices=vertices,
        split="train",
        annotator="test",
    )


def read_tree(root) -> dict[str, bytes]:
    """Every file under `root` by relative path -> bytes (to compare two outputs byte for byte)."""
    import os

    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = handle.read()
    return found


def replace(record, **changes):
    """dataclasses.replace, re-exported for brevity in tests."""
    return dataclasses.replace(record, **changes)
