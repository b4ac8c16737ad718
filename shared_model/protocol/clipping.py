"""Update clipping against model poisoning: the server applies it to each validated (dense) update before
aggregation; under SecAgg+, where the server never sees one update, each device applies it to its own update
before masking (which bounds honest devices only: the server can check just the sum, see ``server.secagg``).

* ``row_clip``: each item's change in the item tables (``shared_model.protocol.updates.ITEM_TABLES``: its embedding
  row and its bias, taken together) is scaled down to at most this L2 norm. An item-promotion attacker has
  to move the target item's rows a long way; honest devices move each row a little.
* ``clip_norm``: the whole update's change (all shared arrays) is scaled down to at most this L2 norm, so a
  boosted update counts no more than an honest one of that size.

Row clipping runs first, so the norm clip sees the row-clipped change. Changes are computed in float64 and
the result is cast back to the dtypes the server sent. The robust aggregates (coordinate-wise trimmed mean
and median) are ``server.robust.RobustAggregate`` behind the validation of ``server.validated``.

Sparse uploads and robust aggregates: validation densifies a sparse update, so every item row a device did
not send equals the sent value (zero change). Per coordinate, a trimmed mean with fraction ``b`` over ``n``
updates drops the ``floor(b * n)`` largest and smallest values: an item row that fewer than ``floor(b * n)``
devices moved (in one direction) keeps none of their change, and the median moves a row only when more than
half of the devices moved it. That is what stops a few devices from promoting a cold item, and it is also
what slows the learning of honest long-tail items (dense uploads soften it a little: every row changes
slightly through weight decay and the softmax over all items, but in no consistent direction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared_model.protocol.updates import ITEM_TABLES


@dataclass(frozen=True)
class Clipped:
    """A clipped update and what clipping did to it."""

    arrays: dict[str, np.ndarray]
    norm_clipped: bool  # the whole update was scaled down to clip_norm
    rows_clipped: int  # item rows scaled down to row_clip


def row_clip_scale(changes: list[np.ndarray], row_clip: float) -> np.ndarray:
    """Per item row, the factor (<= 1) that scales its change, taken over all ``changes`` (the item tables'
    changes, rows along the first axis) together, down to L2 norm ``row_clip``."""
    norm = np.sqrt(sum(np.sum(c.reshape(len(c), -1) ** 2, axis=1) for c in changes))
    return np.minimum(1.0, row_clip / np.maximum(norm, 1e-300))


def clip_update(
    update: dict[str, np.ndarray], sent: dict[str, np.ndarray], clip_norm: float, row_clip: float
) -> Clipped:
    """Clip a dense update's change from ``sent``: per item row to ``row_clip``, then in all to ``clip_norm``
    (0 switches either off). Returns arrays of the sent dtypes."""
    delta = {k: update[k].astype(np.float64) - sent[k] for k in sent}
    rows_clipped = 0
    tables = [k for k in ITEM_TABLES if k in delta]
    if row_clip > 0 and tables:
        scale = row_clip_scale([delta[k] for k in tables], row_clip)
        rows_clipped = int(np.sum(scale < 1))
        for k in tables:
            delta[k] = delta[k] * scale.reshape((-1,) + (1,) * (delta[k].ndim - 1))
    norm = float(np.sqrt(sum(np.sum(d**2) for d in delta.values())))
    norm_clipped = 0 < clip_norm < norm
    factor = clip_norm / norm if norm_clipped else 1.0
    if not (norm_clipped or rows_clipped):
        return Clipped({k: update[k] for k in sent}, False, 0)
    arrays = {k: (sent[k] + factor * d).astype(sent[k].dtype) for k, d in delta.items()}
    return Clipped(arrays, norm_clipped, rows_clipped)
