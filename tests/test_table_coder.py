"""ArrowTableCoder: tables crossing Beam steps are encoded as Arrow IPC and measured without it."""
from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
import pytest

from transforms import table_coder
from transforms.table_coder import ArrowTableCoder


def _table() -> pa.Table:
    return pa.table({"photo_id": pa.array(range(1000), pa.int64()),
                     "title": pa.array([f"title {n} é" for n in range(1000)])})


@pytest.mark.unit
def test_tables_round_trip_whole_sliced_and_empty():
    coder = ArrowTableCoder()
    for table in (_table(), _table().slice(10, 20), _table().slice(0, 0)):
        assert coder.decode(coder.encode(table)).equals(table)


@pytest.mark.unit
def test_the_size_estimate_does_not_encode_the_table(monkeypatch):
    """Beam samples element sizes through the coder impl; a pickle fallback copied whole tables."""
    table = _table()
    monkeypatch.setattr(ArrowTableCoder, "encode", lambda self, value: pytest.fail("encoded"))
    impl = ArrowTableCoder().get_impl()
    assert impl.estimate_size(table) == table.get_total_buffer_size() > 8000


def test_the_scan_steps_type_their_table_outputs_so_that_beam_picks_the_coder(tmp_path):
    from transforms.s2_prefilter import ScanReadAndPrefilter

    (tmp_path / "a.txt").write_text("")
    pipeline = beam.Pipeline()
    parts = pipeline | ScanReadAndPrefilter([str(tmp_path / "a.txt")],
                                           staging_dir=str(tmp_path / "staging"))
    table_coder.register()
    for pcoll in (parts.main, parts.read_rejects, parts.duplicate_rejects):
        assert pcoll.element_type is pa.Table
        assert isinstance(beam.coders.registry.get_coder(pcoll.element_type), ArrowTableCoder)
