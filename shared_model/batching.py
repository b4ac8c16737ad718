"""Left-padded tensor batches from an :class:`InteractionLog` (training windows and evaluation inputs).

Item ids are shifted by one (0 = padding). Sequences are left-padded so that the last position is the most
recent event, and so that the recurrent state is untouched by padding. The same code builds batches for
centralized training, for one device's local training and for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .data.log import InteractionLog, Ragged


@dataclass
class Batch:
    """Model input: ``items``/``times``/``mask`` (B, L). Training targets are optional.

    ``targets`` (B, L): the next item (+1) after each position, 0 where there is none. Explanation labels of
    those next events: ``expl_pos`` (flat index into B*L), ``expl_ids`` and ``expl_weight`` (1/#labels).
    """

    items: Tensor
    times: Tensor
    mask: Tensor
    targets: Tensor | None = None
    expl_pos: Tensor | None = None
    expl_ids: Tensor | None = None
    expl_weight: Tensor | None = None

    def to(self, device: str | torch.device) -> Batch:
        return Batch(*(None if t is None else t.to(device) for t in self.__dict__.values()))


def _pad(rows: list[np.ndarray], length: int, fill: int = 0) -> np.ndarray:
    out = np.full((len(rows), length), fill, dtype=np.int64)
    for r, row in enumerate(rows):
        if len(row):
            out[r, length - len(row) :] = row
    return out


def input_batch(log: InteractionLog, starts: np.ndarray, ends: np.ndarray, max_len: int) -> Batch:
    """Inputs made of events ``[max(start, end - max_len), end)`` for each row (for prediction/evaluation)."""
    lo = np.maximum(starts, ends - max_len)
    items = _pad([log.item[a:b] + 1 for a, b in zip(lo, ends, strict=True)], max_len)
    times = _pad([log.time[a:b] for a, b in zip(lo, ends, strict=True)], max_len)
    items_t = torch.from_numpy(items)
    return Batch(items_t, torch.from_numpy(times), items_t > 0)


def training_batch(log: InteractionLog, starts: np.ndarray, ends: np.ndarray, max_len: int) -> Batch:
    """Next-item training windows: inputs ``[start, end - 1)`` predict ``[start + 1, end)`` (at most max_len)."""
    lo = np.maximum(starts, ends - max_len - 1)
    batch = input_batch(log, lo, ends - 1, max_len)
    targets = _pad([log.item[a + 1 : b] + 1 for a, b in zip(lo, ends, strict=True)], max_len)
    pos, ids, weight = [], [], []
    for r, (a, b) in enumerate(zip(lo, ends, strict=True)):
        offset = max_len - (b - a - 1)  # column of the first target of this row
        for j, e in enumerate(range(a + 1, b)):
            labels = log.explanations.row(e)
            if len(labels):
                pos += [r * max_len + offset + j] * len(labels)
                ids += labels.tolist()
                weight += [1.0 / len(labels)] * len(labels)
    batch.targets = torch.from_numpy(targets)
    batch.expl_pos = torch.tensor(pos, dtype=torch.long)
    batch.expl_ids = torch.tensor(ids, dtype=torch.long)
    batch.expl_weight = torch.tensor(weight, dtype=torch.float32)
    return batch


def training_windows(
    user_ptr: np.ndarray, train_end: np.ndarray, users: np.ndarray, max_len: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One window per user for an epoch: ``(start, end)`` event ranges inside the user's training events.

    Users longer than ``max_len + 1`` get a window whose end is drawn uniformly from the valid ends, so that
    over epochs the whole history is used; shorter users use everything.
    """
    starts = user_ptr[users]
    ends = train_end[users]
    n = ends - starts
    long = n > max_len + 1
    draw = rng.integers(0, np.maximum(n - max_len, 1))  # how far the window ends before the last event
    ends = np.where(long, ends - draw, ends)
    starts = np.where(long, ends - max_len - 1, starts)
    return starts, ends


def history_of(log: InteractionLog, starts: np.ndarray, ends: np.ndarray) -> Ragged:
    """Items of events ``[start, end)`` per row (the history to mask in full ranking)."""
    return Ragged.from_lists([log.item[a:b] for a, b in zip(starts, ends, strict=True)])
