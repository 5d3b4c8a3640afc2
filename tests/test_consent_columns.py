"""The consent columns (issue 15) in the shard Parquet files, and datasets written before them.

A dataset written before the columns existed is still valid: `verify` accepts it (the consent
columns may be missing, no other column may), and every job that reads shard Parquet (search,
takedown, recheck, export, strip_embeddings; stats and part_table read no shard Parquet) works
on it. A job that rewrites a shard
writes today's schema, the consent columns null, so a dataset may mix both; that passes too.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_jobs import export, recheck, search_user, strip_embeddings, takedown, verify
from dataset.schema import CONSENT_COLUMNS, PARQUET_SCHEMA
from dataset.shards import PARQUET_COMPRESSION, read_parquet_rows
from dataset.verify import parquet_schema_problems
from tests.flickr_api_fixture import API_KEY, CC_BY_4, CC_BY_ND_4, FakePhoto, World, serve
from tests.jobs_dataset import LAYOUT, OTHER, VICTIM, build_dataset
from tests.factories import make_sample
from transforms.consent import GET_LICENSES
from transforms.s8_write import sample_row


def _manifest(dataset: Path) -> dict:
    return json.loads((dataset / "manifest.json").read_text())


def as_written_before(dataset: Path) -> Path:
    """Rewrite `dataset`'s shard Parquet as the writer did before the consent columns (same
    options, the columns dropped) and update the manifest's sha256s; returns `dataset`."""
    manifest = _manifest(dataset)
    for entry in manifest["shards"]:
        path = dataset / entry["parquet"]
        table = pq.read_table(path).drop_columns(list(CONSENT_COLUMNS))
        pq.write_table(table, path, compression=PARQUET_COMPRESSION,
                       row_group_size=max(table.num_rows, 1))
        entry["parquet_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (dataset / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return dataset


@pytest.fixture(scope="module")
def old_pristine(tmp_path_factory) -> Path:
    """The jobs LAYOUT dataset as written before the consent columns (never modify it)."""
    return as_written_before(build_dataset(tmp_path_factory.mktemp("old")))


@pytest.fixture
def old(old_pristine, tmp_path) -> Path:
    shutil.copytree(old_pristine, tmp_path / "old")
    return tmp_path / "old"


def verified(dataset: Path) -> dict:
    """verify's report (its exit code is 0 iff report["ok"])."""
    return verify.run([f"--dataset={dataset}"])


def test_new_rows_hold_null_consent_columns_in_schema_order():
    row = sample_row(make_sample(1, 0, license="cc-by-2"), "cc-by-2/train/out-000000.tar")
    assert list(row) == PARQUET_SCHEMA.names
    assert [row[name] for name in CONSENT_COLUMNS] == [None] * 3
    assert PARQUET_SCHEMA.names[-4:] == [*CONSENT_COLUMNS, "shard"]


def test_verify_accepts_a_dataset_written_before_the_consent_columns(old):
    first = old / _manifest(old)["shards"][0]["parquet"]
    assert not set(CONSENT_COLUMNS) & set(pq.read_schema(first).names)
    report = verified(old)
    assert report["ok"], report["problems"]


def test_verify_names_a_parquet_column_missing_retyped_or_unknown():
    schema = PARQUET_SCHEMA.remove(PARQUET_SCHEMA.get_field_index("photo_title"))
    schema = schema.set(schema.get_field_index("crop_x0"), pa.field("crop_x0", pa.string()))
    schema = schema.append(pa.field("extra", pa.int8()))
    assert parquet_schema_problems(schema) == [
        "column photo_title missing", "column crop_x0 is string, expected int32",
        "unknown columns ['extra']"]
    old_schema = pa.schema([field for field in PARQUET_SCHEMA if field.name not in CONSENT_COLUMNS])
    assert parquet_schema_problems(old_schema) == parquet_schema_problems(PARQUET_SCHEMA) == []


def test_verify_reports_a_shard_whose_parquet_lost_a_column(old):
    entry = _manifest(old)["shards"][0]
    path = old / entry["parquet"]
    pq.write_table(pq.read_table(path).drop_columns(["annotator"]), path)
    report = verified(old)
    assert not report["ok"]
    assert any(f"{entry['parquet']}: column annotator missing" in problem
               for problem in report["problems"])


def test_search_and_takedown_of_an_old_dataset_then_verify_passes_on_the_mixed_result(old):
    assert search_user.run([f"--dataset={old}", f"--user_nsid={VICTIM}"]) == 0
    takedown.run([f"--dataset={old}", f"--user_nsid={VICTIM}"])
    rewritten = [entry for entry in _manifest(old)["shards"]
                 if set(CONSENT_COLUMNS) <= set(pq.read_schema(old / entry["parquet"]).names)]
    untouched = [entry for entry in _manifest(old)["shards"] if entry not in rewritten]
    assert rewritten and untouched  # a mixed dataset: rewritten shards gained the columns
    for entry in rewritten:
        assert all(row[name] is None for row in read_parquet_rows(str(old / entry["parquet"]))
                   for name in CONSENT_COLUMNS)
    remaining = {row["user_nsid"] for entry in _manifest(old)["shards"]
                 for row in read_parquet_rows(str(old / entry["parquet"]))}
    assert VICTIM not in remaining and OTHER in remaining
    report = verified(old)
    assert report["ok"], report["problems"]


def test_recheck_of_an_old_dataset_removes_the_relicensed_photo_and_verify_passes(old):
    """One photo relicensed to a NoDerivs 4.0 licence (an id beyond the verified table), one to
    a 4.0 licence that permits derivatives: the licence list is asked once; only the first goes."""
    withdrawn, relicensed_ok = LAYOUT[0][0], LAYOUT[1][0]
    licence = {withdrawn: CC_BY_ND_4, relicensed_ok: CC_BY_4}
    fake = serve(World().add(*(FakePhoto(photo_id, user, licence.get(photo_id, 4))
                               for photo_id, _, user, _, _ in LAYOUT)))
    try:
        report = recheck.run([f"--dataset={old}", f"--flickr_api_key={API_KEY}",
                              f"--flickr_api_url={fake.url}", "--flickr_requests_per_second=1000"])
    finally:
        fake.stop()
    assert [removed["photo_id"] for removed in report["removed"]] == [withdrawn]
    assert report["removed_by_reason"] == {"consent.license_changed": 1}
    assert report["api_calls"][GET_LICENSES] == 1
    assert "(cc-by-2 -> cc-by-nd-4 (https://creativecommons.org/licenses/by-nd/4.0/))" \
        in (old / "opt_out.txt").read_text()
    report = verified(old)
    assert report["ok"], report["problems"]


def test_export_and_strip_embeddings_read_an_old_dataset(old, tmp_path):
    exported, stripped = tmp_path / "fdh", tmp_path / "stripped"
    manifest = export.run([f"--dataset={old}", "--licenses=cc-by-2,cc-by-sa-2",
                           f"--output={exported}"])
    rows = [row for entry in manifest["shards"]
            for row in read_parquet_rows(str(exported / entry["parquet"]))]
    assert rows and all(row[name] is None for row in rows for name in CONSENT_COLUMNS)
    strip_embeddings.run([f"--dataset={old}", f"--output={stripped}"])
    report = verified(stripped)
    assert report["ok"], report["problems"]
