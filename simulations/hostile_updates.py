"""The hostile-update catalogue (THREAT_MODEL.md): malformed and poisoned replies built from one good update, and
one training round of replies through the product's strategy. The poisoning benchmark and the robustness tests
use it."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from flwr.app import DEFAULT_TTL, Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from shared_model.config import FederatedConfig
from shared_model.protocol.updates import (
    ITEM_TABLES,
    ROW_IDS,
    STATE_COUNTS,
    STATE_SHARES,
    STATES,
    compress,
    encode_sparse,
    rows_of,
    sample_rows,
    sampled_names,
)
from shared_model.softmax_change import state_shape


def hostile_updates(
    sent: dict[str, np.ndarray], good: dict[str, np.ndarray], norm_bound: float, rng: np.random.Generator
) -> dict[str, tuple[dict[str, np.ndarray] | None, Any]]:
    """Malformed and hostile replies built from one good dense update: name -> (arrays, example weight); arrays
    ``None`` = a reply without arrays, example weight ``None`` = no ``num-examples`` metric. ``sent`` must hold
    the item tables and at least one other array."""
    emb, bias = ITEM_TABLES
    other = next(k for k in sent if k not in ITEM_TABLES)

    def edit(key: str, value: np.ndarray, base: dict | None = None) -> dict:
        return {**(good if base is None else base), key: value}

    def poked(key: str, value: float) -> dict:
        arr = good[key].copy()
        arr.flat[0] = value
        return edit(key, arr)

    delta = {k: good[k].astype(np.float64) - sent[k] for k in sent}
    norm = math.sqrt(sum(float(np.sum(d**2)) for d in delta.values())) or 1.0
    over = {k: (sent[k] + d * 1.01 * norm_bound / norm).astype(sent[k].dtype) for k, d in delta.items()}
    rows = np.arange(0, len(sent[emb]), 3, dtype=ROW_IDS)
    sparse = encode_sparse(good, rows)
    packed = compress(good, sent, rng, "int8")
    packed4 = compress(good, sent, rng, "int4")
    minus8 = packed4[f"{emb}@q4"].copy()
    minus8[0] = 0x88  # two levels of -8 (int4 levels are -7..7)
    scale_key = f"{emb}@scale"
    n = 7  # a plausible example weight
    sampled = {}
    if names := sampled_names(sent):  # another matrix sent as a sample of its rows
        part = sample_rows(sparse, sent, 0.5, rng)
        at, values = f"{names[0]}@rows", part[f"{names[0]}@values"]
        sampled = {
            "sampled rows: row out of range": (edit(at, part[at] + len(rows_of(sent[names[0]])), part), n),
            "sampled rows: values shape": (edit(f"{names[0]}@values", values[:-1], part), n),
        }
    return {
        "wrong shape (1-D)": (edit(bias, np.zeros(len(sent[bias]) + 1, np.float32)), n),
        "wrong shape (transposed)": (edit(emb, np.ascontiguousarray(good[emb].T)), n),
        "NaN": (poked(emb, np.nan), n),
        "+Inf": (poked(bias, np.inf), n),
        "-Inf": (poked(other, -np.inf), n),
        "huge norm (1e3 per value)": (edit(emb, good[emb] + np.float32(1e3)), n),
        "just over the norm bound": (over, n),
        "missing key": ({k: v for k, v in good.items() if k != other}, n),
        "missing item table": ({k: v for k, v in good.items() if k != bias}, n),
        "extra key": (edit("backdoor.weight", np.zeros(4, np.float32)), n),
        "float64 arrays": ({k: v.astype(np.float64) for k, v in good.items()}, n),
        "float16 array": (edit(emb, good[emb].astype(np.float16)), n),
        "int32 array": (edit(bias, good[bias].astype(np.int32)), n),
        "no arrays": (None, n),
        "example weight 0": (good, 0),
        "example weight < 0": (good, -5),
        "example weight NaN": (good, float("nan")),
        "example weight Inf": (good, float("inf")),
        "example weight missing": (good, None),
        "example weight above one round's training": (good, 10**6),
        "sparse: row out of range": (edit(f"{emb}@rows", rows + len(sent[emb]), sparse), n),
        "sparse: negative row": (edit(f"{emb}@rows", rows - 1, sparse), n),
        "sparse: repeated row": (edit(f"{emb}@rows", np.repeat(rows[:1], len(rows)), sparse), n),
        "sparse: rows differ between tables": (edit(f"{bias}@rows", rows[::-1].copy(), sparse), n),
        "sparse: float row ids": (edit(f"{emb}@rows", rows.astype(np.float64), sparse), n),
        "sparse: values shape": (edit(f"{emb}@values", sparse[f"{emb}@values"][:-1], sparse), n),
        "sparse: NaN values": (
            edit(f"{bias}@values", np.full_like(sparse[f"{bias}@values"], np.nan), sparse),
            n,
        ),
        "int8: negative scale": (edit(scale_key, -np.abs(packed[scale_key]) - 1, packed), n),
        "int8: NaN scale": (edit(scale_key, np.full_like(packed[scale_key], np.nan), packed), n),
        "int8: huge scale": (edit(scale_key, np.full_like(packed[scale_key], 1e6), packed), n),
        "int8: scale shape": (edit(scale_key, packed[scale_key][:-1], packed), n),
        "int8: int16 values": (edit(f"{emb}@q8", packed[f"{emb}@q8"].astype(np.int16), packed), n),
        "int4: level -8": (edit(f"{emb}@q4", minus8, packed4), n),
        "int4: values shape": (edit(f"{emb}@q4", packed4[f"{emb}@q4"][:-1], packed4), n),
        "states: output states to a server that takes none": (
            sparse
            | {
                STATES: np.zeros((3, *state_shape(sent)), np.float32),
                STATE_COUNTS: np.array([3], np.int32),
                STATE_SHARES: np.ones(1, np.float32),
            },
            n,
        ),
        **sampled,
    }


def train_reply(arrays: dict[str, np.ndarray] | None, examples: Any = 5, node: int = 1) -> Message:
    """A train reply as a SuperNode would deliver it: ``arrays`` (if any) and metrics with ``examples``."""
    metrics = {"train-loss": 1.0} | ({} if examples is None else {"num-examples": examples})
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    meta = Metadata(
        run_id=1,
        message_id="",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type="train",
    )
    return Message(content, metadata=meta)


def aggregate_round(
    cfg: FederatedConfig,
    sent: dict[str, np.ndarray],
    replies: list[tuple[dict | None, Any]],
    num_nodes: int | None = None,
) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
    """One training round's aggregation of ``replies`` ((arrays, example weight) pairs, see :func:`train_reply`) by
    the strategy ``cfg`` asks for in a federation of ``num_nodes`` devices (default: the replies'): the new
    arrays (None when it did not aggregate) and its round statistics."""
    from server.strategies import make_strategy

    nodes = num_nodes or len(replies)
    return strategy_round(make_strategy(cfg, nodes, nodes), 1, sent, replies)


def strategy_round(
    strategy: Any,
    server_round: int,
    sent: dict[str, np.ndarray],
    replies: list[tuple[dict | None, Any]],
    nodes: list[int] | None = None,
) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
    """One round of ``strategy`` on ``replies`` to ``sent`` from ``nodes`` (the replying devices' ids; default
    1, 2, ...): the new arrays (None when it did not aggregate) and its round statistics. The strategy keeps its
    state (FedAdam's moments, the row quorum's supporters) for the next round."""
    from server.records import record_to_numpy

    strategy.begin_round(sent, len(replies))  # what configure_train records
    nodes = nodes or list(range(1, len(replies) + 1))
    messages = [train_reply(a, n, node) for node, (a, n) in zip(nodes, replies, strict=True)]
    arrays, _ = strategy.aggregate_train(server_round, messages)
    return (None if arrays is None else record_to_numpy(arrays)), strategy.last_round


def hostile_round(
    cfg: FederatedConfig, sent: dict[str, np.ndarray], goods: list[tuple[dict, float]], seed: int = 0
) -> dict[str, Any]:
    """One round of ``goods`` plus every :func:`hostile_updates` reply (built from the first good one) through
    the strategy ``cfg`` asks for, and the same round with the good replies alone."""
    hostile = hostile_updates(sent, goods[0][0], cfg.norm_bound, np.random.default_rng(seed))
    federation = len(goods) + len(hostile)  # the same strategy (and row quorum) for both rounds
    mixed, stats = aggregate_round(cfg, sent, goods + list(hostile.values()), federation)
    alone, _ = aggregate_round(cfg, sent, goods, federation)
    reasons = stats["rejections"]
    same = mixed is not None and alone is not None and all(np.array_equal(mixed[k], alone[k]) for k in sent)
    return {
        "aggregation": cfg.aggregation,
        "good": len(goods),
        "hostile": len(hostile),
        "rejected": stats["rejected"],
        "valid": stats["valid"],
        "round_completed": bool(stats["aggregated"]),
        "aggregate_equals_good_only": same,
        "float32": mixed is not None and all(v.dtype == sent[k].dtype for k, v in mixed.items()),
        "reasons": dict(zip(hostile, reasons, strict=False)) if len(reasons) == len(hostile) else reasons,
    }
