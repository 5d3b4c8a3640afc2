"""recheck: asks the (loopback, fake) Flickr API about every photo of a built dataset and takes
down, through the takedown core, exactly the photos whose owners no longer allow them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from beam_jobs import recheck, verify
from dataset import shards
from dataset.takedown import with_reasons
from tests.beam_writer import write_with_beam
from tests.factories import make_sample, replace
from tests.flickr_api_fixture import (API_KEY, DELETED, MADE_PRIVATE, RELICENSED_ND, TAGGED_NO_CV,
                                      UNCHANGED, flickr_api)  # noqa: F401 (fixture)
from tests.jobs_dataset import NAME_OF, file_digests
from transforms.consent import GET_INFO, GET_LICENSES, GET_PUBLIC_PHOTOS
from transforms.opt_out import parse_opt_out
from transforms.records import Rejected

# What the 2014 snapshot held: (photo id, persons, owner, licence then). Flickr now says
# (consent_world): 101 unchanged, 102 tagged no_cv, 103 relicensed NoDerivs, 104 deleted,
# 105 made private.
SNAPSHOT = [(UNCHANGED, 2, "1@N01", "cc-by-2"), (TAGGED_NO_CV, 1, "2@N01", "cc-by-sa-2"),
            (RELICENSED_ND, 1, "3@N01", "cc-by-2"), (DELETED, 1, "4@N01", "cc-by-nc-2"),
            (MADE_PRIVATE, 1, "5@N01", "cc-by-2")]
GONE = {TAGGED_NO_CV: "consent.no_cv_tag", RELICENSED_ND: "consent.license_changed",
        DELETED: "consent.not_found", MADE_PRIVATE: "consent.not_found"}
KEPT_KEYS = {str(UNCHANGED * 1000), str(UNCHANGED * 1000 + 1)}  # integer keys (issue 12)


def snapshot_samples():
    for photo_id, persons, owner, slug in SNAPSHOT:
        name, url = NAME_OF[slug]
        for person in range(persons):
            yield replace(make_sample(photo_id, person, user_nsid=owner, license=slug,
                                      license_name=name, license_url=url), split="train")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recheck") / "dataset"
    write_with_beam(str(out), snapshot_samples(), max_samples=2,
                    counts={"funnel.samples": 6, "funnel.photos_with_person": 5})
    return out


@pytest.fixture
def dataset(pristine, tmp_path) -> Path:
    import shutil

    shutil.copytree(pristine, tmp_path / "copy")
    return tmp_path / "copy"


def run_recheck(dataset: Path, url: str, *flags: str) -> dict:
    return recheck.run([f"--dataset={dataset}", f"--flickr_api_key={API_KEY}",
                        f"--flickr_api_url={url}", "--flickr_requests_per_second=1000",
                        "--flickr_backoff=0.01", *flags])


def sample_keys(dataset: Path) -> dict[str, set[str]]:
    """The sample keys each output holds: tar members, Parquet rows, metadata.json, manifest."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    tar_keys = {m["__key__"] for e in manifest["shards"]
                for m in shards.read_tar_shard(str(dataset / e["path"]))}
    parquet_keys = {row["key"] for e in manifest["shards"]
                    for row in shards.read_parquet_rows(str(dataset / e["parquet"]))}
    metadata_keys = set(json.loads((dataset / "metadata.json").read_text()))
    return {"tar": tar_keys, "parquet": parquet_keys, "metadata": metadata_keys,
            "manifest": {str(sum(e["samples"] for e in manifest["shards"]))}}


def test_recheck_removes_exactly_the_four_photos_owners_withdrew_and_a_rerun_is_a_no_op(
        dataset, flickr_api, capsys):
    flickr_api.inject("429", "503", "500", "105")  # rate limit and server errors, then answers
    report = run_recheck(dataset, flickr_api.url)

    assert {m["photo_id"] for m in report["removed"]} == set(GONE)
    assert report["photos_checked"] == 5 and report["photos_kept"] == 1 and report["ok"]
    assert report["failed"] == []
    assert report["removed_by_reason"] == {"consent.license_changed": 1,
                                           "consent.no_cv_tag": 1, "consent.not_found": 2}
    # One getInfo per photo (one owner each: cheaper than listings) plus the 4 retried faults.
    assert report["api_calls"] == {GET_INFO: 5 + 4, GET_PUBLIC_PHOTOS: 0, GET_LICENSES: 0}
    assert sample_keys(dataset) == {"tar": KEPT_KEYS, "parquet": KEPT_KEYS,
                                    "metadata": KEPT_KEYS, "manifest": {"2"}}
    printed = capsys.readouterr().out
    assert "Rechecked 5 photos" in printed and "1 kept, 4 removed" in printed

    # opt_out.txt: each removal with its reason, in a comment the opt-out parser skips.
    text = (dataset / "opt_out.txt").read_text()
    assert parse_opt_out(text).photo_ids == set(GONE) and not parse_opt_out(text).user_nsids
    lines = {int(line.split()[0].split(":")[1]): line for line in text.splitlines()}
    for photo_id, reason in GONE.items():
        assert lines[photo_id].startswith(f"photo:{photo_id}  # recheck ")
        assert f": {reason}" in lines[photo_id]
    assert "(cc-by-2 -> cc-by-nd-2)" in lines[RELICENSED_ND]
    assert "(nocv)" in lines[TAGGED_NO_CV]
    assert verify.run([f"--dataset={dataset}"])["ok"]

    # A rerun asks only about the photo left, and changes no byte.
    frozen, calls = file_digests(dataset), dict(flickr_api.calls)
    again = run_recheck(dataset, flickr_api.url)
    assert again["removed"] == [] and again["changed_files"] == [] and again["ok"]
    assert again["photos_checked"] == 1 and again["api_calls"] == {
        GET_INFO: 1, GET_PUBLIC_PHOTOS: 0, GET_LICENSES: 0}
    assert flickr_api.calls[GET_INFO] - calls[GET_INFO] == 1
    assert file_digests(dataset) == frozen


def test_flickr_down_removes_nothing_reports_every_photo_and_exits_1(dataset, flickr_api, capsys):
    before = file_digests(dataset)
    flickr_api.inject(*["503"] * 10)  # 5 photos x 2 tries
    with pytest.raises(SystemExit) as exit_info:
        recheck.main([f"--dataset={dataset}", f"--flickr_api_key={API_KEY}",
                      f"--flickr_api_url={flickr_api.url}", "--flickr_requests_per_second=1000",
                      "--flickr_backoff=0", "--flickr_retries=1"])
    assert exit_info.value.code == 1
    assert file_digests(dataset) == before
    printed = capsys.readouterr().out
    for photo_id, *_ in SNAPSHOT:
        assert f"NOT CHECKED, kept: photo id {photo_id} " in printed
    assert "HTTP 503 after 2 tries" in printed and "FAILED: 100.00% of the photos" in printed


def test_failures_within_the_limit_are_kept_and_reported_and_a_rerun_finishes_the_job(
        dataset, flickr_api):
    flickr_api.inject("503", "503")  # the first photo asked about fails twice: no answer
    report = run_recheck(dataset, flickr_api.url, "--flickr_retries=1",
                         "--max_failed_fraction=0.5")
    assert report["ok"] and len(report["failed"]) == 1
    failed = report["failed"][0]
    assert failed["reason"] == "check_failed" and "HTTP 503" in failed["detail"]
    assert report["photos_checked"] == 5
    decided = {m["photo_id"] for m in report["removed"]} | {failed["photo_id"]}
    assert decided >= set(GONE)
    assert set(failed["keys"]) <= sample_keys(dataset)["tar"]  # never removed without an answer

    again = run_recheck(dataset, flickr_api.url)
    assert again["photos_checked"] == (1 if failed["photo_id"] == UNCHANGED else 2)
    assert sample_keys(dataset)["tar"] == KEPT_KEYS
    assert verify.run([f"--dataset={dataset}"])["ok"]


def test_photos_already_in_opt_out_txt_go_without_asking_flickr(dataset, flickr_api):
    (dataset / "opt_out.txt").write_text(f"photo:{DELETED}\nuser:5@N01\n")  # an interrupted takedown
    report = run_recheck(dataset, flickr_api.url)
    assert report["removed_by_reason"] == {"opt_out": 2, "consent.license_changed": 1,
                                           "consent.no_cv_tag": 1}
    assert report["photos_checked"] == 3 and flickr_api.calls[GET_INFO] == 3
    assert sample_keys(dataset)["tar"] == KEPT_KEYS
    text = (dataset / "opt_out.txt").read_text()
    assert text.startswith(f"photo:{DELETED}\nuser:5@N01\n")  # nothing re-recorded
    assert parse_opt_out(text).photo_ids == {DELETED, TAGGED_NO_CV, RELICENSED_ND}


def test_reasons_ride_in_comments_that_read_back_as_the_same_entries():
    text = "user:1%40x@N01\nphoto:7\nphoto:8\n"
    annotated = with_reasons(text, {"photo:7": "recheck 2026-12-01: consent.not_found (a\nb #c)"})
    assert annotated == ("user:1%40x@N01\nphoto:7  # recheck 2026-12-01: consent.not_found "
                         "(a b #c)\nphoto:8\n")
    assert parse_opt_out(annotated) == parse_opt_out(text)


def test_bad_flags_are_one_line_usage_errors(dataset, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recheck.main([f"--dataset={dataset}"])
    assert exit_info.value.code == 2 and "--flickr_api_key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        recheck.main([f"--dataset={dataset}", "--flickr_api_key=K",
                      "--flickr_api_url=http://10.0.0.1/services/rest/"])
    assert exit_info.value.code == 2 and "IP-literal" in capsys.readouterr().err


def test_decide_removes_only_on_a_definite_answer_and_reports_everything_else():
    row = recheck.SampleRow("7_0", 7, "1@N01", "cc-by-2/train/out-000000.tar", "cc-by-2")

    def decided(photo_id, rows=(), kept=(), rejected=()):
        out = recheck.decide((photo_id, {"row": list(rows), "kept": list(kept),
                                         "rejected": list(rejected)}), "2026-12-01")
        return [(getattr(o, "tag", "removal"), getattr(o, "value", o)) for o in out]

    gone = Rejected("7", "consent", "license_changed", "cc-by-nd-2", 7, "1@N01")
    assert decided(7, [row], rejected=[gone]) == [("removal", recheck.Removal(
        row, "consent.license_changed",
        "recheck 2026-12-01: consent.license_changed (cc-by-2 -> cc-by-nd-2)"))]
    assert decided(7, [row], kept=[4]) == [("kept", 7)]
    failed = Rejected("7", "consent", "check_failed", "HTTP 503 after 6 tries", 7, "1@N01")
    orphan = Rejected("unknown", "consent", "error", "KeyError: x", None, None)
    for args, reason in [((7, [row], [], [failed]), "check_failed"), ((7, [row]), "no_result"),
                         ((None, [], [], [orphan]), "error")]:
        [(tag, value)] = decided(*args)
        assert tag == recheck.FAILED_REASON and value["reason"] == reason
    assert decided(7, [row])[0][1]["keys"] == ["7_0"]
