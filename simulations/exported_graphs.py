"""Running exported graphs outside a bundle, for tests and benchmarks: the personal inputs of a user, one graph
run, whole histories through the encoder and rank graphs, and the int8 item table's effect on the top-k."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from shared_model.data.log import InteractionLog
from shared_model.export import ExportedGraphs
from shared_model.graph_io import (
    MAX_EVENTS,
    encoder_inputs,
    exclude_mask,
    initial_personal,
    personalize,
    rank_states,
    run_session,
    session,
)


def personal_values(
    graphs: ExportedGraphs, personal: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Every graph's personal inputs for the personal weights ``personal`` (by torch name; the bundle's initial
    values for the others): one run of ``personalize.onnx``."""
    initial = initial_personal(graphs.spec["personalize"], graphs.personal_init_path.read_bytes())
    return personalize(graphs.personalize_path, initial | (personal or {}))


def ort_session(graphs: ExportedGraphs, graph: str) -> ort.InferenceSession:
    """A single-threaded session of ``graph`` (``"step"``, ``"rank"`` or ``"encoder"``)."""
    return session(graphs.path(graph))


def run_graph(
    graphs: ExportedGraphs, graph: str, feeds: dict[str, np.ndarray], values: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """One run of ``graph`` on ``feeds`` plus its personal inputs from ``values`` (:func:`personal_values`)."""
    personal = {name: values[name] for name in graphs.personal[graph]}
    return run_session(ort_session(graphs, graph), feeds | personal)


def recommend_histories(
    graphs: ExportedGraphs,
    items: Sequence[np.ndarray],
    times: Sequence[np.ndarray],
    values: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Encoder graph then rank graph over histories (seen items excluded), personal inputs from ``values``
    (:func:`personal_values`; None: the bundle's initial ones): the encoder's and the rank graph's outputs."""
    values = personal_values(graphs) if values is None else values  # personalize once for both graphs
    out = run_graph(graphs, "encoder", encoder_inputs(items, times), values)
    exclude = exclude_mask(items, graphs.spec["num_items"])
    feeds = {"state": out["state"], "exclude": exclude} | rank_states(graphs.spec, out)
    return out | run_graph(graphs, "rank", feeds, values)


def int8_effect(
    fp32: ExportedGraphs, int8: ExportedGraphs, log: InteractionLog, users: np.ndarray, k: int = 10
) -> dict[str, float]:
    """Effect of the int8 item table on ``users``' test event (leave-one-out: input = the user's events but
    the last, at most the last ``MAX_EVENTS``; target = the last event), through the exported graphs:
    mean top-k overlap, Recall@k of each and the total file sizes."""
    starts, ends = log.user_ptr[users], log.user_ptr[users + 1] - 1
    if np.any(ends - starts < 1):
        raise ValueError("every user needs at least 2 events (an input and a target)")
    lo = np.maximum(starts, ends - MAX_EVENTS)
    items = [log.item[a:b] for a, b in zip(lo, ends, strict=True)]
    times = [log.time[a:b] for a, b in zip(lo, ends, strict=True)]
    top = {
        name: recommend_histories(g, items, times)["top_items"][:, :k]
        for name, g in (("fp32", fp32), ("int8", int8))
    }
    target = log.item[ends][:, None]
    overlap = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(top["fp32"], top["int8"], strict=True)])
    return {
        "users": float(len(users)),
        f"top{k}_overlap": float(overlap),
        f"recall@{k}_fp32": float((top["fp32"] == target).any(1).mean()),
        f"recall@{k}_int8": float((top["int8"] == target).any(1).mean()),
        "bytes_fp32": float(sum(p.stat().st_size for p in fp32.paths)),
        "bytes_int8": float(sum(p.stat().st_size for p in int8.paths)),
    }
