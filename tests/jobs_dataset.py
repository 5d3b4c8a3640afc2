"""A small dataset built by the project's own writer, for the tests of search_user / takedown /
verify / stats. Build it once per test module (`build_dataset`) and copy it per test (`copy_of`).

The user `VICTIM` has samples in three licences and both splits, spread over several shards
(shards hold at most 2 samples here); photo `TWO_PERSON_PHOTO` has two persons (two samples).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from tests.factories import make_sample, replace
from transforms.records import LICENSES, sample_key
from tests.beam_writer import write_with_beam

VICTIM = "11111111@N01"
OTHER = "22222222@N02"
THIRD = "33333333@N03"
UNKNOWN = "99999999@N09"
TWO_PERSON_PHOTO = 2001
NAME_OF = {slug: (name, url) for name, (slug, url) in LICENSES.items()}

# (photo id, persons, user, licence slug, split)
LAYOUT = [
    (1001, 1, VICTIM, "cc-by-2", "train"),
    (1002, 1, VICTIM, "cc-by-2", "train"),
    (1003, 1, VICTIM, "cc-by-nc-sa-2", "train"),
    (1004, 1, VICTIM, "cc-by-sa-2", "val"),
    (2001, 2, OTHER, "cc-by-2", "train"),
    (2002, 1, OTHER, "cc-by-2", "train"),
    (2003, 1, OTHER, "cc-by-nc-sa-2", "train"),
    (2004, 1, OTHER, "cc-by-nc-2", "val"),
    (3001, 1, THIRD, "cc-by-2", "train"),
    (3002, 1, THIRD, "cc-by-sa-2", "val"),
    (3003, 1, THIRD, "cc-by-nc-2", "train"),
]
MAX_SAMPLES = 2


def dataset_samples():
    for photo_id, persons, user, slug, split in LAYOUT:
        name, url = NAME_OF[slug]
        for person in range(persons):
            sample = make_sample(photo_id, person, user_nsid=user, license=slug,
                                 license_name=name, license_url=url,
                                 page_url=f"http://www.flickr.com/photos/{user}/{photo_id}/")
            yield replace(sample, split=split)


def keys_of(user: str) -> list[str]:
    """Sample keys of a user in LAYOUT, sorted."""
    return sorted(sample_key(p, i) for p, n, u, _, _ in LAYOUT if u == user for i in range(n))


def build_dataset(root: Path, no_embeddings: bool = False) -> Path:
    """Write the LAYOUT dataset with the project's writer; returns its directory."""
    out = root / "dataset"
    write_with_beam(str(out), dataset_samples(), max_samples=MAX_SAMPLES, no_embeddings=no_embeddings,
                  counts={"funnel.lines_read": 40, "prefilter.license_not_allowed": 12,
                          "funnel.candidates": 28, "fetch.not_found": 3, "funnel.decoded": 25,
                          "funnel.annotated": 25, "select.no_person": 14,
                          "funnel.photos_with_person": 11, "funnel.samples": 12})
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """The LAYOUT dataset, built once per test module (never modify it: use `dataset`)."""
    return build_dataset(tmp_path_factory.mktemp("jobs"))


@pytest.fixture
def dataset(pristine, tmp_path) -> Path:
    """A fresh copy of the LAYOUT dataset for one test to modify."""
    return copy_of(pristine, tmp_path)


def copy_of(dataset: Path, root: Path) -> Path:
    target = root / "copy"
    shutil.copytree(dataset, target)
    return target


def file_digests(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root."""
    digests = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            digests[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests
