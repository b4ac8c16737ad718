"""Flower records and numpy arrays on the server, and the one reply a wrapper strategy hands the strategy it
wraps once it has reduced a cohort to one update."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

WEIGHT_KEY = "num-examples"  # the example weight every train reply carries in its metrics


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def one_reply(arrays: dict[str, np.ndarray], metrics: dict[str, Any], like: Message) -> Message:
    """A train reply holding ``arrays`` and ``metrics`` with example weight 1 (metadata from the message
    ``like``): the cohort's noisy or robust mean, or the SecAgg+ aggregate, handed to the wrapped Flower
    strategy, whose mean of this one reply is these arrays exactly (FedAvg takes it, FedAdam steps to it)."""
    content = RecordDict(
        {"arrays": numpy_to_record(arrays), "metrics": MetricRecord({**metrics, WEIGHT_KEY: 1})}
    )
    return Message(content, metadata=like.metadata)


def mean_metrics(replies: list[Message], uniform: bool = False) -> dict[str, float]:
    """The replies' training metrics (every numeric one but the weight), example-weighted as FedAvg weights
    them, or ``uniform``ly (central DP gives every device the same weight)."""
    records = [m.content["metrics"] for m in replies]
    weights = np.ones(len(records)) if uniform else np.array([float(r[WEIGHT_KEY]) for r in records])
    keys = sorted({k for r in records for k in r if k != WEIGHT_KEY})
    out = {}
    for key in keys:
        values = [
            (w, r[key]) for w, r in zip(weights, records, strict=True) if isinstance(r.get(key), int | float)
        ]
        if values and sum(w for w, _ in values) > 0:
            out[key] = float(sum(w * float(v) for w, v in values) / sum(w for w, _ in values))
    return out
