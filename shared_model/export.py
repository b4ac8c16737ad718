"""ONNX export of a TME-PSR model for the torch-free on-device runtime.

Exported with the dynamo exporter at opset 18, one file per graph, the batch dimension dynamic
and named ``batch`` (exported from batch-2 examples; a runtime at batch 1 may pin it with
``SessionOptions.add_free_dimension_override_by_name("batch", 1)``):

``step.onnx`` -- one event in, the new recurrent state and the first ``step_top_k`` recommendations (the items
shown per event) out, O(1) per event:

    inputs   item (B,) int64 dense item id; timestamp (B,) int64 unix seconds (fed even when the model has no
             time encoder); exclude (B, num_items) bool (True = never recommend: the seen items, the event's
             own item included); lru_state (B, blocks, H, d_head, 2) float32; time_state (B, 4) float32 (only
             for models with a time encoder)
    outputs  next_lru_state, next_time_state (like the inputs); state (B, d) float32, the state vector; then
             the ranking outputs below

``rank.onnx`` -- the top ``top_k`` recommendations for a state vector without consuming an event (after a
restart, after re-encoding, when ``exclude`` changed, or for more than ``step_top_k`` items): inputs state
(B, d) float32, exclude (B, num_items) bool.

Ranking outputs of both: ``top_items`` (B, K) int64 dense item ids by decreasing score; ``top_scores`` (B, K)
float32 (each item scored by its best interest head, exactly ``model.item_scores``; ``-inf`` once fewer than K
items are left); ``top_heads`` (B, K) int64, each item's driving interest head, the head whose term is its
score (``head_contributions(...).argmax(-1)``); ``top_explanations`` (B, K, E) int64, each item's explanation
ids among those attested for the item, by decreasing ``explanation_scores``, -1 where the item has fewer than
E (only with an explanation branch; the attested ids are stored as CSR initializers, :class:`AttestedTable`). K (``step_top_k`` for the step graph,
``top_k`` for the rank graph) is fixed at export; the runtime slices to its k.

``encoder.onnx`` -- re-encode a history of at most ``MAX_EVENTS`` events (after a new bundle or new personal
weights), equal to rolling the step graph over the events from the zero state: inputs items, timestamps
(B, MAX_EVENTS) int64 and mask (B, MAX_EVENTS) bool, left-padded (see :func:`encoder_inputs`); outputs
lru_state, time_state (the step graph's state inputs) and state (B, d).

``personalize.onnx`` -- the device's personal weights in (by torch name, all required), every graph's personal
inputs out (below). ``personal_init.bin`` -- the bundle's initial personal weights, float32 arrays back to back at
the offsets listed in ``spec["personalize"]["inputs"]`` (:func:`~shared_model.graph_io.initial_personal`).

``weights.bin`` -- the graphs' tensors of at least ``EXTERNAL_MIN_BYTES`` bytes, as ONNX external data shared
by the four files: each distinct tensor (the item table, read by three graphs) is stored once. A runtime loads
the graphs from bytes with the file's verified contents in memory
(``SessionOptions.add_external_initializers_from_files_in_memory``, :func:`~shared_model.graph_io.session`).

A runtime, for ``record(item, t)`` + ``recommend(k)``: set ``exclude[item] = True``, run ``step`` on the
stored states, keep ``next_*`` as the states and ``state``, answer from the first k ranking rows (one run;
k up to ``step_top_k``). ``recommend(k)`` without a new event, or for more items, runs ``rank`` on the kept
``state``. The recurrent states start as zeros of the shapes in ``spec["states"]``. ``docs/BUNDLE.md`` is the
written contract for runtimes in other languages.

Personal weights are plain graph inputs (bundle format 3), so every onnxruntime binding (Python, JavaScript,
Java, Objective-C, C#) feeds them with an ordinary ``run()``. Computing a graph's values from its parameters
per event would waste time (the LRU step matrices, lambda powers, ... depend on the personal parameters only),
so the export cuts every subgraph that depends only on personal parameters out of the three graphs into
``personalize.onnx``: what the graphs keep of the personal part are inputs read by non-constant nodes only,
personal parameters used as they are (``model.<name>``) and derived values (``<graph>/<value>``), listed in
:attr:`ExportedGraphs.personal`. A runtime runs ``personalize.onnx`` once per set of weights and feeds each
graph's personal inputs with its outputs of the same name (the Python runtime binds them once,
onnxruntime IOBinding). Nothing personal is baked into a graph: a run without the personal inputs is an error.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from .explanation import attested_top
from .graph_io import (
    MAX_EVENTS,
    SPEC_FORMAT,
    personalize,
)
from .model import TMEPSR
from .partition import parameter_groups
from .sequence_model import SequenceModel

OPSET = 18
GRAPH_FILES = {
    "step": "step.onnx",
    "rank": "rank.onnx",
    "encoder": "encoder.onnx",
    "personalize": "personalize.onnx",
}
WEIGHTS_FILE = "weights.bin"
PERSONAL_INIT_FILE = "personal_init.bin"
STEP_TOP_K = 10  # default ranking width of the step graph: the items shown per event
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside their graph
EXTERNAL_ALIGN = 64
INT8_MIN_ELEMENTS = 1024  # an int8 bundle stores float matrices at least this large as int8 rows
PARAM_PREFIX = "model."  # the graphs' name of parameter p is PARAM_PREFIX + p


class ExportError(RuntimeError):
    """The model cannot be exported, or an exported graph fails a check."""


@dataclass
class ExportedGraphs:
    """The exported files and what a runtime needs to drive them.

    ``personal`` maps each runtime graph (``"step"``, ``"rank"``, ``"encoder"``) to its personal inputs:
    outputs of ``personalize.onnx`` of the same name. ``spec`` is JSON-serialisable, for the bundle manifest
    (``docs/BUNDLE.md``, section 3): ``format``, ``opset``, ``num_items``, ``d_model``, ``num_heads``,
    ``top_k``, ``step_top_k``, ``num_explanations_out`` (0 without an explanation branch), ``max_events``,
    ``int8``, ``weights`` (the shared external-data file), ``states`` (name -> per-row ``shape`` and
    ``dtype``; zeros are the initial state; the step graph returns them as ``next_<name>``), ``graphs`` (name ->
    ``file``, ``inputs``, ``outputs``, each a list of ``{"name", "shape", "dtype"}`` with ``"batch"`` for the
    dynamic dimension, and ``personal``: its personal input names) and ``personalize`` (``file``, ``inputs``: the
    personal parameters by torch name, each with its layout in ``initial``, the initial-values file: ``offset``,
    ``encoding`` and, for ``"int8-rows"``, the ``scales`` offset;
    ``outputs``).
    """

    step_path: Path
    rank_path: Path
    encoder_path: Path
    personalize_path: Path
    weights_path: Path
    personal_init_path: Path
    personal: dict[str, list[str]]
    spec: dict[str, Any]

    @property
    def graph_paths(self) -> list[Path]:
        """The four ONNX files."""
        return [self.step_path, self.rank_path, self.encoder_path, self.personalize_path]

    @property
    def paths(self) -> list[Path]:
        """Every exported file: the graphs, their shared weights file and the initial personal weights."""
        return [*self.graph_paths, self.weights_path, self.personal_init_path]

    def path(self, graph: str) -> Path:
        return self.step_path.parent / self.spec["graphs"][graph]["file"]


# ---------------------------------------------------------------------------------------------- graph modules
class AttestedTable(nn.Module):
    """The explanation ids attested for each item, stored compactly (CSR: ``ptr`` int32 (num_items + 1),
    ``ids`` int16/int32) and read back as a (N, M) table padded with -1 (M: the widest item)."""

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        lengths = (table >= 0).sum(1)
        small = np.int16 if table.max(initial=0) < 2**15 else np.int32
        ptr = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
        self.register_buffer("ptr", torch.from_numpy(ptr))
        self.register_buffer("ids", torch.from_numpy(np.concatenate((table[table >= 0], [0])).astype(small)))
        self.width = max(int(lengths.max(initial=0)), 1)

    def forward(self, items: Tensor) -> Tensor:
        start, end = self.ptr[items].long(), self.ptr[items + 1].long()
        at = start[:, None] + torch.arange(self.width)
        return torch.where(at < end[:, None], self.ids[at.clamp(max=len(self.ids) - 1)].long(), -1)


def _rank(
    model: TMEPSR, state: Tensor, exclude: Tensor, top_k: int, num_expl: int, attested: AttestedTable | None
) -> tuple[Tensor, ...]:
    """Ranking outputs for state vectors (B, d): top items, scores, driving heads[, explanation ids among the
    ids attested for each item (-1 where an item has fewer)]."""
    scores = model.item_scores(state).masked_fill(exclude, -torch.inf)
    top_scores, top_items = scores.topk(top_k, dim=-1)
    heads = model.head_contributions(state, top_items).argmax(-1)
    if model.explanation is None:
        return top_items, top_scores, heads
    pairs = state[:, None].expand(-1, top_k, -1).reshape(-1, state.shape[-1])
    flat_items = top_items.reshape(-1)
    scores = model.explanation_scores(pairs, flat_items)
    expl = attested_top(scores, attested(flat_items), num_expl)
    return top_items, top_scores, heads, expl.reshape(*top_items.shape, num_expl)


class _Graph(nn.Module):
    """Holds the model as ``self.model`` (so initializers are named ``model.<parameter>``)."""

    def __init__(self, model: TMEPSR, top_k: int, num_expl: int, attested: AttestedTable | None) -> None:
        super().__init__()
        self.model, self.top_k, self.num_expl, self.attested = model, top_k, num_expl, attested


class _Step(_Graph):
    def forward(
        self,
        item: Tensor,
        timestamp: Tensor,
        exclude: Tensor,
        lru_state: Tensor,
        time_state: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        if time_state is None:
            time_state = torch.zeros(item.shape[0], 0)
        state, lru_state, time_state = self.model.step(item, timestamp, lru_state, time_state)
        next_states = (lru_state,) if self.model.time_encoder is None else (lru_state, time_state)
        return (
            *next_states,
            state,
            *_rank(self.model, state, exclude, self.top_k, self.num_expl, self.attested),
        )


class _Rank(_Graph):
    def forward(self, state: Tensor, exclude: Tensor) -> tuple[Tensor, ...]:
        return _rank(self.model, state, exclude, self.top_k, self.num_expl, self.attested)


class _Encoder(_Graph):
    def forward(self, items: Tensor, timestamps: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        state, lru_state, time_state = self.model.reencode(items, timestamps, mask)
        states = (lru_state,) if self.model.time_encoder is None else (lru_state, time_state)
        return *states, state


# ---------------------------------------------------------------------------------------------- export
def _state_names(model: TMEPSR) -> list[str]:
    return ["lru_state"] if model.time_encoder is None else ["lru_state", "time_state"]


def _ranking_names(model: TMEPSR) -> list[str]:
    names = ["top_items", "top_scores", "top_heads"]
    return names if model.explanation is None else [*names, "top_explanations"]


def _examples(model: TMEPSR) -> dict[str, tuple[tuple[Tensor, ...], list[str], list[str]]]:
    """Per graph: example inputs (batch 2), input names and output names."""
    n, d = model.cfg.num_items, model.cfg.d_model
    exclude = torch.zeros(2, n, dtype=torch.bool)
    exclude[:, 0] = True
    states = [s for s in model.initial_state(2) if s.shape[1]]
    t0 = 1_500_000_000
    events = torch.arange(MAX_EVENTS)
    history = (
        (events % n).repeat(2, 1),
        (t0 + 3_600 * events).repeat(2, 1),
        torch.stack((events >= 0, events >= MAX_EVENTS // 2)),
    )
    state_names = _state_names(model)
    return {
        "step": (
            (torch.tensor([0, n - 1]), torch.tensor([t0, t0 + 60]), exclude, *states),
            ["item", "timestamp", "exclude", *state_names],
            [*(f"next_{s}" for s in state_names), "state", *_ranking_names(model)],
        ),
        "rank": ((torch.randn(2, d), exclude), ["state", "exclude"], _ranking_names(model)),
        "encoder": (history, ["items", "timestamps", "mask"], [*state_names, "state"]),
    }


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
                dynamic_shapes=tuple({0: torch.export.Dim.DYNAMIC} for _ in args),
                optimize=False,
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    proto = program.model_proto
    for node in proto.graph.node:
        del node.metadata_props[:]
    return proto


def _io_spec(values: Sequence[onnx.ValueInfoProto]) -> list[dict[str, Any]]:
    """Name, shape ("batch" for the dynamic dimension) and numpy dtype name of graph inputs or outputs."""
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [dim.dim_value if dim.HasField("dim_value") else "batch" for dim in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        out.append({"name": v.name, "shape": shape, "dtype": dtype})
    return out


# ---------------------------------------------------------------------------------------------- personal split
@dataclass
class _PersonalPart:
    """The part of one graph that depends on personal parameters only (plus constants)."""

    nodes: list[onnx.NodeProto]  # in graph order: the personal-derived nodes and the constants they read
    initializers: list[onnx.TensorProto]  # shared initializers those nodes read
    boundary: list[str]  # personal-derived values (or personal initializers) that the rest of the graph reads


def _copy_node(
    node: onnx.NodeProto, rename: dict[str, str] | None = None, prefix: str = ""
) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    if rename:
        del out.input[:], out.output[:]
        out.input.extend(rename.get(i, i) for i in node.input)
        out.output.extend(rename.get(o, o) for o in node.output)
    out.name = prefix + node.name
    return out


def _split_personal(graph: onnx.GraphProto, personal: set[str]) -> tuple[_PersonalPart, set[int]]:
    """Find the constant subgraph derived from the personal initializers (e.g. the LRU step matrices): its
    nodes (with the shared constants they read) and its boundary; also the indices of the derived nodes."""
    constants = {t.name for t in graph.initializer}
    derived, derived_nodes, producer = personal & constants, set(), {}
    for k, node in enumerate(graph.node):
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ExportError(
                f"{node.op_type} node {node.name} has a subgraph, which the export cannot split"
            )
        producer.update(dict.fromkeys(node.output, k))
        if all(i in constants for i in node.input if i):
            constants.update(node.output)
            if any(i in derived for i in node.input):
                derived.update(node.output)
                derived_nodes.add(k)
    if derived & {o.name for o in graph.output}:
        raise ExportError("a graph output depends on the personal parameters only")
    read_outside = {i for k, n in enumerate(graph.node) if k not in derived_nodes for i in n.input}
    boundary = sorted(derived & read_outside)
    needed, pending = set(derived_nodes), [i for k in derived_nodes for i in graph.node[k].input]
    while pending:
        k = producer.get(pending.pop())
        if k is not None and k not in needed:
            needed.add(k)
            pending.extend(graph.node[k].input)
    reads = {i for k in needed for i in graph.node[k].input}
    shared = [t for t in graph.initializer if t.name in reads and t.name not in personal]
    return _PersonalPart([graph.node[k] for k in sorted(needed)], shared, boundary), derived_nodes


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    del graph.node[:]
    graph.node.extend(nodes)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing reads, then unread initializers, and the value infos (optional shape
    annotations, a tenth of a graph file: onnxruntime and the checker infer them)."""
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        keep = [_copy_node(n) for n in graph.node if any(o in read for o in n.output)]
        if len(keep) == len(graph.node):
            break
        _replace_nodes(graph, keep)
    initializers = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.value_info[:]


def _detach_personal(graph: onnx.GraphProto, tag: str, personal: set[str]) -> tuple[_PersonalPart, list[str]]:
    """Cut the personal-derived subgraph out of ``graph``: each derived value it hands to the rest is renamed
    ``<tag>/<value>`` (made a graph input by :func:`_personal_inputs`, shortened by :func:`_short_names`).
    Returns the cut part and the names the graph's personal values now have (derived values and personal
    parameters read directly)."""
    part, derived_nodes = _split_personal(graph, personal)
    rename = {v: f"{tag}/{v}" for v in part.boundary if v not in personal}
    _replace_nodes(graph, [_copy_node(n, rename) for k, n in enumerate(graph.node) if k not in derived_nodes])
    return part, [rename.get(v, v) for v in part.boundary]


def _personalize_model(parts: dict[str, _PersonalPart], values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """One graph computing every graph's personal values from the personal parameters: inputs are the
    parameters by torch name (shapes of ``values``; no defaults), outputs the personal input names of the
    graphs (``model.<parameter>`` for each parameter, ``<graph>/<value>`` for derived values). Output types
    are left to :func:`_type_personalize`."""
    helper = onnx.helper
    raw = {PARAM_PREFIX + p for p in values}
    nodes = [helper.make_node("Identity", [p], [PARAM_PREFIX + p], name=f"param/{p}") for p in values]
    initializers = []
    outputs = sorted(raw)
    for tag, part in parts.items():
        names = {v for n in part.nodes for v in (*n.input, *n.output)} | {t.name for t in part.initializers}
        rename = {v: f"{tag}/{v}" for v in names if v and v not in raw}
        nodes += [_copy_node(n, rename, f"{tag}/") for n in part.nodes]
        for t in part.initializers:
            initializers.append(onnx.TensorProto())
            initializers[-1].CopyFrom(t)
            initializers[-1].name = rename[t.name]
        outputs += [rename[v] for v in part.boundary if v not in raw]
    inputs = [helper.make_tensor_value_info(p, onnx.TensorProto.FLOAT, v.shape) for p, v in values.items()]
    graph = helper.make_graph(
        nodes, "personalize", inputs, [helper.make_empty_tensor_value_info(o) for o in outputs], initializers
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)


def _type_personalize(model: onnx.ModelProto, personal: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Give the personalize graph's outputs their exact types (from one run at the exported model's personal
    weights ``personal``); returns that run's outputs: the exported model's personal values."""
    values = personalize(model.SerializeToString(), personal)
    for output in model.graph.output:
        dtype = onnx.helper.np_dtype_to_tensor_dtype(values[output.name].dtype)
        output.CopyFrom(onnx.helper.make_tensor_value_info(output.name, dtype, values[output.name].shape))
    return values


def _externalize(protos: dict[str, onnx.ModelProto], path: Path) -> None:
    """Move the initializers of at least ``EXTERNAL_MIN_BYTES`` into one weights file shared by ``protos``,
    each distinct tensor (dtype, shape, bytes) stored once."""
    blob, offsets = bytearray(), {}
    for tensor in (t for p in protos.values() for t in p.graph.initializer):
        array = onnx.numpy_helper.to_array(tensor)
        if array.nbytes < EXTERNAL_MIN_BYTES:
            tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
            continue
        key = (tensor.data_type, tuple(tensor.dims), array.tobytes())
        if key not in offsets:
            blob.extend(bytes(-len(blob) % EXTERNAL_ALIGN))
            offsets[key] = len(blob)
            blob.extend(key[2])
        external = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        external.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", path.name), ("offset", offsets[key]), ("length", array.nbytes)):
            external.external_data.add(key=k, value=str(v))
        tensor.CopyFrom(external)
    path.write_bytes(bytes(blob))


def _personal_inputs(graph: onnx.GraphProto, names: list[str], values: dict[str, np.ndarray]) -> None:
    """Make each personal value ``names`` (an initializer, or a value cut out into the personalize graph) an
    ordinary input of ``graph``, typed and shaped as in ``values``, after the graph's own inputs."""
    kept = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for name in names:
        dtype = onnx.helper.np_dtype_to_tensor_dtype(values[name].dtype)
        graph.input.append(onnx.helper.make_tensor_value_info(name, dtype, values[name].shape))


def _int8_rows(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row of the last axis: ``q`` (int8, the array's shape) and ``scale`` (float32, one per
    row, ``max|row| / 127``, 1 for a zero row), ``array ~= q * scale[..., None]``."""
    scale = np.abs(array).max(-1) / 127
    scale = np.where(scale > 0, scale, 1).astype(np.float32)
    return np.clip(np.round(array / scale[..., None]), -127, 127).astype(np.int8), scale


def _quantizable(shape: Sequence[int]) -> bool:
    return len(shape) >= 2 and int(np.prod(shape)) >= INT8_MIN_ELEMENTS


def _int8_initializers(graph: onnx.GraphProto) -> None:
    """Store each float32 initializer matrix of at least ``INT8_MIN_ELEMENTS`` as int8 rows (``<name>.q``) with
    per-row scales (``<name>.scale``), rebuilt in-graph by Cast and Mul nodes under its old name; onnxruntime
    folds them once per session, so a run costs what it did."""
    rebuild, kept = [], []
    for tensor in graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or not _quantizable(tensor.dims):
            kept.append(tensor)
            continue
        q, scale = _int8_rows(onnx.numpy_helper.to_array(tensor))
        name = tensor.name
        kept += [
            onnx.numpy_helper.from_array(q, f"{name}.q"),
            onnx.numpy_helper.from_array(scale[..., None], f"{name}.scale"),
        ]
        rebuild += [
            onnx.helper.make_node("Cast", [f"{name}.q"], [f"{name}.f"], to=onnx.TensorProto.FLOAT),
            onnx.helper.make_node("Mul", [f"{name}.f", f"{name}.scale"], [name]),
        ]
    nodes = [*rebuild, *graph.node]
    del graph.initializer[:], graph.node[:]
    graph.initializer.extend(kept)
    graph.node.extend(nodes)


def _write_initial(values: dict[str, np.ndarray], path: Path, int8: bool) -> dict[str, dict[str, Any]]:
    """The initial personal weights back to back (row-major, little-endian): float32, or with ``int8`` each
    matrix of at least ``INT8_MIN_ELEMENTS`` as int8 rows followed by its float32 scales. Returns each array's
    layout: ``offset`` and ``encoding`` (``"float32"`` or ``"int8-rows"`` with the ``scales`` offset)."""
    layout, blob = {}, bytearray()
    for name, value in values.items():
        if int8 and _quantizable(value.shape):
            q, scale = _int8_rows(value)
            layout[name] = {"offset": len(blob), "encoding": "int8-rows"}
            blob.extend(q.tobytes())
            blob.extend(bytes(-len(blob) % 4))
            layout[name]["scales"] = len(blob)
            blob.extend(scale.astype("<f4").tobytes())
        else:
            layout[name] = {"offset": len(blob), "encoding": "float32"}
            blob.extend(np.ascontiguousarray(value, dtype="<f4").tobytes())
    path.write_bytes(bytes(blob))
    return layout


def _rename(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename values (node inputs and outputs, graph inputs and outputs, initializers) by ``mapping``."""
    for node in graph.node:
        node.input[:] = [mapping.get(v, v) for v in node.input]
        node.output[:] = [mapping.get(v, v) for v in node.output]
    for value in (*graph.input, *graph.output, *graph.initializer):
        value.name = mapping.get(value.name, value.name)


def _short_names(files: dict[str, onnx.ModelProto], personal: dict[str, list[str]]) -> dict[str, list[str]]:
    """Short names for what no runtime reads by name (a third of a graph file was the exporter's value and
    node names): derived personal values become ``<graph>/p<k>`` (in the graph and in the personalize graph),
    intermediate values ``t<k>``, node names empty. Returns the graphs' personal input names."""
    derived = {v: f"{g}/p{k}" for g, names in personal.items() for k, v in enumerate(names) if "/" in v}
    for proto in files.values():
        _rename(proto.graph, derived)
    for proto in files.values():
        graph = proto.graph
        public = {v.name for v in (*graph.input, *graph.output, *graph.initializer)}
        inner = dict.fromkeys(o for n in graph.node for o in n.output if o and o not in public)
        _rename(graph, {v: f"t{k}" for k, v in enumerate(inner)})
        for node in graph.node:
            node.name = ""
    return {g: [derived.get(v, v) for v in names] for g, names in personal.items()}


def _name_batch(graph: onnx.GraphProto) -> None:
    """Name the batch dimension (the exporter's symbol of the first input's first dimension) ``batch``."""
    symbol = graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"


def _fusable_gelu(graph: onnx.GraphProto) -> None:
    """Rewrite the exporter's exact GELU ``x * (0.5 * (1 + erf(x / sqrt(2))))`` as
    ``(x * (1 + erf(x / sqrt(2)))) * 0.5``: the same values (a product with 0.5 is exact), in the form that
    onnxruntime's optimizer fuses into one Gelu node (5 nodes to 1 per GELU)."""
    producer = {o: n for n in graph.node for o in n.output}
    readers = Counter(i for n in graph.node for i in n.input)

    def made_by(value: str, op: str) -> onnx.NodeProto | None:
        node = producer.get(value)
        return node if node is not None and node.op_type == op else None

    for outer in (n for n in graph.node if n.op_type == "Mul"):
        x, inner_out = outer.input
        inner = made_by(inner_out, "Mul")
        if inner is None or readers[inner_out] != 1:
            continue
        half, one_plus = inner.input
        add = made_by(one_plus, "Add")
        erf = add and made_by(add.input[0], "Erf")
        div = erf and made_by(erf.input[0], "Div")
        if div is not None and div.input[0] == x:
            inner.input[:] = [x, one_plus]
            outer.input[:] = [inner_out, half]


def _fold_cast_like(graph: onnx.GraphProto) -> None:
    """Replace ``CastLike(constant, x)`` (the exporter's scalars, e.g. the ``-inf`` of ``masked_fill``) by the
    constant in ``x``'s type when the exporter's value infos give it: onnxruntime leaves these as Cast nodes
    that run on every call."""
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info)}
    constants = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}
    for node in graph.node:
        if node.op_type == "CastLike" and node.input[0] in constants and types.get(node.input[1]):
            value = onnx.numpy_helper.to_array(constants[node.input[0]])
            value = value.astype(onnx.helper.tensor_dtype_to_np_dtype(types[node.input[1]]))
            node.CopyFrom(
                onnx.helper.make_node(
                    "Constant", [], node.output, node.name, value=onnx.numpy_helper.from_array(value)
                )
            )


def _check_personal_read(protos: dict[str, onnx.ModelProto], personal: list[str]) -> None:
    """Every personal parameter must be an initializer that some graph reads, else it was folded away."""
    read = {i for proto in protos.values() for n in proto.graph.node for i in n.input}
    missing = [p for p in personal if PARAM_PREFIX + p not in read]
    if missing:
        raise ExportError(f"personal parameters folded away or renamed at export: {missing}")


def _export_graphs(
    model: TMEPSR, top_k: int, step_top_k: int, num_expl: int, attested: AttestedTable | None
) -> tuple[dict[str, onnx.ModelProto], dict[str, dict[str, Any]]]:
    """The three runtime graphs as exported (personal parameters still inside; GELUs in the form onnxruntime
    fuses, typed scalar constants folded) and their inputs/outputs."""
    modules = {"step": _Step, "rank": _Rank, "encoder": _Encoder}
    widths = {"step": step_top_k, "rank": top_k, "encoder": top_k}
    protos, io = {}, {}
    for name, (args, inputs, outputs) in _examples(model).items():
        with torch.no_grad():
            graph_module = modules[name](
                model, widths[name], num_expl, None if name == "encoder" else attested
            )
            protos[name] = _export_graph(graph_module, args, inputs, outputs)
        graph = protos[name].graph
        _fusable_gelu(graph)
        _fold_cast_like(graph)
        io[name] = {"inputs": _io_spec(graph.input), "outputs": _io_spec(graph.output)}
    return protos, io


def export_model(
    model: SequenceModel,
    out_dir: str | Path,
    *,
    top_k: int = 50,
    explanation_candidates: np.ndarray | None = None,
    num_explanations_out: int = 3,
    int8: bool = False,
    step_top_k: int = STEP_TOP_K,
) -> ExportedGraphs:
    """Export ``model`` (a :class:`TMEPSR`, any preset) to ``step.onnx``, ``rank.onnx``, ``encoder.onnx`` and
        ``personalize.onnx`` in ``out_dir``. ``top_k`` items (and ``num_explanations_out`` explanation ids for
        each, among the ids attested for the item: ``explanation_candidates`` (num_items, M) int, -1 padded, as
        :attr:`~shared_model.data.split.LeaveOneOutSplit.explanation_candidates`; required when the model
        explains) are returned per rank call, the first ``step_top_k`` of them per step call (a narrower ranking
        is a faster step); ``int8`` stores every float matrix of at least ``INT8_MIN_ELEMENTS`` (the item table, the
    explanation branch, the initial personal weights) as int8 rows with a per-row scale. The model is
        not modified."""
    if not isinstance(model, TMEPSR):
        raise ExportError(
            f"only LRU-based models (TME-PSR and its presets) export to the on-device graphs; "
            f"{type(model).__name__} has no O(1) step"
        )
    model = copy.deepcopy(model).eval()
    personal = parameter_groups(model, "card")["personal"]
    params = dict(model.named_parameters())
    values = {p: params[p].detach().numpy().copy() for p in personal}
    top_k = min(top_k, model.cfg.num_items)
    step_top_k = min(step_top_k, top_k)
    attested = None
    if model.explanation is not None:
        if explanation_candidates is None:
            raise ExportError("a model with an explanation branch needs explanation_candidates to export")
        if explanation_candidates.shape[0] != model.cfg.num_items:
            raise ExportError(
                f"explanation_candidates has {explanation_candidates.shape[0]} rows, "
                f"the model {model.cfg.num_items} items"
            )
        attested = AttestedTable(explanation_candidates)
    num_expl = (
        0 if attested is None else min(num_explanations_out, model.cfg.num_explanations, attested.width)
    )
    protos, io = _export_graphs(model, top_k, step_top_k, num_expl, attested)
    _check_personal_read(protos, personal)
    parts, personal_inputs = {}, {}
    for name, proto in protos.items():
        parts[name], personal_inputs[name] = _detach_personal(
            proto.graph, name, {PARAM_PREFIX + p for p in personal}
        )
    personalize = _personalize_model(parts, values)
    derived = _type_personalize(personalize, values)
    for name, proto in protos.items():
        _personal_inputs(proto.graph, personal_inputs[name], derived)
        _prune(proto.graph)
        _name_batch(proto.graph)
        if int8:
            _int8_initializers(proto.graph)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / GRAPH_FILES[g] for g in GRAPH_FILES] + [
        out_dir / WEIGHTS_FILE,
        out_dir / PERSONAL_INIT_FILE,
    ]
    files = protos | {"personalize": personalize}
    if int8:  # the personalize graph reads shared tables too (e.g. the item table for the head tables)
        _int8_initializers(personalize.graph)
    personal_inputs = _short_names(files, personal_inputs)
    for name, proto in protos.items():
        io[name]["inputs"] = _io_spec(proto.graph.input)
    _externalize(files, paths[-2])
    layout = _write_initial(values, paths[-1], int8)
    for name, proto in files.items():
        onnx.save_model(proto, out_dir / GRAPH_FILES[name])
    states = {
        name: {"shape": list(s.shape[1:]), "dtype": "float32"}
        for name, s in zip(_state_names(model), model.initial_state(1), strict=False)
    }
    spec = {
        "format": SPEC_FORMAT,
        "opset": OPSET,
        "num_items": model.cfg.num_items,
        "d_model": model.cfg.d_model,
        "num_heads": model.cfg.num_heads,
        "top_k": top_k,
        "step_top_k": step_top_k,
        "num_explanations_out": num_expl,
        "max_events": MAX_EVENTS,
        "int8": int8,
        "weights": WEIGHTS_FILE,
        "states": states,
        "graphs": {
            name: {"file": GRAPH_FILES[name], **io[name], "personal": personal_inputs[name]}
            for name in protos
        },
        "personalize": {
            "file": GRAPH_FILES["personalize"],
            "inputs": [v | layout[v["name"]] for v in _io_spec(personalize.graph.input)],
            "outputs": _io_spec(personalize.graph.output),
            "initial": PERSONAL_INIT_FILE,
        },
    }
    return ExportedGraphs(*paths, personal_inputs, spec)


# ---------------------------------------------------------------------------------------------- checks
@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """onnxruntime's converter prints progress and its sessions log optimizer notes: keep errors only."""
    ort.set_default_logger_severity(3)
    tools_log = logging.getLogger("ort_format_model.utils")
    level = tools_log.level
    tools_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tools_log.setLevel(level)
        ort.set_default_logger_severity(2)


def check_graphs(paths: Sequence[str | Path]) -> None:
    """Raise :class:`ExportError` unless every graph passes ``onnx.checker`` (full check), onnxruntime's
    mobile usability analysis and conversion to the ORT format (onnxruntime's own tools)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort
    from onnxruntime.tools.mobile_helpers import usability_checker

    logger = logging.getLogger("tmepsr.export.mobile")
    logger.setLevel(logging.WARNING)
    for path in map(Path, paths):
        steps = {
            "onnx.checker": lambda p=path: onnx.checker.check_model(p, full_check=True),
            "mobile usability": lambda p=path: usability_checker.analyze_model(p, logger=logger),
        }
        for what, run in steps.items():
            try:
                run()
            except Exception as exc:
                raise ExportError(f"{path.name} fails the {what} check: {exc}") from exc
        with tempfile.TemporaryDirectory() as tmp, _quiet_onnxruntime():
            try:
                convert_onnx_models_to_ort(path, Path(tmp), [OptimizationStyle.Fixed])
            except Exception as exc:
                raise ExportError(f"{path.name} does not convert to the ORT format: {exc}") from exc
            if not any(Path(tmp).rglob("*.ort")):
                raise ExportError(f"{path.name} does not convert to the ORT format (no .ort file written)")
