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
    VALUES,
    decompress,
    densify,
    packed_shape,
    quantized_suffix,
    rows_of,
    sampled_names,
    scale_shape,
)


class UpdateRejected(ValueError):
    """An update that must not be averaged; the message says why."""


def expected_keys(
    reference: dict[str, np.ndarray], sparse: bool, quantized: str | None = None, sampled: Iterable[str] = ()
) -> set[str]:
    """The keys of a valid update: dense arrays, the item tables as rows when ``sparse``, the ``sampled``
    matrices as rows, each as ``<quantized>``/``@scale`` pairs when ``quantized`` (``@q8`` or ``@q4``)."""
    by_rows = (set(ITEM_TABLES) if sparse else set()) | set(sampled)
    keys = (set(reference) - by_rows) | {n + s for n in by_rows for s in (ROWS, VALUES)}
    if quantized:
        keys = {k for k in keys if k.endswith(ROWS)} | {
            k + s for k in keys if not k.endswith(ROWS) for s in (quantized, SCALE)
        }
    return keys


def _check_quantized(update: dict[str, np.ndarray], reference: dict[str, np.ndarray], suffix: str) -> None:
    """dtypes and shapes of a compressed update's quantized arrays and scales (before decoding)."""
    dtype = np.int8 if suffix == Q8 else np.uint8
    for key in (k.removesuffix(suffix) for k in update if k.endswith(suffix)):
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
    sparse, quantized = bool(by_rows & set(ITEM_TABLES)), quantized_suffix(update)
    sampled = sorted(by_rows & set(sampled_names(reference)))
    keys, want = set(update), expected_keys(reference, sparse, quantized, sampled)
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
    if quantized:
        _check_quantized(update, reference, quantized)
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
