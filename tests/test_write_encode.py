"""Encoding of one FdhSample: members, deterministic bytes, metadata entry, Parquet row, bad samples."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.factories import make_sample, replace
from transforms.records import NUM_CSE_VERTICES
from dataset.layout import EMBEDDING_MEMBERS
from dataset.schema import METADATA_FIELDS, PARQUET_SCHEMA
from transforms.s8_write import (encode_sample, metadata_from_row, sample_metadata, sample_row,
                                 SampleError)

FDH_README_FIELDS = {"author", "cateogry", "date_crawled", "unixtime_crawled", "date_taken",
                     "date_uploaded", "license", "license_url", "photo_title", "photo_url",
                     "yfcc100m_line_idx", "id", "user_nsid"}


def test_members_decode_back_to_the_sample():
    sample = make_sample(4242, 1)
    members = encode_sample(sample)
    assert list(members) == ["__key__", "image.png", "mask.png", "maskrcnn_mask.png", "e_mask.png",
                             "keypoints.npy", "vertices.npy", "json"]
    assert members["__key__"] == "4242001"
    image = Image.open(io.BytesIO(members["image.png"]))
    assert (image.mode, image.size) == ("RGB", (160, 288))
    np.testing.assert_array_equal(np.asarray(image), sample.image)
    for name, array in (("mask.png", sample.mask), ("maskrcnn_mask.png", sample.maskrcnn_mask),
                        ("e_mask.png", sample.e_mask)):
        mask = Image.open(io.BytesIO(members[name]))
        assert mask.mode == "1"  # 1-bit PNG
        np.testing.assert_array_equal(np.asarray(mask), array)
    keypoints = np.load(io.BytesIO(members["keypoints.npy"]), allow_pickle=False)
    assert keypoints.dtype == np.float32 and keypoints.shape == (17, 3)
    np.testing.assert_array_equal(keypoints, sample.keypoints)
    vertices = np.load(io.BytesIO(members["vertices.npy"]), allow_pickle=False)
    assert vertices.dtype == np.int16 and vertices.shape == (288, 160)
    np.testing.assert_array_equal(vertices, sample.vertices)
    assert json.loads(members["json"]) == sample_metadata(sample)


def test_encoding_is_deterministic_and_no_embeddings_drops_cse_members():
    sample = make_sample(7, 0)
    assert encode_sample(sample) == encode_sample(make_sample(7, 0))
    stripped = encode_sample(sample, no_embeddings=True)
    assert set(encode_sample(sample)) - set(stripped) == set(EMBEDDING_MEMBERS)
    # A sample without embeddings can be written as the no-embeddings variant only.
    bare = make_sample(8, 0, with_embeddings=False)
    assert "vertices.npy" not in encode_sample(bare, no_embeddings=True)
    with pytest.raises(SampleError) as error:
        encode_sample(bare)
    assert error.value.reason == "missing_array"


def test_metadata_entry_has_fdh_fields_and_crawl_time_from_the_run():
    sample = replace(make_sample(99, 2), split="val")
    entry = sample_metadata(sample, crawl_time=1637341702.1145487)
    assert set(entry) == FDH_README_FIELDS | {"category"} == set(METADATA_FIELDS)
    assert entry["cateogry"] == entry["category"] == "val"
    assert entry["date_crawled"] == "2021-11-19"  # FDH README's own example pair
    assert entry["unixtime_crawled"] == 1637341702.1145487
    assert entry["date_uploaded"] == "1377635391" and entry["yfcc100m_line_idx"] == "99"
    assert entry["id"] == 99 and entry["user_nsid"] == "12345678@N00"
    assert entry["license"] == "Attribution License"
    assert entry["photo_url"] == "http://www.flickr.com/photos/12345678@N00/99/"


def test_parquet_row_matches_schema_and_carries_metadata():
    import pyarrow as pa

    sample = make_sample(5, 3)
    row = sample_row(sample, "cc-by-2/train/out-000000.tar", crawl_time=10.0)
    assert set(row) == set(PARQUET_SCHEMA.names)
    table = pa.Table.from_pylist([row], schema=PARQUET_SCHEMA)  # types fit the schema
    back = table.to_pylist()[0]
    assert metadata_from_row(back) == sample_metadata(sample, crawl_time=10.0)
    assert (back["crop_x0"], back["crop_y0"], back["crop_x1"], back["crop_y1"]) == sample.crop_box
    assert back["shard"] == "cc-by-2/train/out-000000.tar" and back["license_slug"] == "cc-by-2"
    assert back["source_sha256"] == sample.source_sha256 and back["person_index"] == 3
    assert back["keypoint_scores"] == pytest.approx([0.9] * 17)


@pytest.mark.parametrize("change, reason", [
    (dict(split=None), "no_split"),
    (dict(key="1.2"), "bad_key"),
    (dict(image=np.zeros((288, 160), np.uint8)), "bad_array"),
    (dict(mask=np.zeros((288, 160), np.uint8)), "bad_array"),
    (dict(keypoints=np.full((17, 3), np.nan, np.float32)), "bad_array"),
    (dict(vertices=np.full((288, 160), NUM_CSE_VERTICES, np.int32)), "bad_array"),
])
def test_bad_samples_raise_sample_error_with_a_reason(change, reason):
    with pytest.raises(SampleError) as error:
        encode_sample(replace(make_sample(), **change))
    assert error.value.reason == reason


def test_licence_outside_fdh_is_refused():
    sample = make_sample(license="cc-by-nd-2")
    with pytest.raises(SampleError) as error:
        encode_sample(sample)
    assert error.value.reason == "licence_not_fdh"
