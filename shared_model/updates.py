"""The shared-update codec both sides speak (pure numpy, no Flower): dense arrays, or row-sparse item tables.

A sparse update sends, for each item table (``item_emb.weight``, ``item_bias``), only the rows the device
touched (plus optional random decoy rows) as ``<name>@rows`` (int64 row ids) and ``<name>@values``; every
other shared array goes dense. The server densifies a sparse update against the arrays it sent, so FedAvg
over dense and over sparse updates differ only in rows a device did not send.
"""

from __future__ import annotations

import numpy as np

ITEM_TABLES = ("item_emb.weight", "item_bias")
ROWS, VALUES = "@rows", "@values"


def encode_sparse(
    arrays: dict[str, np.ndarray], touched_rows: np.ndarray, decoys: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Row-sparse form of ``arrays``: item tables keep ``touched_rows`` plus ``decoys`` random other rows."""
    out = {k: v for k, v in arrays.items() if k not in ITEM_TABLES}
    num_rows = len(arrays[ITEM_TABLES[0]])
    rows = np.unique(np.asarray(touched_rows, dtype=np.int64))
    if decoys:
        free = np.setdiff1d(np.arange(num_rows), rows)
        rows = np.union1d(rows, rng.choice(free, size=min(decoys, len(free)), replace=False))
    for name in ITEM_TABLES:
        out[name + ROWS] = rows
        out[name + VALUES] = arrays[name][rows]
    return out


def is_sparse(update: dict[str, np.ndarray]) -> bool:
    return any(k.endswith(ROWS) for k in update)


def densify(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Dense arrays from a sparse update: rows not sent keep the ``reference`` (sent) values."""
    if not is_sparse(update):
        return dict(update)
    out = {k: v for k, v in update.items() if ROWS not in k and VALUES not in k}
    for name in ITEM_TABLES:
        table = reference[name].copy()
        table[update[name + ROWS]] = update[name + VALUES]
        out[name] = table
    return out
