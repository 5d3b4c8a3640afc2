"""search_user: FDH's output line for line, from metadata.json and from the Parquet shards."""
from __future__ import annotations

import contextlib
import dataclasses
import io

import json

import pytest

from beam_jobs.search_user import EXIT_ERROR, EXIT_FOUND, EXIT_NO_MATCH, run
from tests.jobs_dataset import OTHER, TWO_PERSON_PHOTO, UNKNOWN, VICTIM, build_dataset, keys_of
from dataset.search import metadata_matches, parquet_files, parquet_matches
from transforms.opt_out import OptOut
from transforms.records import sample_key


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The test dataset plus a rejects Parquet file, as the rebuild writes one (another schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transforms.rejects import REJECTS_SCHEMA

    out = build_dataset(tmp_path_factory.mktemp("search"))
    (out / "rejects").mkdir()
    rejects = [{"record_id": "5", "stage": "prefilter", "reason": "user_opt_out", "detail": "",
                "photo_id": 5, "user_nsid": VICTIM}]
    pq.write_table(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA),
                   out / "rejects" / "rejects-00000-of-00001.parquet")
    return out


def fdh_lines(metadata_path, user_nsid) -> str:
    """What FDH's search_user.py prints: json.load, scan in file order, one line per match."""
    with open(metadata_path) as handle:
        data = json.load(handle)
    return "".join(f"Image {key} includes your username\n"
                   for key, item in data.items() if item["user_nsid"] == user_nsid)


@dataclasses.dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str


def search(source, *flags) -> Result:
    """Run search_user as `--dataset=SOURCE FLAGS...`; its exit code and printed output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run([f"--dataset={source}", *[str(f) for f in flags]])
        except SystemExit as exit_:  # argparse: bad usage
            code = exit_.code
    return Result(code, out.getvalue(), err.getvalue())


def test_metadata_json_output_is_fdh_output(dataset):
    result = search(dataset / "metadata.json", f"--user_nsid={VICTIM}")
    assert result.exit_code == EXIT_FOUND
    assert result.stdout == fdh_lines(dataset / "metadata.json", VICTIM)
    assert result.stdout.splitlines() == [f"Image {k} includes your username" for k in keys_of(VICTIM)]
    assert result.stderr == ""


@pytest.mark.parametrize("source", ["{d}", "{d}/*/*/out-*.parquet", "{d}/cc-by*/**/*.parquet"])
def test_parquet_sources_print_the_same_lines(dataset, source):
    result = search(source.format(d=dataset), f"--user_nsid={OTHER}")
    assert result.exit_code == EXIT_FOUND, result.output
    assert result.stdout == fdh_lines(dataset / "metadata.json", OTHER)


def test_one_parquet_file_holds_only_its_own_samples(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["license"] == "cc-by-sa-2")
    result = search(dataset / entry["parquet"], f"--user_nsid={VICTIM}")
    assert result.stdout == "Image 1004000 includes your username\n"


def test_photo_id_search_finds_every_person_of_the_photo(dataset):
    for source in (dataset / "metadata.json", dataset):
        result = search(source, f"--photo_id={TWO_PERSON_PHOTO}")
        assert result.exit_code == EXIT_FOUND
        assert result.stdout.splitlines() == [
            f"Image {sample_key(TWO_PERSON_PHOTO, i)} includes your photo {TWO_PERSON_PHOTO}" for i in (0, 1)]


def test_no_match_has_its_own_exit_code_and_a_message(dataset):
    for source in (dataset / "metadata.json", dataset):
        result = search(source, f"--user_nsid={UNKNOWN}", "--photo_id=424242")
        assert result.exit_code == EXIT_NO_MATCH
        assert result.stdout == ""
        assert f"No image in {source} matches user_nsid {UNKNOWN}, photo id 424242." in result.stderr


def run_without_dataset() -> Result:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        run([f"--user_nsid={VICTIM}"])
    assert "--dataset" in err.getvalue()
    return Result(exit_.value.code, "", err.getvalue())


def test_bad_input_and_bad_usage_exit_2(dataset, tmp_path):
    assert search(dataset).exit_code == EXIT_ERROR  # neither --user_nsid nor --photo_id
    assert run_without_dataset().exit_code == EXIT_ERROR  # --dataset is required
    missing = search(tmp_path / "nothing.json", f"--user_nsid={VICTIM}")
    assert missing.exit_code == EXIT_ERROR and "cannot search" in missing.stderr
    empty_dir = search(tmp_path, f"--user_nsid={VICTIM}")
    assert empty_dir.exit_code == EXIT_ERROR and "no Parquet shard files" in empty_dir.stderr


def test_dataset_dir_never_reads_the_rejects_parquet(dataset):
    files = parquet_files(str(dataset))
    assert files and all("/out-" in f and "rejects" not in f for f in files)
    both = OptOut(frozenset([VICTIM]), frozenset([TWO_PERSON_PHOTO]))
    with open(dataset / "metadata.json") as handle:
        from_json = metadata_matches(json.load(handle), both)
    assert parquet_matches(files, both) == from_json
