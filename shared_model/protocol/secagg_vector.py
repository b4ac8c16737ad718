"""The vector a device contributes to a SecAgg+ sum, and its decoding (pure numpy).

A device's vector is its dense shared update as changes from the arrays the server sent, in sorted key order,
each value clipped to ``[-clip, clip]``, followed by one value: its mean training loss mapped onto
``[0, clip]``, so that the round's training loss is summed securely too. Flower's ``secaggplus_mod`` scales
the vector by the device's weight ``min(num_examples, MAX_WEIGHT) / MAX_WEIGHT`` and quantizes it; what the
server unmasks is the weighted mean of the cohort's vectors, which :func:`decode` splits back.
"""

from __future__ import annotations

import numpy as np

MAX_WEIGHT = 1000  # a device's example weight is capped here (Flower's default max_weight)
LOSS_BOUND = 1000.0  # training losses are clipped to [0, LOSS_BOUND] before they enter the sum


def weight(num_examples: int) -> int:
    """The example weight a device contributes (capped at :data:`MAX_WEIGHT`)."""
    return min(int(num_examples), MAX_WEIGHT)


def encode(
    update: dict[str, np.ndarray], sent: dict[str, np.ndarray], loss: float, clip: float
) -> list[np.ndarray]:
    """The SecAgg+ input vector of a dense update. Raises ValueError for non-finite values: an honest device
    drops out of the round rather than spoil everyone's sum."""
    if set(update) != set(sent):
        raise ValueError(
            f"a SecAgg+ update needs the sent keys; differs in {sorted(set(update) ^ set(sent))[:5]}"
        )
    deltas = [np.clip(update[k].astype(np.float64) - sent[k], -clip, clip) for k in sorted(sent)]
    if not (np.isfinite(loss) and all(np.isfinite(d).all() for d in deltas)):
        raise ValueError("non-finite update or loss: this device does not join the SecAgg+ sum")
    return [*deltas, np.array([min(max(loss, 0.0), LOSS_BOUND) * clip / LOSS_BOUND])]


def decode(
    vector: list[np.ndarray], sent: dict[str, np.ndarray], clip: float
) -> tuple[dict[str, np.ndarray], float]:
    """The mean change per shared array and the mean training loss from an unmasked (mean) vector."""
    *deltas, loss = vector
    names = sorted(sent)
    if len(deltas) != len(names) or any(
        d.shape != sent[k].shape for k, d in zip(names, deltas, strict=False)
    ):
        raise ValueError("the unmasked vector does not match the shapes of the sent arrays")
    return dict(zip(names, deltas, strict=True)), float(loss.reshape(-1)[0]) * LOSS_BOUND / clip
