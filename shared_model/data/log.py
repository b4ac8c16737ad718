"""The canonical in-memory form of every dataset: an :class:`InteractionLog`.

Events are stored column-wise and sorted by user, then by the protocol's order:
``(timestamp, item id)`` for timestamped data, the given order for order-only data. Users and items are
dense indices ``0..n-1``; ``user_ids`` / ``item_ids`` map them back to the source ids. Per-event explanation
labels and per-item attributes are ragged lists kept in CSR form (``ptr``, ``ids``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np

TimeUnit = Literal["seconds", "days", "order"]


@dataclass(frozen=True, eq=False)
class Ragged:
    """A list of integer lists in CSR form: row ``r`` is ``ids[ptr[r]:ptr[r + 1]]``."""

    ptr: np.ndarray
    ids: np.ndarray

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]]) -> Ragged:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        ptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=ptr[1:])
        ids = np.fromiter((x for r in rows for x in r), dtype=np.int64, count=int(ptr[-1]))
        return cls(ptr, ids)

    @classmethod
    def empty(cls, n_rows: int) -> Ragged:
        return cls(np.zeros(n_rows + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ptr) - 1

    def row(self, r: int) -> np.ndarray:
        return self.ids[self.ptr[r] : self.ptr[r + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.ptr)

    def take(self, rows: np.ndarray) -> Ragged:
        """The rows ``rows`` (any order, repeats allowed) as a new :class:`Ragged`."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.ptr[rows + 1] - self.ptr[rows]
        ptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=ptr[1:])
        # index of every element: start of its source row + offset inside the row
        starts = np.repeat(self.ptr[rows] - ptr[:-1], lengths)
        return Ragged(ptr, self.ids[starts + np.arange(ptr[-1], dtype=np.int64)])


@dataclass(frozen=True, eq=False)
class ExplanationVocab:
    """Explanation ids ``0..n-1`` with a human-readable text each, and the rule that produced the labels."""

    texts: tuple[str, ...]
    rule: str

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True, eq=False)
class ItemMeta:
    """Optional item metadata: titles and named attributes (genres, brand/category terms, tags)."""

    titles: tuple[str, ...] | None = None
    attribute_names: tuple[str, ...] = ()
    attributes: Ragged | None = None  # per item: attribute ids into attribute_names


@dataclass(frozen=True, eq=False)
class InteractionLog:
    """Events of all users, sorted by (user, protocol order). Build it with :meth:`from_events`."""

    name: str
    user: np.ndarray  # int64 dense user per event, non-decreasing
    item: np.ndarray  # int64 dense item per event
    time: np.ndarray  # int64: unix seconds (day-aligned for "days") or position for "order"
    time_unit: TimeUnit
    user_ids: np.ndarray  # source id of each dense user
    item_ids: np.ndarray  # source id of each dense item
    explanations: Ragged  # per event: explanation ids (possibly none)
    vocab: ExplanationVocab = field(default_factory=lambda: ExplanationVocab((), "none"))
    item_meta: ItemMeta = field(default_factory=ItemMeta)

    @classmethod
    def from_events(
        cls,
        name: str,
        users: Sequence[object] | np.ndarray,
        items: Sequence[object] | np.ndarray,
        times: Sequence[int] | np.ndarray | None,
        time_unit: TimeUnit,
        explanations: Ragged | None = None,
        vocab: ExplanationVocab | None = None,
        item_universe: Sequence[object] | np.ndarray | None = None,
        item_meta: ItemMeta | None = None,
    ) -> InteractionLog:
        """Densify ids, sort events as the protocol says and validate everything.

        ``users``/``items`` are source ids (ints or strings). For ``time_unit="order"`` pass ``times=None``
        and list each user's events in their given order. ``item_universe`` (sorted source ids) fixes the
        item index when metadata is indexed by it; otherwise items are the sorted distinct source ids, so
        ties on time break by source item id. ``item_meta`` must be indexed like the item universe.
        """
        users_a = np.asarray(users)
        items_a = np.asarray(items)
        n = len(users_a)
        if n == 0:
            raise ValueError(f"{name}: no events")
        if len(items_a) != n:
            raise ValueError(f"{name}: {n} users but {len(items_a)} items")
        user_ids, user = np.unique(users_a, return_inverse=True)
        if item_universe is None:
            item_ids, item = np.unique(items_a, return_inverse=True)
        else:
            item_ids = np.asarray(item_universe)
            item = np.searchsorted(item_ids, items_a)
            item = np.minimum(item, len(item_ids) - 1)
            if not np.array_equal(item_ids[item], items_a):
                raise ValueError(f"{name}: events refer to items outside item_universe")
        user = user.astype(np.int64)
        item = item.astype(np.int64)
        if time_unit == "order":
            if times is not None:
                raise ValueError(f"{name}: order-only data takes times=None")
            order = np.argsort(user, kind="stable")
            time = np.zeros(n, dtype=np.int64)
        else:
            time = np.asarray(times, dtype=np.int64)
            if len(time) != n:
                raise ValueError(f"{name}: {n} events but {len(time)} timestamps")
            order = np.lexsort((item, time, user))
        user, item, time = user[order], item[order], time[order]
        if time_unit == "order":  # position of each event inside its user's sequence
            starts = np.searchsorted(user, user, side="left")
            time = np.arange(n, dtype=np.int64) - starts
        expl = Ragged.empty(n) if explanations is None else explanations.take(order)
        vocab = vocab or ExplanationVocab((), "none")
        if len(expl.ids) and (expl.ids.min() < 0 or expl.ids.max() >= len(vocab)):
            raise ValueError(f"{name}: explanation ids outside the vocabulary of {len(vocab)}")
        meta = item_meta or ItemMeta()
        if meta.titles is not None and len(meta.titles) != len(item_ids):
            raise ValueError(f"{name}: {len(meta.titles)} titles for {len(item_ids)} items")
        return cls(name, user, item, time, time_unit, user_ids, item_ids, expl, vocab, meta)

    # ------------------------------------------------------------------ sizes and per-user views
    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_events(self) -> int:
        return len(self.user)

    @cached_property
    def user_ptr(self) -> np.ndarray:
        """Event offsets per user: user ``u`` owns events ``user_ptr[u]:user_ptr[u + 1]``."""
        return np.searchsorted(self.user, np.arange(self.num_users + 1), side="left").astype(np.int64)

    def sequence_lengths(self) -> np.ndarray:
        return np.diff(self.user_ptr)

    def user_items(self, u: int) -> np.ndarray:
        return self.item[self.user_ptr[u] : self.user_ptr[u + 1]]

    def with_explanations(self, explanations: Ragged, vocab: ExplanationVocab) -> InteractionLog:
        """The same log with new per-event labels (indexed like this log's events)."""
        if len(explanations) != self.num_events:
            raise ValueError(f"{len(explanations)} label rows for {self.num_events} events")
        if len(explanations.ids) and explanations.ids.max() >= len(vocab):
            raise ValueError("explanation ids outside the vocabulary")
        return InteractionLog(
            self.name,
            self.user,
            self.item,
            self.time,
            self.time_unit,
            self.user_ids,
            self.item_ids,
            explanations,
            vocab,
            self.item_meta,
        )
