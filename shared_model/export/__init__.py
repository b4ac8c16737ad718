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

Personal weights are plain graph inputs (bundle format 3 and later), so every onnxruntime binding (Python, JavaScript,
Java, Objective-C, C#) feeds them with an ordinary ``run()``. Computing a graph's values from its parameters
per event would waste time (the LRU step matrices, lambda powers, ... depend on the personal parameters only),
so the export cuts every subgraph that depends only on personal parameters out of the three graphs into
``personalize.onnx``: what the graphs keep of the personal part are inputs read by non-constant nodes only,
personal parameters used as they are (``model.<name>``) and derived values (``<graph>/<value>``), listed in
:attr:`ExportedGraphs.personal`. A runtime runs ``personalize.onnx`` once per set of weights and feeds each
graph's personal inputs with its outputs of the same name (the Python runtime binds them once,
onnxruntime IOBinding). Nothing personal is baked into a graph: a run without the personal inputs is an error.

The package, in the order an export runs: :mod:`.torch_graphs` (torch modules traced per graph),
:mod:`.personal_split` (the personalize graph cut out), :mod:`.onnx_rewrites` and :mod:`.int8` (value-preserving
rewrites, storage), :mod:`.exporter` (``export_model``, the manifest spec), :mod:`.checks` (onnx/onnxruntime
tool checks)."""

from .checks import check_graphs
from .errors import ExportError
from .exporter import ExportedGraphs, export_model
from .torch_graphs import OPSET

__all__ = ["OPSET", "ExportError", "ExportedGraphs", "check_graphs", "export_model"]
