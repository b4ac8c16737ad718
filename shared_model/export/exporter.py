"""``export_model``: a TME-PSR model to the bundle's graphs and weight files (the format is described in
:mod:`shared_model.export`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..graph_io import MAX_EVENTS, SPEC_FORMAT
from ..model import TMEPSR
from ..partition import parameter_groups
from ..sequence_model import SequenceModel
from .errors import ExportError
from .int8 import int8_initializers, write_initial_weights
from .onnx_rewrites import externalize, fold_cast_like, fusable_gelu, io_spec, name_batch, prune, short_names
from .personal_split import (
    PARAM_PREFIX,
    as_graph_inputs,
    check_personal_read,
    detach_personal,
    personalize_model,
    type_personalize,
)
from .torch_graphs import OPSET, AttestedTable, export_graphs, initial_states, state_names

GRAPH_FILES = {
    "step": "step.onnx",
    "rank": "rank.onnx",
    "encoder": "encoder.onnx",
    "personalize": "personalize.onnx",
}
WEIGHTS_FILE = "weights.bin"
PERSONAL_INIT_FILE = "personal_init.bin"
STEP_TOP_K = 10  # default ranking width of the step graph: the items shown per event


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
        0
        if attested is None
        else min(num_explanations_out, model.cfg.num_explanations, len(attested.offsets))
    )
    protos = export_graphs(model, top_k, step_top_k, num_expl, attested)
    io = {}
    for name, proto in protos.items():  # GELUs in the form onnxruntime fuses, typed scalar constants folded
        fusable_gelu(proto.graph)
        fold_cast_like(proto.graph)
        io[name] = {"inputs": io_spec(proto.graph.input), "outputs": io_spec(proto.graph.output)}
    check_personal_read(protos, personal)
    parts, personal_inputs = {}, {}
    for name, proto in protos.items():
        parts[name], personal_inputs[name] = detach_personal(
            proto.graph, name, {PARAM_PREFIX + p for p in personal}
        )
    personalize = personalize_model(parts, values)
    derived = type_personalize(personalize, values)
    for name, proto in protos.items():
        as_graph_inputs(proto.graph, personal_inputs[name], derived)
        prune(proto.graph)
        name_batch(proto.graph)
        if int8:
            int8_initializers(proto.graph)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / GRAPH_FILES[g] for g in GRAPH_FILES] + [
        out_dir / WEIGHTS_FILE,
        out_dir / PERSONAL_INIT_FILE,
    ]
    files = protos | {"personalize": personalize}
    if int8:  # the personalize graph reads shared tables too (e.g. the item table for the head tables)
        int8_initializers(personalize.graph)
    personal_inputs = short_names(files, personal_inputs)
    for name, proto in protos.items():
        io[name]["inputs"] = io_spec(proto.graph.input)
    externalize(files, paths[-2])
    layout = write_initial_weights(values, paths[-1], int8)
    for name, proto in files.items():
        onnx.save_model(proto, out_dir / GRAPH_FILES[name])
    states = {
        name: {"shape": list(s.shape[1:]), "dtype": "float32"}
        for name, s in zip(state_names(model), initial_states(model, 1), strict=True)
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
            "inputs": [v | layout[v["name"]] for v in io_spec(personalize.graph.input)],
            "outputs": io_spec(personalize.graph.output),
            "initial": PERSONAL_INIT_FILE,
        },
    }
    return ExportedGraphs(*paths, personal_inputs, spec)
