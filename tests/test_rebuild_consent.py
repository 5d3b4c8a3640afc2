"""Issue 15: `rebuild --consent_check=api` and `rebuild` then `recheck` end with the same samples.

The tar members (FDH's metadata.json entry among them) are equal. The Parquet rows differ only
in the consent columns: the build-time check records when Flickr was asked and the licence it
reported; a plain rebuild leaves them null, and recheck, which only removes samples (through the
takedown path, rewriting only the shards that lose some), leaves the kept rows as they were."""
from __future__ import annotations

import glob
import json
import os
import tarfile

import pytest

from beam_jobs import demo, rebuild, recheck
from dataset.schema import CONSENT_COLUMNS
from dataset.shards import read_parquet_rows
from tests.flickr_api_fixture import API_KEY, CC_BY_4, FakePhoto, World, serve
from transforms.consent import GET_LICENSES, utc_now
from transforms.reject_limits import RejectRateExceeded

CRAWL_TIME = "--crawl_time=1637341702.1145487"


def _members(dataset: str) -> dict[str, bytes]:
    """Every tar member of a dataset by name (keys are unique), with its bytes."""
    members = {}
    for path in sorted(glob.glob(os.path.join(dataset, "*", "*", "out-*.tar"))):
        with tarfile.open(path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return members


def _rows(dataset: str) -> dict[str, dict]:
    """Every Parquet row of a dataset's shards by key."""
    with open(os.path.join(dataset, "manifest.json"), encoding="utf-8") as handle:
        shards = json.load(handle)["shards"]
    return {row["key"]: row for entry in shards
            for row in read_parquet_rows(os.path.join(dataset, entry["parquet"]))}


def _without_consent(row: dict) -> dict:
    return {name: value for name, value in row.items() if name not in CONSENT_COLUMNS}


@pytest.mark.pipeline
def test_consent_check_at_build_time_equals_a_recheck_afterwards(tmp_path):
    yfcc, mirror = demo.build_sample(str(tmp_path / "sample"))
    # Flickr today: the astronaut relicensed to CC BY 4.0 (an id beyond the verified table: looked
    # up, allowed), Grace Hopper relicensed to NoDerivs, the cameraman deleted.
    fake = serve(World().add(FakePhoto(9000001, "10000001@N01", license_id=CC_BY_4),
                             FakePhoto(9000002, "10000002@N02", license_id=6),
                             FakePhoto(9000003, "10000003@N03", deleted=True)))
    common = [f"--yfcc={yfcc}", f"--image_source=mirror:{mirror}", "--annotator=lite", CRAWL_TIME]
    api = [f"--flickr_api_key={API_KEY}", f"--flickr_api_url={fake.url}"]
    checked, plain = str(tmp_path / "checked"), str(tmp_path / "plain")
    try:
        started = utc_now()
        stats = rebuild.run([*common, f"--output={checked}", "--consent_check=api", *api])
        calls_at_build, finished = dict(fake.calls), utc_now()
        rebuild.run([*common, f"--output={plain}"])
        recheck.run([f"--dataset={plain}", *api])
    finally:
        fake.stop()

    funnel = stats["funnel"]
    assert funnel["consent.license_changed"] == 1 and funnel["consent.not_found"] == 1
    assert stats["totals"]["samples"] == 1
    # only the three photos that yield a sample were asked about, and the licence list once
    assert calls_at_build == {"flickr.photos.getInfo": 3, GET_LICENSES: 1}
    kept = _members(checked)
    assert {name.split(".", 1)[0] for name in kept} == {"9000001000"}
    assert kept == _members(plain)
    # Parquet: the same rows but for the consent columns, filled by the check, null otherwise.
    checked_rows, plain_rows = _rows(checked), _rows(plain)
    assert {key: _without_consent(row) for key, row in checked_rows.items()} \
        == {key: _without_consent(row) for key, row in plain_rows.items()}
    row = checked_rows["9000001000"]
    assert started <= row["consent_checked_at"] <= finished
    assert (row["consent_license_id"], row["consent_license"]) == (CC_BY_4, "cc-by-4")
    assert [plain_rows["9000001000"][name] for name in CONSENT_COLUMNS] == [None] * 3
    with open(os.path.join(checked, "manifest.json"), encoding="utf-8") as handle:
        assert API_KEY not in handle.read()  # the key never lands in an output


@pytest.mark.pipeline
def test_a_consent_check_that_keeps_failing_fails_the_run_loudly(tmp_path):
    """A failed check never keeps a photo: it is a reject and counts toward --max_reject_rate."""
    yfcc, mirror = demo.build_sample(str(tmp_path / "sample"))
    fake = serve(World())
    fake.inject(*["503"] * 40)
    try:
        with pytest.raises(RejectRateExceeded, match=r"consent rejected 3 of 3 .*check_failed"):
            rebuild.run([f"--yfcc={yfcc}", f"--image_source=mirror:{mirror}", "--annotator=lite",
                         CRAWL_TIME, f"--output={tmp_path / 'out'}", "--consent_check=api",
                         f"--flickr_api_key={API_KEY}", f"--flickr_api_url={fake.url}"])
    finally:
        fake.stop()
