"""Server records: each record converted at most once per direction, shared by the round's wrappers."""

from __future__ import annotations

import gc

import numpy as np

from server import records
from server.records import numpy_to_record, record_to_numpy


def test_a_record_made_from_arrays_reads_back_as_those_arrays():
    arrays = {"items": np.arange(6, dtype=np.float32).reshape(3, 2)}
    record = numpy_to_record(arrays)
    assert record_to_numpy(record) is arrays


def test_a_received_record_is_converted_once(monkeypatch):
    record = numpy_to_record({"w": np.ones(4, dtype=np.float32)})
    records._ARRAYS.clear()  # as if it had arrived from a device: nothing remembered
    calls = []
    original = type(record["w"]).numpy
    monkeypatch.setattr(type(record["w"]), "numpy", lambda self: calls.append(1) or original(self))
    first = record_to_numpy(record)
    assert record_to_numpy(record) is first and len(calls) == 1
    np.testing.assert_array_equal(first["w"], np.ones(4))


def test_the_remembered_arrays_leave_with_their_record():
    record = numpy_to_record({"w": np.zeros(2, dtype=np.float32)})
    key = id(record)
    assert key in records._ARRAYS
    del record
    gc.collect()
    assert key not in records._ARRAYS
