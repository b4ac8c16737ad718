"""Running the exported graphs (numpy + onnxruntime only, no torch): sessions, the personalize graph and the
bundle's initial personal weights, and the encoder/exclude inputs. Shared by the export checks (``shared_model.export``)
and the on-device runtime (``client_sdk.runtime``); the graph contract is documented in
``shared_model.export``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

MAX_EVENTS = 256  # events the sequence encoder graph takes
# the graph contract (docs/BUNDLE.md): personal values are ordinary graph inputs (since 3), the rank graph reads
# the recurrent states it lists (since 4: the explanation-history counts)
SPEC_FORMAT = 4


def session(
    model: str | Path | bytes,
    threads: int = 1,
    external: Mapping[str, bytes] | None = None,
    batch: int | None = None,
) -> ort.InferenceSession:
    """An onnxruntime session of one graph (a path or the file's bytes) on ``threads`` threads. A graph given
    as bytes reads its external data from ``external`` (file name -> contents; a path finds the files beside
    it). ``batch`` pins the dynamic batch dimension (the runtime's 1: onnxruntime then folds the shape
    arithmetic away)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only (not the optimizer's notes)
    if batch is not None:
        options.add_free_dimension_override_by_name("batch", batch)
    if external:
        names, buffers = list(external), list(external.values())
        options.add_external_initializers_from_files_in_memory(names, buffers, [len(b) for b in buffers])
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_session(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of one run, by name."""
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds)), strict=True))


def initial_personal(spec: Mapping[str, Any], data: bytes) -> dict[str, np.ndarray]:
    """The bundle's initial personal weights from the bytes of ``personal_init.bin``, laid out as the
    personalize inputs of ``spec`` (``spec["personalize"]`` of a bundle) say: float32 at ``offset``, or for the
    ``"int8-rows"`` encoding int8 at ``offset`` times a float32 scale per row (last axis) at ``scales``."""
    values = {}
    for value in spec["inputs"]:
        shape = value["shape"]
        count = int(np.prod(shape, dtype=np.int64))
        if value.get("encoding", "float32") == "int8-rows":
            q = np.frombuffer(data, np.int8, count, value["offset"]).reshape(shape)
            scale = np.frombuffer(data, "<f4", count // shape[-1], value["scales"]).reshape(*shape[:-1], 1)
            values[value["name"]] = q.astype(np.float32) * scale
        else:
            values[value["name"]] = (
                np.frombuffer(data, "<f4", count, value["offset"]).astype(np.float32).reshape(shape)
            )
    return values


def personalize(
    model: str | Path | bytes,
    personal: Mapping[str, np.ndarray],
    external: Mapping[str, bytes] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``personalize.onnx``: every graph's personal inputs for the personal weights ``personal`` (torch
    parameter name -> array, every input of the graph; ``external`` as for :func:`session`). Once per set of
    weights, not per event."""
    feeds = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in personal.items()}
    return run_session(session(model, external=external), feeds)


def encoder_inputs(
    items: Sequence[np.ndarray], times: Sequence[np.ndarray], max_events: int = MAX_EVENTS
) -> dict[str, np.ndarray]:
    """Encoder graph feeds for histories (dense item ids and unix seconds per row, oldest first), left-padded
    to ``max_events``; a longer history is an error (re-encode its last ``max_events`` events instead)."""
    lengths = [len(row) for row in items]
    if max(lengths, default=0) > max_events:
        raise ValueError(
            f"the sequence encoder takes at most {max_events} events per history, got {max(lengths)}; "
            f"pass the last {max_events} events"
        )
    feeds = {
        "items": np.zeros((len(items), max_events), dtype=np.int64),
        "timestamps": np.zeros((len(items), max_events), dtype=np.int64),
        "mask": np.zeros((len(items), max_events), dtype=bool),
    }
    for r, (row_items, row_times, n) in enumerate(zip(items, times, lengths, strict=True)):
        if n:
            feeds["items"][r, -n:] = row_items
            feeds["timestamps"][r, -n:] = row_times
            feeds["mask"][r, -n:] = True
    return feeds


def exclude_mask(items: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """The ``exclude`` input (rows, num_items) bool: True at each row's seen items."""
    mask = np.zeros((len(items), num_items), dtype=bool)
    for r, row in enumerate(items):
        mask[r, row] = True
    return mask


def rank_states(spec: Mapping[str, Any], states: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The recurrent states among ``states`` that ``rank.onnx`` reads besides ``state`` and ``exclude`` (those
    of ``spec["states"]`` its inputs list, e.g. ``explanation_history``)."""
    return {
        i["name"]: states[i["name"]] for i in spec["graphs"]["rank"]["inputs"] if i["name"] in spec["states"]
    }
