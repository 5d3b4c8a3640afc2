"""Spilled shuffles (transforms/spill.py): staged slices read back exactly, staging cleaned up,
locally and on gs:// (through the counts-only scan on the GCS emulator)."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from beam_jobs import scan
from tests.yfcc_lines import random_records, write_lines
from transforms.spill import new_staging_dir, read_spilled, remove_staging, spill_by_bucket
from transforms.yfcc_format import format_line


def _table(count: int) -> pa.Table:
    return pa.table({"photo_id": np.arange(count, dtype=np.int64) * 7,
                     "line": np.arange(count, dtype=np.int64) + 1})


def test_each_bucket_reads_back_its_rows_in_their_order(tmp_path):
    staging = new_staging_dir(str(tmp_path / "out"), "test")
    table = _table(1000)
    buckets = table.column("photo_id").to_numpy() % 16
    first = dict(spill_by_bucket(table, buckets, staging))
    second = dict(spill_by_bucket(_table(10), np.full(10, 3), staging))
    assert sorted(first) == list(range(16)) and list(second) == [3]
    for bucket, ref in first.items():
        want = table.filter(pa.array(buckets == bucket))
        assert read_spilled([ref]).equals(want)
    both = read_spilled([first[3], second[3]])
    assert both.num_rows == len(np.flatnonzero(buckets == 3)) + 10
    assert both.slice(both.num_rows - 10).equals(_table(10))
    assert list(spill_by_bucket(table.slice(0, 0), np.zeros(0, np.int64), staging)) == []


def test_remove_staging_deletes_only_the_staged_files(tmp_path):
    output = tmp_path / "out"
    staging = new_staging_dir(str(output), "test")
    list(spill_by_bucket(_table(50), np.arange(50) % 4, staging))
    list(spill_by_bucket(_table(50), np.arange(50) % 4, staging))
    assert remove_staging(staging) == 2
    assert not output.exists() or not any(output.rglob("*"))  # folders gone when empty
    kept = new_staging_dir(str(output), "test")
    list(spill_by_bucket(_table(5), np.zeros(5, np.int64), kept))
    (tmp_path / "out" / "_staging" / "notes.txt").write_text("not ours")
    assert remove_staging(kept) == 1
    assert [path.name for path in output.rglob("*") if path.is_file()] == ["notes.txt"]


@pytest.mark.pipeline
def test_counts_only_scan_on_gcs_stages_there_and_leaves_only_the_counts(tmp_path, gcs_emulator):
    lines = [format_line(record, 23) for record in random_records(300, seed=3)]
    write_lines(tmp_path / "y.txt", lines + lines[:20])  # 20 duplicate photo ids
    local = scan.run([f"--yfcc={tmp_path}/y.txt", f"--output={tmp_path}/local", "--counts_only"])
    assert local["rejects_per_reason"]["prefilter.duplicate_photo_id"] >= 1
    done = gcs_emulator.run_job("beam_jobs.scan", f"--yfcc={tmp_path}/y.txt",
                                f"--output={gcs_emulator.url('scan')}", "--counts_only")
    assert done.returncode == 0, done.stderr[-2000:]
    assert gcs_emulator.names("scan/") == {"scan/scan_counts.json"}
    assert json.loads(gcs_emulator.read("scan/scan_counts.json")) == local


@pytest.mark.pipeline
def test_spilled_group_by_key_and_reshuffle_give_what_beam_gives(tmp_path):
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from transforms.spill import SpilledGroupByKey, SpilledReshuffle

    staging = str(tmp_path / "staging")
    pairs = [(index % 5, {"value": index, "blob": bytes(index)}) for index in range(200)]
    want = [(key, sorted(value["value"] for k, value in pairs if k == key)) for key in range(5)]
    with beam.Pipeline() as pipeline:
        elements = pipeline | beam.Create(pairs)
        grouped = (elements | "Spilled" >> SpilledGroupByKey(staging)
                   | "Sorted" >> beam.MapTuple(lambda key, values: (
                       key, sorted(value["value"] for value in values))))
        assert_that(grouped, equal_to(want), label="grouped")
        shuffled = (elements | "Reshuffle" >> SpilledReshuffle(staging)
                    | "Values" >> beam.MapTuple(lambda key, value: value["value"]))
        assert_that(shuffled, equal_to(list(range(200))), label="reshuffled")
    assert any(name.endswith(".pickles") for name in os.listdir(staging))
    assert remove_staging(staging) >= 2 and not os.path.exists(staging)


def _rejects(count: int, stage: str, start: int = 0) -> list:
    from transforms.records import Rejected

    return [Rejected(str(start + index), stage, "reason", "x" * (index % 7), start + index, None)
            for index in range(count)]


@pytest.mark.pipeline
def test_spilled_flatten_sends_batch_references_and_loads_back_every_element(tmp_path):
    """5,000 rejects from three inputs, one of them a spilled flatten itself (nesting), cross the
    outer Flatten as a few batch references; loaded, they are exactly the inputs (a multiset)."""
    import math

    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from transforms.spill import LoadSpilled, SpilledBatch, SpilledFlatten

    staging, batch = str(tmp_path / "staging"), 256
    read, duplicates, fetch = _rejects(2500, "read"), _rejects(1000, "prefilter"), _rejects(1500, "fetch")
    duplicates += duplicates[:300]  # equal elements must all come back
    everything = read + duplicates + fetch
    refs_at_most = sum(math.ceil(len(part) / batch) + 1 for part in (read, duplicates, fetch))

    def summary(elements: list) -> tuple:
        assert all(isinstance(element, SpilledBatch) for element in elements)
        assert all(os.path.exists(element.ref.path) for element in elements)  # staged, still there
        return len(elements) <= refs_at_most, sum(element.count for element in elements)

    with beam.Pipeline() as pipeline:
        def create(label, elements):
            return pipeline | label >> beam.Create(elements, reshuffle=False)

        inner = ((create("Read", read), create("Duplicates", duplicates))
                 | "Inner" >> SpilledFlatten(staging, batch_size=batch))
        outer = (inner, create("Fetch", fetch)) | "Outer" >> SpilledFlatten(staging, batch_size=batch)
        references = outer | "AllRefs" >> beam.combiners.ToList() | beam.Map(summary)
        assert_that(references, equal_to([(True, len(everything))]), label="references")
        assert_that(outer | "Load" >> LoadSpilled(), equal_to(everything), label="loaded")
    assert any(name.endswith(".pickles") for name in os.listdir(staging))
    assert remove_staging(staging) >= 1 and not os.path.exists(staging)


@pytest.mark.pipeline
def test_flatten_spilling_to_nowhere_is_beams_flatten():
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from transforms.spill import LoadSpilled, flatten_spilling_to

    assert type(flatten_spilling_to(None)) is beam.Flatten
    assert type(flatten_spilling_to("")) is beam.Flatten
    first, second = _rejects(30, "read"), _rejects(20, "fetch", start=100)
    with beam.Pipeline() as pipeline:
        merged = ((pipeline | "First" >> beam.Create(first), pipeline | "Second" >> beam.Create(second))
                  | flatten_spilling_to(None))
        assert_that(merged, equal_to(first + second), label="plain")
        assert_that(merged | LoadSpilled(), equal_to(first + second), label="load_is_identity")


def test_spilled_flatten_needs_the_global_window(tmp_path):
    import apache_beam as beam
    from apache_beam.transforms import window

    from transforms.spill import SpilledFlatten

    pipeline = beam.Pipeline()
    windowed = (pipeline | beam.Create([1, 2]) | beam.WindowInto(window.FixedWindows(10)))
    with pytest.raises(ValueError, match="global window"):
        _ = (windowed,) | SpilledFlatten(str(tmp_path))


@pytest.mark.pipeline
def test_spilled_reshuffle_sends_one_reference_per_batch_of_elements(tmp_path):
    """What crosses the reshuffle's GroupByKey is a key and a batch reference per up to
    `batch_size` elements (was one per element: ~150 B each, 10 GB at 68M candidates)."""
    import math

    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from tests.pipeline_graph import outputs_of
    from transforms.spill import SpilledBatch, SpilledReshuffle

    staging, batch, count = str(tmp_path / "staging"), 64, 3000
    with beam.Pipeline() as pipeline:
        elements = pipeline | beam.Create(list(range(count)), reshuffle=False)
        reshuffle = SpilledReshuffle(staging, batch_size=batch)
        shuffled = elements | "Reshuffle" >> reshuffle
        assert_that(shuffled, equal_to(list(range(count))), label="every element once")
        crossing = outputs_of(pipeline, ["Reshuffle/GroupByKey"])["Reshuffle/GroupByKey"]
        summary = (crossing | beam.FlatMapTuple(lambda key, refs: refs)
                   | beam.combiners.ToList()
                   | beam.Map(lambda refs: (all(isinstance(ref, SpilledBatch) for ref in refs),
                                            len(refs) <= math.ceil(count / batch) + 1,
                                            sum(ref.count for ref in refs))))
        assert_that(summary, equal_to([(True, True, count)]), label="references")
    assert remove_staging(staging) >= 1
