"""The change a device's local SGD step gives the item rows it did not touch, computed from its output states.

One local SGD step at learning rate ``lr`` changes item-table row ``i`` by ``-lr`` times the gradient of the
step's loss at the arrays the server sent. For an item that the device's training window neither reads nor
targets, only the next-item loss' log-partition reaches that row (:func:`shared_model.softmax_ce.
mean_log_partition`: every item is a softmax negative), and that term depends on the sent arrays and on the
interests the step scored with: per position, each head's coordinates and log-prior. Given those (a sparse
upload with ``sparse_sampling="states"``, :mod:`shared_model.protocol.updates`) the server computes each such
row's change as the device did, and clips it per row as the device clipped its own update, instead of
receiving thousands of rows or estimating them from a sample.
"""

from __future__ import annotations

import numpy as np
import torch

from .protocol.clipping import row_clip_scale
from .protocol.updates import ITEM_TABLES
from .softmax_ce import head_item_tables, mean_log_partition

PROJECTION = (
    "interests.proj"  # (H, k, d): head h scores item i by a_h . (proj_h @ e_i); absent: one head, k = d
)


def state_shape(sent: dict[str, np.ndarray]) -> tuple[int, int]:
    """(heads, coordinates + 1) of one position's output state for the model whose arrays are ``sent``."""
    if PROJECTION in sent:
        heads, k, _ = sent[PROJECTION].shape
        return heads, k + 1
    return 1, sent[ITEM_TABLES[0]].shape[1] + 1


def softmax_change(
    sent: dict[str, np.ndarray],
    states: np.ndarray,
    counts: np.ndarray,
    shares: np.ndarray,
    lr: float,
    row_clip: float,
) -> dict[str, np.ndarray]:
    """The item tables' change (float64, by name in ``ITEM_TABLES``) summed over a reply's users: user ``u``
    owns the next ``counts[u]`` rows of ``states`` (P, H, k + 1; each head's coordinates, then its log-prior) and
    contributes ``shares[u]`` times ``-lr`` x the gradient of its mean log-partition, each item row's change
    first clipped to norm ``row_clip`` (0: off). Row 0 (padding) never changes."""
    emb, bias = (torch.tensor(sent[k], dtype=torch.float32, requires_grad=True) for k in ITEM_TABLES)
    heads = state_shape(sent)[0]
    table = emb[1:]
    tables = (
        head_item_tables(table, torch.from_numpy(sent[PROJECTION]))
        if PROJECTION in sent
        else table.expand(heads, -1, -1)
    )
    total = {k: np.zeros(sent[k].shape) for k in ITEM_TABLES}
    ends = np.cumsum(counts)
    for share, end, count in zip(shares, ends, counts, strict=True):
        state = torch.from_numpy(np.asarray(states[end - count : end], np.float32))
        loss = mean_log_partition(state[..., :-1], state[..., -1], tables, bias[1:])
        change = [-lr * g.double().numpy() for g in torch.autograd.grad(loss, (emb, bias), retain_graph=True)]
        if row_clip > 0:
            scale = row_clip_scale(change, row_clip)
            change = [change[0] * scale[:, None], change[1] * scale]
        for name, c in zip(ITEM_TABLES, change, strict=True):
            total[name] += float(share) * c
    return total
