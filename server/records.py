"""Flower records and numpy arrays on the server, and the one reply a wrapper strategy hands the strategy it
wraps once it has reduced a cohort to one update.

Each record is converted at most once per direction: a record made from numpy arrays, or already read as
numpy, remembers those arrays for as long as it lives, so the wrappers of one round (validation, clipping, DP,
robust aggregation, the server step) and the ServerApp share one conversion instead of repeating it. The
server never mutates a record after making or reading it; the arrays handed out are the remembered ones, so
callers treat them as read-only."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

WEIGHT_KEY = "num-examples"  # the example weight every train reply carries in its metrics


# id(record) -> (a weak reference to the record, its arrays); an entry leaves with its record
_ARRAYS: dict[int, tuple[weakref.ref[ArrayRecord], dict[str, np.ndarray]]] = {}


def _remember(record: ArrayRecord, arrays: dict[str, np.ndarray]) -> None:
    _ARRAYS[id(record)] = (weakref.ref(record), arrays)
    weakref.finalize(record, _ARRAYS.pop, id(record), None)


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The record's arrays as numpy: converted on the first call, the same dict on every later one."""
    known = _ARRAYS.get(id(record))
    if known is not None and known[0]() is record:
        return known[1]
    arrays = {k: v.numpy() for k, v in record.items()}
    _remember(record, arrays)
    return arrays


def numpy_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """A record of ``arrays`` (converted once); :func:`record_to_numpy` of it returns ``arrays`` itself."""
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    _remember(record, arrays)
    return record


def one_reply(arrays: dict[str, np.ndarray], metrics: Mapping[str, Any], like: Message) -> Message:
    """A train reply holding ``arrays`` and ``metrics`` with example weight 1 (metadata from the message
    ``like``): the cohort's noisy or robust mean, or the SecAgg+ aggregate, handed to the wrapped Flower
    strategy, whose mean of this one reply is these arrays exactly (FedAvg takes it, FedAdam steps to it)."""
    content = RecordDict(
        {"arrays": numpy_to_record(arrays), "metrics": MetricRecord({**metrics, WEIGHT_KEY: 1})}
    )
    return Message(content, metadata=like.metadata)


def cohort_metrics(replies: list[Message], uniform: bool = False) -> MetricRecord:
    """The replies' training metrics as FedAvg aggregates them (Flower's ``aggregate_metricrecords``):
    example-weighted, or ``uniform``ly (central DP gives every device the same weight)."""
    records = [
        RecordDict({"metrics": MetricRecord({**m.content["metrics"], WEIGHT_KEY: 1})})
        if uniform
        else m.content
        for m in replies
    ]
    return aggregate_metricrecords(records, WEIGHT_KEY)
