"""Validation of every incoming update before aggregation: keys, shapes, dtypes, row ids,
finite values, the norm bound and the example weight. A failing update raises :class:`UpdateRejected`."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from shared_model.protocol.updates import (
    ITEM_TABLES,
    Q8,
    ROWS,
    SCALE,
    VALUES,
    decompress,
    densify,
    is_compressed,
    rows_of,
    sampled_names,
    scale_shape,
)


class UpdateRejected(ValueError):
    """An update that must not be averaged; the message says why."""


def expected_keys(
    reference: dict[str, np.ndarray], sparse: bool, compressed: bool = False, sampled: Iterable[str] = ()
) -> set[str]:
    """The keys of a valid update: dense arrays, the item tables as rows when ``sparse``, the ``sampled``
    matrices as rows, each as ``@q8``/``@scale`` pairs when ``compressed``."""
    by_rows = (set(ITEM_TABLES) if sparse else set()) | set(sampled)
    keys = (set(reference) - by_rows) | {n + s for n in by_rows for s in (ROWS, VALUES)}
    if compressed:
        keys = {k for k in keys if k.endswith(ROWS)} | {
            k + s for k in keys if not k.endswith(ROWS) for s in (Q8, SCALE)
        }
    return keys


def _check_int8(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    """dtypes and shapes of an int8 update's quantized arrays and scales (before decoding)."""
    for key in (k.removesuffix(Q8) for k in update if k.endswith(Q8)):
        name = key.removesuffix(VALUES)
        shape = reference[name].shape
        if key.endswith(VALUES):
            shape = (len(update[name + ROWS]), *rows_of(reference[name]).shape[1:])
        q, scale = update[key + Q8], update[key + SCALE]
        if q.dtype != np.int8 or q.shape != shape:
            raise UpdateRejected(f"{key}{Q8}: need int8 of shape {shape}, got {q.dtype} {q.shape}")
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
) -> dict[str, np.ndarray]:
    """Check an update against the arrays the server sent; return it dense. ``max_examples``: the largest
    example weight an honest device can claim (a larger one would outvote the cohort). Raises
    :class:`UpdateRejected`."""
    if not (isinstance(num_examples, int | float) and math.isfinite(num_examples) and num_examples > 0):
        raise UpdateRejected(f"num-examples must be a positive finite number, got {num_examples!r}")
    if num_examples > max_examples:
        raise UpdateRejected(
            f"num-examples {num_examples:g} exceeds what one round trains ({max_examples:g})"
        )
    by_rows = {k.removesuffix(ROWS) for k in update if k.endswith(ROWS)}
    sparse, compressed = bool(by_rows & set(ITEM_TABLES)), is_compressed(update)
    sampled = sorted(by_rows & set(sampled_names(reference)))
    keys, want = set(update), expected_keys(reference, sparse, compressed, sampled)
    if keys != want:
        missing, extra = sorted(want - keys), sorted(keys - want)
        raise UpdateRejected(f"wrong keys: missing {missing[:5]}, unexpected {extra[:5]}")
    for name in [n for n in ITEM_TABLES if n in by_rows] + sorted(by_rows - set(ITEM_TABLES)):
        r, num_rows = update[name + ROWS], len(rows_of(reference[name]))
        if r.dtype != np.int64 or r.ndim != 1:
            raise UpdateRejected(f"{name}{ROWS}: row ids must be a 1-D int64 array")
        if len(r) and (r.min() < 0 or r.max() >= num_rows or len(np.unique(r)) != len(r)):
            raise UpdateRejected(f"{name}{ROWS}: row ids out of range or repeated")
        if name in ITEM_TABLES and not np.array_equal(r, update[ITEM_TABLES[0] + ROWS]):
            raise UpdateRejected(f"{name}{ROWS}: row ids must be the same for every item table")
    if compressed:
        _check_int8(update, reference)
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
    norm = math.sqrt(sum(float(np.sum((dense[k].astype(np.float64) - reference[k]) ** 2)) for k in reference))
    if norm > norm_bound:
        raise UpdateRejected(f"update norm {norm:.3g} exceeds the bound {norm_bound:.3g}")
    return dense
