"""Cutting the personal part out of the runtime graphs: every subgraph that depends only on the personal
parameters (e.g. the LRU step matrices) moves into ``personalize.onnx``, run once per set of personal weights;
what the runtime graphs keep of it become ordinary graph inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..graph_io import personalize
from .errors import ExportError
from .onnx_rewrites import copy_node, replace_nodes
from .torch_graphs import OPSET

PARAM_PREFIX = "model."  # the graphs' name of parameter p is PARAM_PREFIX + p


@dataclass
class PersonalPart:
    """The part of one graph that depends on personal parameters only (plus constants)."""

    nodes: list[onnx.NodeProto]  # in graph order: the personal-derived nodes and the constants they read
    initializers: list[onnx.TensorProto]  # shared initializers those nodes read
    boundary: list[str]  # personal-derived values (or personal initializers) that the rest of the graph reads


def _split_personal(graph: onnx.GraphProto, personal: set[str]) -> tuple[PersonalPart, set[int]]:
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
    return PersonalPart([graph.node[k] for k in sorted(needed)], shared, boundary), derived_nodes


def detach_personal(graph: onnx.GraphProto, tag: str, personal: set[str]) -> tuple[PersonalPart, list[str]]:
    """Cut the personal-derived subgraph out of ``graph``: each derived value it hands to the rest is renamed
    ``<tag>/<value>`` (made a graph input by :func:`as_graph_inputs`, shortened by :func:`short_names`).
    Returns the cut part and the names the graph's personal values now have (derived values and personal
    parameters read directly)."""
    part, derived_nodes = _split_personal(graph, personal)
    rename = {v: f"{tag}/{v}" for v in part.boundary if v not in personal}
    replace_nodes(graph, [copy_node(n, rename) for k, n in enumerate(graph.node) if k not in derived_nodes])
    return part, [rename.get(v, v) for v in part.boundary]


def personalize_model(parts: dict[str, PersonalPart], values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """One graph computing every graph's personal values from the personal parameters: inputs are the
    parameters by torch name (shapes of ``values``; no defaults), outputs the personal input names of the
    graphs (``model.<parameter>`` for each parameter, ``<graph>/<value>`` for derived values). Output types
    are left to :func:`type_personalize`."""
    helper = onnx.helper
    raw = {PARAM_PREFIX + p for p in values}
    nodes = [helper.make_node("Identity", [p], [PARAM_PREFIX + p], name=f"param/{p}") for p in values]
    initializers = []
    outputs = sorted(raw)
    for tag, part in parts.items():
        names = {v for n in part.nodes for v in (*n.input, *n.output)} | {t.name for t in part.initializers}
        rename = {v: f"{tag}/{v}" for v in names if v and v not in raw}
        nodes += [copy_node(n, rename, f"{tag}/") for n in part.nodes]
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


def type_personalize(model: onnx.ModelProto, personal: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Give the personalize graph's outputs their exact types (from one run at the exported model's personal
    weights ``personal``); returns that run's outputs: the exported model's personal values."""
    values = personalize(model.SerializeToString(), personal)
    for output in model.graph.output:
        dtype = onnx.helper.np_dtype_to_tensor_dtype(values[output.name].dtype)
        output.CopyFrom(onnx.helper.make_tensor_value_info(output.name, dtype, values[output.name].shape))
    return values


def as_graph_inputs(graph: onnx.GraphProto, names: list[str], values: dict[str, np.ndarray]) -> None:
    """Make each personal value ``names`` (an initializer, or a value cut out into the personalize graph) an
    ordinary input of ``graph``, typed and shaped as in ``values``, after the graph's own inputs."""
    kept = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for name in names:
        dtype = onnx.helper.np_dtype_to_tensor_dtype(values[name].dtype)
        graph.input.append(onnx.helper.make_tensor_value_info(name, dtype, values[name].shape))


def check_personal_read(protos: dict[str, onnx.ModelProto], personal: list[str]) -> None:
    """Every personal parameter must be an initializer that some graph reads, else it was folded away."""
    read = {i for proto in protos.values() for n in proto.graph.node for i in n.input}
    missing = [p for p in personal if PARAM_PREFIX + p not in read]
    if missing:
        raise ExportError(f"personal parameters folded away or renamed at export: {missing}")
