"""Summary statistics of an :class:`InteractionLog` (what ``tmepsr data stats`` prints)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np

from .log import InteractionLog
from .split import LeaveOneOutSplit


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(int(ts), tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def log_stats(log: InteractionLog) -> dict[str, Any]:
    """Users, items, events, time span, sequence-length distribution and the explanation vocabulary."""
    lengths = log.sequence_lengths()
    split = LeaveOneOutSplit(log)
    stats: dict[str, Any] = {
        "name": log.name,
        "users": log.num_users,
        "items": log.num_items,
        "events": log.num_events,
        "time": log.time_unit,
        "time_span": None if log.time_unit == "order" else [_iso(log.time.min()), _iso(log.time.max())],
        "sequence_length": {
            "min": int(lengths.min()),
            "mean": round(float(lengths.mean()), 2),
            "median": float(np.median(lengths)),
            "p90": float(np.percentile(lengths, 90)),
            "max": int(lengths.max()),
        },
        "eval_users": len(split.eval_users),
        "explanation_vocab": len(log.vocab),
        "explanation_coverage": round(float((log.explanations.lengths() > 0).mean()), 4),
        "explanation_rule": log.vocab.rule,
    }
    if log.time_unit != "order":
        val, test = split.target_events("val"), split.target_events("test")
        stats["eval_users_last_two_tied"] = int((log.time[val] == log.time[test]).sum())
    return stats
