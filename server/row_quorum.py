"""Row quorum: an item row is promoted only by a quorum of distinct devices.

A device *supports* an item when its update raises the item's bias (``item_bias``: its training window had the
item as a target more often than the model predicted it; a device that never saw the item lowers it, through
the softmax over all items). The server remembers, per item row, the distinct devices that have supported it
so far (a device's stable identity: its partition in a simulation, its node id in a deployment), up to
``quorum`` of them. Until a row has ``quorum`` supporters it is *held*: in every update its embedding row keeps
the sent value and its bias may only go down. Once it has them it is open for good, and its supporters are
forgotten.

Why: under FedAdam every coordinate steps by its mean change divided by its own running RMS, so an item that
honest devices barely move (a cold item) takes full server steps in whatever direction a few devices push it,
however small their clipped push (``THREAT_MODEL.md``, poisoning). A mean cannot tell a handful of fabricated
fans from real ones; the count of distinct devices can: ``a`` attacking devices promote an item only if at least
``quorum - a`` honest devices support it too. The cost is that items fewer than ``quorum`` devices ever trained
on are not learned upwards, and such items are rarely anyone's next event (measured in
``simulations/results/poisoning.md``).

What the server keeps: for each held row, the identities of up to ``quorum - 1`` devices whose updates raised
that item's bias (it could read the same from the updates it sees). Under SecAgg+ the server sees only the sum
of a cohort's updates, so no row is held (``server.secagg``).
"""

from __future__ import annotations

import numpy as np

from shared_model.protocol.updates import ITEM_TABLES

ITEM_EMBEDDING, ITEM_BIAS = ITEM_TABLES
# supporters are device identities: partition ids, or Flower node ids, which are unsigned 64-bit integers
UNSET = np.iinfo(np.uint64).max  # an empty supporter slot


class RowQuorum:
    """The supporters of each item row (``rows`` of them, row 0 the padding) and the hold on rows without a
    quorum of ``quorum`` distinct devices."""

    def __init__(self, quorum: int, rows: int) -> None:
        if quorum < 1:
            raise ValueError(f"quorum must be >= 1, got {quorum}")
        self.quorum = quorum
        self.supporters = np.full((rows, quorum), UNSET, np.uint64)
        self.count = np.zeros(rows, np.int64)

    @property
    def open_rows(self) -> np.ndarray:
        """(rows,) True where a row has its quorum."""
        return self.count >= self.quorum

    def observe(self, device: int, update: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> None:
        """Count ``device`` among the supporters of every held row whose bias its (dense) ``update`` raises
        above ``sent``; a device counts once per row."""
        rows = np.flatnonzero((update[ITEM_BIAS] > sent[ITEM_BIAS]) & ~self.open_rows)
        device = np.uint64(device)
        rows = rows[~(self.supporters[rows] == device).any(axis=1)]
        self.supporters[rows, self.count[rows]] = device
        self.count[rows] += 1
        self.supporters[rows[self.count[rows] >= self.quorum]] = UNSET  # open for good: forget who

    def hold(self, update: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> tuple[dict, int]:
        """``update`` with every held row's embedding at its sent value and its bias at most its sent value,
        and the number of held rows whose bias it raised (the promotions held back)."""
        held = ~self.open_rows
        bias = update[ITEM_BIAS]
        raised = held & (bias > sent[ITEM_BIAS])
        emb = np.where(held[:, None], sent[ITEM_EMBEDDING], update[ITEM_EMBEDDING])
        bias = np.where(raised, sent[ITEM_BIAS], bias)
        return update | {ITEM_EMBEDDING: emb, ITEM_BIAS: bias}, int(raised.sum())

    def state(self) -> dict[str, np.ndarray]:
        """For the server checkpoint."""
        return {"row-quorum/supporters": self.supporters, "row-quorum/count": self.count}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`state`; a checkpoint without it (or of another quorum or catalogue) leaves the
        registry empty, so rows open again as devices support them. (A checkpoint written with signed
        identities, -1 for an empty slot, reads the same.)"""
        supporters = state.get("row-quorum/supporters")
        if supporters is not None and supporters.shape == self.supporters.shape:
            self.supporters = np.asarray(supporters).astype(np.uint64)
            self.count = np.asarray(state["row-quorum/count"], np.int64).copy()
