"""Feeding the exported graphs (numpy + onnxruntime only, no torch): sessions with personal-weight overrides
and the encoder/exclude inputs. Shared by the export checks (``shared_model.export``) and the on-device
runtime (``client_sdk.runtime``); the graph contract itself is documented in ``shared_model.export``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

MAX_EVENTS = 256  # events the sequence encoder graph takes


def ort_session(
    model: str | Path | bytes,
    personal: Mapping[str, np.ndarray] | None = None,
    spec: Mapping[str, Any] | None = None,
    graph: str | None = None,
    threads: int = 1,
) -> ort.InferenceSession:
    """An onnxruntime session of one graph (a path, or the file's bytes with ``graph`` naming it in ``spec``);
    ``personal`` (torch parameter name -> array) overrides the personal initializers that graph holds."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only (not the optimizer's notes on nodes it cannot fold)
    values = []
    if personal:
        if spec is None:
            raise ValueError("personal overrides need the export spec (initializer names)")
        name = graph or Path(str(model)).stem
        for param in spec["graphs"][name]["personal"]:
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(personal[param], dtype=np.float32))
            options.add_initializer(spec["personal_initializers"][param], value)
            values.append(value)
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    session.personal_values = values  # onnxruntime does not copy overriding initializers: keep them alive
    return session


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
