"""LRURec's preprocessed ``dataset.pkl`` files (order-only user sequences with a leave-one-out split)."""

from __future__ import annotations

from pathlib import Path

from .errors import DataFormatError
from .log import InteractionLog
from .readers import load_plain_pickle


def load_lrurec_pickle(path: Path, name: str) -> InteractionLog:
    """Concatenate ``train + val + test`` per user (the given order) and map items back through ``smap``.

    The pickle is read with a restricted unpickler; any structure other than
    ``{train, val, test: {user: [item, ...]}, umap, smap: {source id: dense id}}`` is a :class:`DataFormatError`.
    """
    data = load_plain_pickle(path)
    if not isinstance(data, dict) or not {"train", "val", "test", "smap"} <= set(data):
        raise DataFormatError(path, "expected a dict with keys train, val, test, smap")
    for key in ("train", "val", "test", "smap"):
        if not isinstance(data[key], dict):
            raise DataFormatError(path, f"{key!r} is not a dict")
    source_of = {}
    for source, dense in data["smap"].items():
        if not isinstance(dense, int):
            raise DataFormatError(path, f"smap[{source!r}] is not an int")
        source_of[dense] = source
    users: list[int] = []
    items: list[object] = []
    for user, seq in data["train"].items():
        full = list(seq) + list(data["val"].get(user, [])) + list(data["test"].get(user, []))
        for item in full:
            if not isinstance(item, int) or item not in source_of:
                raise DataFormatError(path, f"user {user!r}: item {item!r} is not in smap")
            users.append(user)
            items.append(source_of[item])
    extra = (set(data["val"]) | set(data["test"])) - set(data["train"])
    if extra:
        raise DataFormatError(path, f"users in val/test but not in train, e.g. {sorted(extra)[:5]}")
    return InteractionLog.from_events(name, users, items, None, "order")
