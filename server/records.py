"""Flower records and numpy arrays on the server, and the one reply a wrapper strategy hands the strategy it
wraps once it has reduced a cohort to one update."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

WEIGHT_KEY = "num-examples"  # the example weight every train reply carries in its metrics


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


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
