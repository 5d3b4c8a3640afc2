"""WriteRejects (transforms/rejects.py): rejects/*.parquet hold every reject, in row groups of a
bounded size (Beam's writer otherwise buffers 64 MiB of Arrow data per file first: ~150 MiB of
a local rebuild's peak at a million rejects, issue 13)."""
from __future__ import annotations

import glob

import apache_beam as beam
import pyarrow.parquet as pq
import pytest

from transforms.records import Rejected
from transforms.rejects import WriteRejects


@pytest.mark.pipeline
def test_rejects_are_written_whole_in_row_groups_of_the_given_size(tmp_path):
    rejects = [Rejected(str(index), "prefilter", "license_not_allowed", "x" * (index % 50), index,
                        f"{index}@N01") for index in range(5000)]
    with beam.Pipeline() as pipeline:
        _ = (pipeline | beam.Create(rejects)
             | WriteRejects(str(tmp_path), num_shards=1, row_group_bytes=32 << 10))
    [path] = glob.glob(f"{tmp_path}/rejects/rejects-*.parquet")
    parquet = pq.ParquetFile(path)
    assert parquet.metadata.num_row_groups >= 5
    assert max(parquet.metadata.row_group(index).num_rows
               for index in range(parquet.metadata.num_row_groups)) < 2000
    rows = parquet.read().to_pylist()
    assert sorted(rows, key=lambda row: row["photo_id"]) == [
        {"record_id": r.record_id, "stage": r.stage, "reason": r.reason, "detail": r.detail,
         "photo_id": r.photo_id, "user_nsid": r.user_nsid} for r in rejects]
