"""Rewrites of exported ONNX graphs that change no value: pruning, naming (the batch dimension, short value
names), the forms onnxruntime fuses or folds, one external weights file shared by the graphs, and the
input/output description written into the bundle manifest."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside their graph
EXTERNAL_ALIGN = 64


def io_spec(values: Sequence[onnx.ValueInfoProto]) -> list[dict[str, Any]]:
    """Name, shape ("batch" for the dynamic dimension) and numpy dtype name of graph inputs or outputs."""
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [dim.dim_value if dim.HasField("dim_value") else "batch" for dim in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        out.append({"name": v.name, "shape": shape, "dtype": dtype})
    return out


def copy_node(node: onnx.NodeProto, rename: dict[str, str] | None = None, prefix: str = "") -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    if rename:
        del out.input[:], out.output[:]
        out.input.extend(rename.get(i, i) for i in node.input)
        out.output.extend(rename.get(o, o) for o in node.output)
    out.name = prefix + node.name
    return out


def replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    del graph.node[:]
    graph.node.extend(nodes)


def prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing reads, then unread initializers, and the value infos (optional shape
    annotations, a tenth of a graph file: onnxruntime and the checker infer them)."""
    while True:
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        keep = [copy_node(n) for n in graph.node if any(o in read for o in n.output)]
        if len(keep) == len(graph.node):
            break
        replace_nodes(graph, keep)
    initializers = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.value_info[:]


def _rename(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename values (node inputs and outputs, graph inputs and outputs, initializers) by ``mapping``."""
    for node in graph.node:
        node.input[:] = [mapping.get(v, v) for v in node.input]
        node.output[:] = [mapping.get(v, v) for v in node.output]
    for value in (*graph.input, *graph.output, *graph.initializer):
        value.name = mapping.get(value.name, value.name)


def short_names(files: dict[str, onnx.ModelProto], personal: dict[str, list[str]]) -> dict[str, list[str]]:
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


def name_batch(graph: onnx.GraphProto) -> None:
    """Name the batch dimension (the exporter's symbol of the first input's first dimension) ``batch``."""
    symbol = graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"


def fusable_gelu(graph: onnx.GraphProto) -> None:
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


def fold_cast_like(graph: onnx.GraphProto) -> None:
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


def externalize(protos: dict[str, onnx.ModelProto], path: Path) -> None:
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
