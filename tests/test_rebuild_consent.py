"""Issue 15: `rebuild --consent_check=api` and `rebuild` then `recheck` end with the same samples."""
from __future__ import annotations

import glob
import os
import tarfile

import pytest

from beam_jobs import demo, rebuild, recheck
from tests.flickr_api_fixture import API_KEY, FakePhoto, World, serve
from transforms.reject_limits import RejectRateExceeded

CRAWL_TIME = "--crawl_time=1637341702.1145487"


def _members(dataset: str) -> dict[str, bytes]:
    """Every tar member of a dataset by name (keys are unique), with its bytes."""
    members = {}
    for path in sorted(glob.glob(os.path.join(dataset, "*", "*", "out-*.tar"))):
        with tarfile.open(path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return members


@pytest.mark.pipeline
def test_consent_check_at_build_time_equals_a_recheck_afterwards(tmp_path):
    yfcc, mirror = demo.build_sample(str(tmp_path / "sample"))
    # Flickr today: the astronaut unchanged, Grace Hopper relicensed to NoDerivs, the cameraman deleted.
    fake = serve(World().add(FakePhoto(9000001, "10000001@N01"),
                             FakePhoto(9000002, "10000002@N02", license_id=6),
                             FakePhoto(9000003, "10000003@N03", deleted=True)))
    common = [f"--yfcc={yfcc}", f"--image_source=mirror:{mirror}", "--annotator=lite", CRAWL_TIME]
    api = [f"--flickr_api_key={API_KEY}", f"--flickr_api_url={fake.url}"]
    checked, plain = str(tmp_path / "checked"), str(tmp_path / "plain")
    try:
        stats = rebuild.run([*common, f"--output={checked}", "--consent_check=api", *api])
        calls_at_build = sum(fake.calls.values())
        rebuild.run([*common, f"--output={plain}"])
        recheck.run([f"--dataset={plain}", *api])
    finally:
        fake.stop()

    funnel = stats["funnel"]
    assert funnel["consent.license_changed"] == 1 and funnel["consent.not_found"] == 1
    assert stats["totals"]["samples"] == 1
    assert calls_at_build == 3  # only the three photos that yield a sample were asked about
    kept = _members(checked)
    assert {name.split(".", 1)[0] for name in kept} == {"9000001000"}
    assert kept == _members(plain)
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
