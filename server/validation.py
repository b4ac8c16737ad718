"""Validation of every incoming update before aggregation: keys, shapes, dtypes, row ids,
finite values, the norm bound and the example weight. A failing update raises :class:`UpdateRejected`."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from shared_model.protocol.updates import (
    ITEM_TABLES,
    Q4,
    Q8,
    ROW_IDS,
    ROWS,
    SCALE,
    STATE_COUNTS,
    STATE_KEYS,
    STATE_SHARES,
    STATES,
    VALUES,
    compression,
    decompress,
    densify,
    packed_shape,
    quantized_suffix,
    rows_of,
    sampled_names,
    scale_shape,
    split_states,
)
from shared_model.softmax_change import softmax_change, state_shape


class UpdateRejected(ValueError):
    """An update that must not be averaged; the message says why."""


def expected_keys(
    reference: dict[str, np.ndarray],
    sparse: bool,
    compression: str | None = None,
    sampled: Iterable[str] = (),
) -> set[str]:
    """The keys of a valid update: dense arrays, the item tables as rows when ``sparse``, the ``sampled``
    matrices as rows, each as ``@q8``/``@q4`` and ``@scale`` pairs when compressed (``int8`` or ``int4``;
    :func:`~shared_model.protocol.updates.quantized_suffix` says which)."""
    by_rows = (set(ITEM_TABLES) if sparse else set()) | set(sampled)
    keys = (set(reference) - by_rows) | {n + s for n in by_rows for s in (ROWS, VALUES)}
    if compression:
        keys = {k for k in keys if k.endswith(ROWS)} | {
            k + s
            for k in keys
            if not k.endswith(ROWS)
            for s in (quantized_suffix(compression, reference[k.removesuffix(VALUES)].ndim), SCALE)
        }
    return keys


def _check_quantized(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    """dtypes and shapes of a compressed update's quantized arrays and scales (before decoding)."""
    for key, suffix in ((k[: -len(s)], s) for k in update for s in (Q8, Q4) if k.endswith(s)):
        dtype = np.int8 if suffix == Q8 else np.uint8
        name = key.removesuffix(VALUES)
        shape = reference[name].shape
        if key.endswith(VALUES):
            shape = (len(update[name + ROWS]), *rows_of(reference[name]).shape[1:])
        q, scale = update[key + suffix], update[key + SCALE]
        if q.dtype != dtype or q.shape != packed_shape(suffix, shape):
            raise UpdateRejected(
                f"{key}{suffix}: need {np.dtype(dtype)} of shape {packed_shape(suffix, shape)}, got {q.dtype} {q.shape}"
            )
        if suffix == Q4 and (((q & 0x0F) == 8).any() or ((q >> 4) == 8).any()):
            raise UpdateRejected(f"{key}{Q4}: level -8 is outside -7..7")
        if scale.dtype != np.float32 or scale.shape != scale_shape(shape):
            raise UpdateRejected(
                f"{key}{SCALE}: need float32 of shape {scale_shape(shape)}, got {scale.dtype} {scale.shape}"
            )
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            raise UpdateRejected(f"{key}{SCALE}: scales must be finite and >= 0")


def validate_update(
    update: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    num_examples: float,
    norm_bound: float,
    max_examples: float = math.inf,
    states_lr: float = 0.0,
    row_clip: float = 0.0,
) -> dict[str, np.ndarray]:
    """Check an update against the arrays the server sent; return it dense. ``max_examples``: the largest
    example weight an honest device can claim (a larger one would outvote the cohort). A sparse update with
    output states (``sparse_sampling="states"``) gets every item row it did not send from them, as one local
    SGD step at ``states_lr`` changed it, clipped per row to ``row_clip`` (``states_lr`` 0: such updates are
    refused). Raises :class:`UpdateRejected`."""
    update, states = split_states(update)
    if not (isinstance(num_examples, int | float) and math.isfinite(num_examples) and num_examples > 0):
        raise UpdateRejected(f"num-examples must be a positive finite number, got {num_examples!r}")
    if num_examples > max_examples:
        raise UpdateRejected(
            f"num-examples {num_examples:g} exceeds what one round trains ({max_examples:g})"
        )
    by_rows = {k.removesuffix(ROWS) for k in update if k.endswith(ROWS)}
    sparse, compressed = bool(by_rows & set(ITEM_TABLES)), compression(update)
    sampled = sorted(by_rows & set(sampled_names(reference)))
    keys, want = set(update), expected_keys(reference, sparse, compressed, sampled)
    if keys != want:
        missing, extra = sorted(want - keys), sorted(keys - want)
        raise UpdateRejected(f"wrong keys: missing {missing[:5]}, unexpected {extra[:5]}")
    for name in [n for n in ITEM_TABLES if n in by_rows] + sorted(by_rows - set(ITEM_TABLES)):
        r, num_rows = update[name + ROWS], len(rows_of(reference[name]))
        if r.dtype != ROW_IDS or r.ndim != 1:
            raise UpdateRejected(f"{name}{ROWS}: row ids must be a 1-D {np.dtype(ROW_IDS)} array")
        if len(r) and (r.min() < 0 or r.max() >= num_rows or len(np.unique(r)) != len(r)):
            raise UpdateRejected(f"{name}{ROWS}: row ids out of range or repeated")
        if name in ITEM_TABLES and not np.array_equal(r, update[ITEM_TABLES[0] + ROWS]):
            raise UpdateRejected(f"{name}{ROWS}: row ids must be the same for every item table")
    if compressed:
        _check_quantized(update, reference)
        update = decompress(update, reference)
    for name in sorted(by_rows):
        want_shape = (len(update[name + ROWS]), *rows_of(reference[name]).shape[1:])
        if update[name + VALUES].shape != want_shape:
            raise UpdateRejected(f"{name}{VALUES}: shape {update[name + VALUES].shape} != {want_shape}")
    for key, value in update.items():
        if key.endswith(ROWS):
            continue
        ref = reference[key.removesuffix(VALUES)]
        if value.dtype != ref.dtype:
            raise UpdateRejected(f"{key}: dtype {value.dtype} != {ref.dtype}")
        if not key.endswith(VALUES) and value.shape != ref.shape:
            raise UpdateRejected(f"{key}: shape {value.shape} != {ref.shape}")
        if not np.isfinite(value).all():
            raise UpdateRejected(f"{key}: non-finite values")
    dense = densify(update, reference)
    if states is not None:
        dense = _with_state_change(dense, update, reference, states, states_lr, row_clip)
    norm = math.sqrt(sum(float(np.sum((dense[k].astype(np.float64) - reference[k]) ** 2)) for k in reference))
    if norm > norm_bound:
        raise UpdateRejected(f"update norm {norm:.3g} exceeds the bound {norm_bound:.3g}")
    return dense


def _with_state_change(
    dense: dict[str, np.ndarray],
    update: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    states: dict[str, np.ndarray],
    lr: float,
    row_clip: float,
) -> dict[str, np.ndarray]:
    """``dense`` with the change of every item row the sparse ``update`` did not send added, computed from its
    output ``states`` (:func:`shared_model.softmax_change.softmax_change`) after checking them."""
    if not lr > 0:
        raise UpdateRejected(
            "this server takes no output states (sparse_sampling='states' is not configured)"
        )
    if set(states) != set(STATE_KEYS) or ITEM_TABLES[0] + ROWS not in update:
        raise UpdateRejected(f"output states need {list(STATE_KEYS)} and the item tables as rows")
    values, counts, shares = states[STATES], states[STATE_COUNTS], states[STATE_SHARES]
    heads, width = state_shape(reference)
    if values.dtype not in (np.float32, np.float16) or values.ndim != 3 or values.shape[1:] != (heads, width):
        raise UpdateRejected(
            f"{STATES}: need float32 or float16 of shape (positions, {heads}, {width}), got {values.dtype}"
            f" {values.shape}"
        )
    if counts.dtype != np.int32 or counts.ndim != 1 or not len(counts) or (counts < 1).any():
        raise UpdateRejected(f"{STATE_COUNTS}: need a non-empty 1-D int32 array of counts >= 1")
    if int(counts.sum()) != len(values):
        raise UpdateRejected(
            f"{STATE_COUNTS}: counts sum to {int(counts.sum())}, not {len(values)} positions"
        )
    if shares.dtype != np.float32 or shares.shape != counts.shape:
        raise UpdateRejected(f"{STATE_SHARES}: need float32 of shape {counts.shape}")
    if not (np.isfinite(shares).all() and (shares > 0).all() and abs(float(shares.sum()) - 1) <= 1e-3):
        raise UpdateRejected(f"{STATE_SHARES}: shares must be finite, > 0 and sum to 1")
    if not np.isfinite(values).all():
        raise UpdateRejected(f"{STATES}: non-finite values")
    change = softmax_change(reference, values, counts, shares, lr, row_clip)
    untouched = np.ones(len(reference[ITEM_TABLES[0]]), dtype=bool)
    untouched[update[ITEM_TABLES[0] + ROWS]] = False
    out = dict(dense)
    for name in ITEM_TABLES:
        table = dense[name].astype(np.float64)
        table[untouched] += change[name][untouched]
        out[name] = table.astype(reference[name].dtype)
    return out
