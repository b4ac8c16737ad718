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


def _window_index(lo: np.ndarray, hi: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded layout of event ranges ``[lo, hi)`` (each at most ``length`` long) in a (rows, length)
    grid: the event index at every cell (clipped to a valid index at padding) and the mask of real cells."""
    cols = np.arange(length) - length  # -length .. -1: offsets from each row's end
    events = hi[:, None] + cols
    real = events >= lo[:, None]
    return np.where(real, events, 0), real


def _gather(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, length: int, shift: int = 0) -> Tensor:
    """``values[lo:hi] + shift`` per row, left-padded with 0 to ``length`` columns, as an int64 tensor."""
    events, real = _window_index(lo, hi, length)
    return torch.from_numpy(np.where(real, values[events].astype(np.int64) + shift, 0))


def input_batch(log: InteractionLog, starts: np.ndarray, ends: np.ndarray, max_len: int) -> Batch:
    """Inputs made of events ``[max(start, end - max_len), end)`` for each row (for prediction/evaluation)."""
    lo = np.maximum(starts, ends - max_len)
    items = _gather(log.item, lo, ends, max_len, shift=1)
    return Batch(items, _gather(log.time, lo, ends, max_len), items > 0)


def training_batch(log: InteractionLog, starts: np.ndarray, ends: np.ndarray, max_len: int) -> Batch:
    """Next-item training windows: inputs ``[start, end - 1)`` predict ``[start + 1, end)`` (at most max_len)."""
    lo = np.maximum(starts, ends - max_len - 1)
    batch = input_batch(log, lo, ends - 1, max_len)
    batch.targets = _gather(log.item, lo + 1, ends, max_len, shift=1)
    # explanation labels of every target event, flattened: position (row * max_len + column) of each label
    events, real = _window_index(lo + 1, ends, max_len)
    cells = np.flatnonzero(real)
    labels = log.explanations.take(events.reshape(-1)[cells])
    counts = labels.lengths()
    batch.expl_pos = torch.from_numpy(np.repeat(cells, counts).astype(np.int64))
    batch.expl_ids = torch.from_numpy(labels.ids.astype(np.int64))
    batch.expl_weight = torch.from_numpy(np.repeat(1.0 / np.maximum(counts, 1), counts).astype(np.float32))
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
