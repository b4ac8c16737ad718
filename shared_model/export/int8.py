"""int8 bundles: float matrices stored as int8 rows with per-row scales, in the graphs (rebuilt in-graph, folded
once per session) and in the initial personal weights file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

INT8_MIN_ELEMENTS = 1024  # an int8 bundle stores float matrices at least this large as int8 rows


def int8_rows(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row of the last axis: ``q`` (int8, the array's shape) and ``scale`` (float32, one per
    row, ``max|row| / 127``, 1 for a zero row), ``array ~= q * scale[..., None]``."""
    scale = np.abs(array).max(-1) / 127
    scale = np.where(scale > 0, scale, 1).astype(np.float32)
    return np.clip(np.round(array / scale[..., None]), -127, 127).astype(np.int8), scale


def _quantizable(shape: Sequence[int]) -> bool:
    return len(shape) >= 2 and int(np.prod(shape)) >= INT8_MIN_ELEMENTS


def int8_initializers(graph: onnx.GraphProto) -> None:
    """Store each float32 initializer matrix of at least ``INT8_MIN_ELEMENTS`` as int8 rows (``<name>.q``) with
    per-row scales (``<name>.scale``), rebuilt in-graph by Cast and Mul nodes under its old name; onnxruntime
    folds them once per session, so a run costs what it did."""
    rebuild, kept = [], []
    for tensor in graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or not _quantizable(tensor.dims):
            kept.append(tensor)
            continue
        q, scale = int8_rows(onnx.numpy_helper.to_array(tensor))
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


def write_initial_weights(values: dict[str, np.ndarray], path: Path, int8: bool) -> dict[str, dict[str, Any]]:
    """The initial personal weights back to back (row-major, little-endian): float32, or with ``int8`` each
    matrix of at least ``INT8_MIN_ELEMENTS`` as int8 rows followed by its float32 scales. Returns each array's
    layout: ``offset`` and ``encoding`` (``"float32"`` or ``"int8-rows"`` with the ``scales`` offset)."""
    layout, blob = {}, bytearray()
    for name, value in values.items():
        if int8 and _quantizable(value.shape):
            q, scale = int8_rows(value)
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
