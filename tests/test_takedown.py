"""takedown: removes users / photos from a dataset the project's writer built, and only them."""
from __future__ import annotations

import json

import pytest

from beam_jobs import takedown, verify
from tests.jobs_dataset import OTHER, THIRD, TWO_PERSON_PHOTO, UNKNOWN, VICTIM, file_digests, keys_of
from dataset import layout, shards, search
from dataset import takedown as takedown_core
from transforms.opt_out import OptOut, read_opt_out
from transforms.records import sample_key


def members_by_key(dataset) -> dict[str, dict[str, bytes]]:
    """Raw tar members of every sample, by key."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    return {m["__key__"]: m for e in manifest["shards"]
            for m in shards.read_tar_shard(str(dataset / e["path"]))}


def verify_report(dataset) -> dict:
    return verify.run([f"--dataset={dataset}"])


def test_takedown_of_a_user_in_several_shards_and_licences(dataset, capsys):
    before_members = members_by_key(dataset)
    before_files = file_digests(dataset)
    manifest_before = json.loads((dataset / "manifest.json").read_text())
    victim_shards = {e["path"] for e in manifest_before["shards"]
                     if any(m["user_nsid"] == VICTIM
                            for m in shards.read_parquet_rows(str(dataset / e["parquet"])))}
    assert len(victim_shards) >= 3  # the layout spreads the user over shards and licences

    report = takedown.run([f"--dataset={dataset}", f"--user_nsid={VICTIM}"])

    assert [m["key"] for m in report["removed"]] == keys_of(VICTIM)
    assert {s["path"] for s in report["shards"]} == victim_shards
    printed = capsys.readouterr().out
    assert f"Removed {len(keys_of(VICTIM))} samples from {len(victim_shards)} shards" in printed
    assert all(f"removed {key} (user_nsid {VICTIM}" in printed for key in keys_of(VICTIM))

    # Gone from every output; everything else byte-identical.
    after_members = members_by_key(dataset)
    assert set(after_members) == set(before_members) - set(keys_of(VICTIM))
    assert all(after_members[k] == before_members[k] for k in after_members)
    after_files = file_digests(dataset)
    for path, digest in before_files.items():
        untouched = path.endswith((".tar", ".parquet")) and path.rsplit(".", 1)[0] + ".tar" not in victim_shards
        if untouched:
            assert after_files[path] == digest, path
    metadata = json.loads((dataset / "metadata.json").read_text())
    assert VICTIM not in {entry["user_nsid"] for entry in metadata.values()}
    assert search.search(str(dataset), OptOut(frozenset([VICTIM]))) == []
    assert search.search(str(dataset / "metadata.json"), OptOut(frozenset([VICTIM]))) == []

    # Manifest, stats and opt-out agree with the shards; an emptied shard stays, valid, with 0.
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert [e["path"] for e in manifest["shards"]] == [e["path"] for e in manifest_before["shards"]]
    assert any(e["samples"] == 0 for e in manifest["shards"])
    stats = json.loads((dataset / "stats.json").read_text())
    assert stats["totals"]["samples"] == len(before_members) - len(keys_of(VICTIM))
    assert stats["funnel"]["takedown.samples_removed"] == len(keys_of(VICTIM))
    assert read_opt_out([str(dataset / "opt_out.txt")]).excludes(VICTIM, None) == "user_opt_out"
    assert verify_report(dataset)["ok"]
    assert not list(dataset.glob("**/*" + layout.STAGED_SUFFIX))

    # A second run finds nothing and changes no byte.
    frozen = file_digests(dataset)
    again = takedown.run([f"--dataset={dataset}", f"--user_nsid={VICTIM}"])
    assert again["removed"] == [] and again["changed_files"] == []
    assert "(already in opt_out.txt)" in capsys.readouterr().out
    assert file_digests(dataset) == frozen


def test_unknown_user_changes_nothing_unless_recorded(dataset, capsys):
    before = file_digests(dataset)
    report = takedown.run([f"--dataset={dataset}", f"--user_nsid={UNKNOWN}"])
    printed = capsys.readouterr().out
    assert report["removed"] == [] and report["unmatched_user_nsids"] == [UNKNOWN]
    assert "No sample to remove" in printed and f"no sample has user_nsid {UNKNOWN}" in printed
    assert file_digests(dataset) == before

    takedown.run([f"--dataset={dataset}", f"--user_nsid={UNKNOWN}", "--record_unmatched"])
    after = file_digests(dataset)
    assert set(after) - set(before) == {"opt_out.txt"}
    assert all(after[path] == digest for path, digest in before.items())
    assert (dataset / "opt_out.txt").read_text() == f"user:{UNKNOWN}\n"


def test_takedown_by_photo_id_and_from_file(dataset, tmp_path):
    requests = tmp_path / "requests.txt"
    requests.write_text(f"# takedown requests, May\nuser:{THIRD}\n")
    (dataset / "opt_out.txt").write_text("photo:777\n")  # an earlier entry stays
    report = takedown.run([f"--dataset={dataset}", f"--photo_id={TWO_PERSON_PHOTO}",
                           f"--from_file={requests}"])
    expected = sorted([sample_key(TWO_PERSON_PHOTO, 0), sample_key(TWO_PERSON_PHOTO, 1)] + keys_of(THIRD))
    assert [m["key"] for m in report["removed"]] == expected
    metadata = json.loads((dataset / "metadata.json").read_text())
    assert not set(expected) & metadata.keys()
    assert set(keys_of(OTHER)) - set(expected) <= metadata.keys()  # OTHER's other photos stay
    assert (dataset / "opt_out.txt").read_text() == (
        f"photo:777\nuser:{THIRD}\nphoto:{TWO_PERSON_PHOTO}\n")
    assert verify_report(dataset)["ok"]


def test_a_takedown_killed_after_rewriting_shards_finishes_on_rerun(dataset):
    # Simulate a crash: one shard rewritten (tar + staged Parquet), no run-level file updated.
    manifest = json.loads((dataset / "manifest.json").read_text())
    request = OptOut(frozenset([VICTIM]))
    entry = next(e for e in manifest["shards"]
                 if takedown_core.find_shard_matches(str(dataset), e, request))
    takedown_core.rewrite_shard(str(dataset), entry, takedown_core.find_shard_matches(str(dataset), entry, request))
    assert not verify_report(dataset)["ok"]  # the manifest's sha256 no longer matches

    report = takedown.run([f"--dataset={dataset}", f"--user_nsid={VICTIM}"])
    assert [m["key"] for m in report["removed"]] == keys_of(VICTIM)
    assert verify_report(dataset)["ok"]


def test_a_damaged_parquet_stops_the_takedown_and_changes_no_run_file(dataset):
    entry = shards_of(dataset)[-1]
    (dataset / entry["parquet"]).write_bytes(b"PAR1 not really")
    before = file_digests(dataset)
    with pytest.raises(Exception, match=f"{entry['parquet']}: cannot search it"):
        takedown.run([f"--dataset={dataset}", f"--user_nsid={VICTIM}"])
    after = file_digests(dataset)
    for name in ("manifest.json", "metadata.json", "stats.json"):
        assert after[name] == before[name]
    assert "opt_out.txt" not in after


def shards_of(dataset) -> list[dict]:
    return json.loads((dataset / "manifest.json").read_text())["shards"]


def test_configuration_errors_raise_before_running(dataset, tmp_path):
    with pytest.raises(ValueError, match="nothing to take down"):
        takedown.run([f"--dataset={dataset}"])
    with pytest.raises(FileNotFoundError, match="not a dataset"):
        takedown.run([f"--dataset={tmp_path / 'nowhere'}", f"--user_nsid={VICTIM}"])
    bad = tmp_path / "bad.txt"
    bad.write_text("not an id\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        takedown.run([f"--dataset={dataset}", f"--from_file={bad}"])


def test_filter_members_passes_other_bytes_through():
    members = [{"__key__": "1_0", "image.png": b"a"}, {"__key__": "2_0", "image.png": b"b"},
               {"__key__": "3_0", "image.png": b"c"}]
    result = takedown_core.filter_members(members, {"2_0", "9_9"})
    assert result.kept == [members[0], members[2]] and result.removed == ["2_0"]
    assert result.kept[0]["image.png"] is members[0]["image.png"]


def test_new_opt_out_lines_skip_recorded_entries():
    existing = OptOut(frozenset(["a@N01"]), frozenset([5]))
    request = OptOut(frozenset(["a@N01", "b@N02"]), frozenset([5, 6]))
    assert takedown_core.new_opt_out_lines(existing, request) == "user:b@N02\nphoto:6\n"
    assert takedown_core.new_opt_out_lines(request, request) == ""
