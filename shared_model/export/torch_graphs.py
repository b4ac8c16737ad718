"""The torch side of the export: the modules each runtime graph is traced from (``step``, ``rank``,
``encoder``), their example inputs and names, and the dynamo export of each to an ONNX model. Everything after
that is protobuf rewriting (:mod:`.personal_split`, :mod:`.onnx_rewrites`, :mod:`.int8`)."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..explanation import add_history_counts, history_counts
from ..graph_io import MAX_EVENTS
from ..model import TMEPSR

OPSET = 18


class AttestedTable(nn.Module):
    """The explanation ids attested for each item, stored compactly (CSR: ``ptr`` int64 (num_items + 1),
    ``ids`` int16/int32) and read back as a (N, M) table padded with -1 (M: the widest item). ``ptr`` is int64 and
    the column offsets a stored constant, so the exported lookup has no Cast or Range nodes to run per call."""

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        lengths = (table >= 0).sum(1)
        small = np.int16 if table.max(initial=0) < 2**15 else np.int32
        ptr = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        self.register_buffer("ptr", torch.from_numpy(ptr))
        self.register_buffer("ids", torch.from_numpy(np.concatenate((table[table >= 0], [0])).astype(small)))
        self.register_buffer("offsets", torch.arange(max(int(lengths.max(initial=0)), 1)))

    def forward(self, items: Tensor) -> Tensor:
        # lookups as embeddings: one Gather each in the exported graph (indexing exports as GatherND with
        # transposes and casts)
        ptr, ids = self.ptr[:, None], self.ids[:, None]
        start, end = F.embedding(items, ptr), F.embedding(items + 1, ptr)  # (N, 1)
        at = start + self.offsets
        return torch.where(at < end, F.embedding(at.clamp(max=len(self.ids) - 1), ids)[..., 0].long(), -1)


def _rank(
    model: TMEPSR,
    state: Tensor,
    exclude: Tensor,
    top_k: int,
    num_expl: int,
    attested: AttestedTable | None,
    history: Tensor | None,
) -> tuple[Tensor, ...]:
    """Ranking outputs for state vectors (B, d): top items, scores, driving heads[, explanation ids among the
    ids attested for each item (-1 where an item has fewer), with the history prior when ``history`` (B, V)
    is given]."""
    top_scores, top_items = model.top_items(state, exclude, top_k)
    heads = model.head_contributions(state, top_items).argmax(-1)
    if model.explanation is None:
        return top_items, top_scores, heads
    pairs = state[:, None].expand(-1, top_k, -1).reshape(-1, state.shape[-1])
    flat_items = top_items.reshape(-1)
    scores = model.explanation_scores(pairs, flat_items)
    bonus = (
        None if history is None else model.explanation.history_bonus(history).repeat_interleave(top_k, dim=0)
    )
    expl = model.explanation.shown_top(scores, attested(flat_items), num_expl, bonus)
    return top_items, top_scores, heads, expl.reshape(*top_items.shape, num_expl)


def uses_history(model: TMEPSR) -> bool:
    """Whether the shown explanations read the user's history counts (a recurrent state of the graphs)."""
    return model.explanation is not None and model.explanation.history_prior > 0


class _Graph(nn.Module):
    """Holds the model as ``self.model`` (so initializers are named ``model.<parameter>``). ``fixed_inputs``:
    the named inputs of ``forward`` before its ``*states`` (None: no ``*states``)."""

    fixed_inputs: int | None = None

    def __init__(self, model: TMEPSR, top_k: int, num_expl: int, attested: AttestedTable | None) -> None:
        super().__init__()
        self.model, self.top_k, self.num_expl, self.attested = model, top_k, num_expl, attested


class _Step(_Graph):
    fixed_inputs = 3

    def forward(
        self, item: Tensor, timestamp: Tensor, exclude: Tensor, *states: Tensor
    ) -> tuple[Tensor, ...]:
        named = dict(zip(state_names(self.model), states, strict=True))
        time_state = named.get("time_state", torch.zeros(item.shape[0], 0))
        state, lru_state, time_state = self.model.step(item, timestamp, named["lru_state"], time_state)
        next_states = {"lru_state": lru_state, "time_state": time_state}
        history = None
        if "explanation_history" in named:
            history = add_history_counts(named["explanation_history"], self.attested(item))
            next_states["explanation_history"] = history
        return (
            *(next_states[name] for name in named),
            state,
            *_rank(self.model, state, exclude, self.top_k, self.num_expl, self.attested, history),
        )


class _Rank(_Graph):
    fixed_inputs = 2

    def forward(self, state: Tensor, exclude: Tensor, *history: Tensor) -> tuple[Tensor, ...]:
        return _rank(
            self.model,
            state,
            exclude,
            self.top_k,
            self.num_expl,
            self.attested,
            history[0] if history else None,
        )


class _Encoder(_Graph):
    def forward(self, items: Tensor, timestamps: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        state, lru_state, time_state = self.model.reencode(items, timestamps, mask)
        states = (lru_state,) if self.model.time_encoder is None else (lru_state, time_state)
        if uses_history(self.model):  # the counts of the ids attested for the history's items (not padding's)
            ids = self.attested(torch.where(mask, items, 0).reshape(-1)).reshape(*items.shape, -1)
            states = (*states, history_counts(ids, self.model.cfg.num_explanations, mask))
        return *states, state


def state_names(model: TMEPSR) -> list[str]:
    """The recurrent states of the graphs, in their input order: ``lru_state``, ``time_state`` with a time
    encoder, ``explanation_history`` when the shown explanations read the history (:func:`uses_history`)."""
    names = ["lru_state"] if model.time_encoder is None else ["lru_state", "time_state"]
    return [*names, "explanation_history"] if uses_history(model) else names


def initial_states(model: TMEPSR, batch: int) -> list[Tensor]:
    """Zero states (batch, ...), one per :func:`state_names`."""
    lru_state, time_state = model.initial_state(batch)
    values = {
        "lru_state": lru_state,
        "time_state": time_state,
        "explanation_history": torch.zeros(batch, model.cfg.num_explanations),
    }
    return [values[name] for name in state_names(model)]


def _ranking_names(model: TMEPSR) -> list[str]:
    names = ["top_items", "top_scores", "top_heads"]
    return names if model.explanation is None else [*names, "top_explanations"]


def _examples(model: TMEPSR) -> dict[str, tuple[tuple[Tensor, ...], list[str], list[str]]]:
    """Per graph: example inputs (batch 2), input names and output names."""
    n, d = model.cfg.num_items, model.cfg.d_model
    exclude = torch.zeros(2, n, dtype=torch.bool)
    exclude[:, 0] = True
    states = initial_states(model, 2)
    t0 = 1_500_000_000
    events = torch.arange(MAX_EVENTS)
    history = (
        (events % n).repeat(2, 1),
        (t0 + 3_600 * events).repeat(2, 1),
        torch.stack((events >= 0, events >= MAX_EVENTS // 2)),
    )
    names = state_names(model)
    counts = ["explanation_history"] if uses_history(model) else []
    return {
        "step": (
            (torch.tensor([0, n - 1]), torch.tensor([t0, t0 + 60]), exclude, *states),
            ["item", "timestamp", "exclude", *names],
            [*(f"next_{s}" for s in names), "state", *_ranking_names(model)],
        ),
        "rank": (
            (torch.randn(2, d), exclude, *states[len(names) - len(counts) :]),
            ["state", "exclude", *counts],
            _ranking_names(model),
        ),
        "encoder": (history, ["items", "timestamps", "mask"], [*names, "state"]),
    }


def _batch_dims(module: nn.Module, num_args: int) -> tuple[Any, ...]:
    """A dynamic batch dimension for each of ``num_args`` inputs, shaped like ``forward``'s parameters (the
    ``*states`` of a :class:`_Graph` as one tuple)."""
    dims = [{0: torch.export.Dim.DYNAMIC} for _ in range(num_args)]
    fixed = getattr(module, "fixed_inputs", None)
    if fixed is None or fixed == num_args:  # no *states, or none passed
        return tuple(dims)
    return (*dims[:fixed], tuple(dims[fixed:]))


def _export_graph(
    module: nn.Module, args: tuple[Tensor, ...], names: list[str], outputs: list[str]
) -> onnx.ModelProto:
    """Dynamo export with a dynamic batch dimension, without the exporter's per-node metadata (source paths
    and stack traces: half the file). The exporter's optimizer is off: it would fold parameter-only subgraphs
    (e.g. the LRU step matrices) into constants and bake the personal weights in. The exporter's notes (about
    torchvision ops it skips, deprecations inside torch) are silenced: they say nothing about this model."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                module.eval(),
                args,
                dynamo=True,
                opset_version=OPSET,
                input_names=names,
                output_names=outputs,
                dynamic_shapes=_batch_dims(module, len(args)),
                optimize=False,
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    proto = program.model_proto
    for node in proto.graph.node:
        del node.metadata_props[:]
    return proto


def export_graphs(
    model: TMEPSR, top_k: int, step_top_k: int, num_expl: int, attested: AttestedTable | None
) -> dict[str, onnx.ModelProto]:
    """The three runtime graphs as the exporter writes them (personal parameters still inside)."""
    modules = {"step": _Step, "rank": _Rank, "encoder": _Encoder}
    widths = {"step": step_top_k, "rank": top_k, "encoder": top_k}
    protos = {}
    for name, (args, inputs, outputs) in _examples(model).items():
        with torch.no_grad():
            graph_module = modules[name](model, widths[name], num_expl, attested)
            protos[name] = _export_graph(graph_module, args, inputs, outputs)
    return protos
