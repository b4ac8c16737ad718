"""Leave-one-out split and per-user partitions (the protocol in README.md, Data).

For every user with at least 3 events: the last event is the test target, the second-to-last the validation
target, and everything before is training data. The test input includes the validation event. Users with
fewer than 3 events are training-only. The split itself has no randomness; partitions are seeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

from .log import InteractionLog

Stage = Literal["val", "test"]
MIN_EVENTS_FOR_EVAL = 3


@dataclass(frozen=True, eq=False)
class LeaveOneOutSplit:
    """Index view of a log: which events are training events and which are evaluation targets."""

    log: InteractionLog

    @cached_property
    def eval_users(self) -> np.ndarray:
        """Users with a validation and a test event (>= 3 events), ascending."""
        return np.flatnonzero(self.log.sequence_lengths() >= MIN_EVENTS_FOR_EVAL).astype(np.int64)

    def target_events(self, stage: Stage) -> np.ndarray:
        """Event index of each eval user's target: second-to-last (val) or last (test) event.

        The input for target ``t`` of user ``u`` is the events ``user_ptr[u]:t`` (so the test input includes
        the validation event)."""
        offset = {"val": 2, "test": 1}[stage]
        return self.log.user_ptr[self.eval_users + 1] - offset

    @cached_property
    def train_mask(self) -> np.ndarray:
        """True for every event that training may use (all but the eval users' last two events)."""
        mask = np.ones(self.log.num_events, dtype=bool)
        mask[self.target_events("val")] = False
        mask[self.target_events("test")] = False
        return mask

    @cached_property
    def explanation_candidates(self) -> np.ndarray:
        """Per item, the explanation ids attested for it in the training events (and its attributes in the
        vocabulary), -1 padded: what may be shown for it (:func:`~.explanations.attested_explanations`)."""
        from .explanations import attested_explanations

        return attested_explanations(self.log, np.flatnonzero(self.train_mask))


@dataclass(frozen=True, eq=False)
class UserData:
    """One user's events (one device's data): items, times, explanation labels and their role."""

    user: int
    items: np.ndarray
    times: np.ndarray
    explanations: list[np.ndarray]
    num_train: int  # events [0, num_train) are training events; then val and test targets if present


def user_data(log: InteractionLog, user: int) -> UserData:
    """Everything one device holds about its own user, with the leave-one-out roles."""
    lo, hi = int(log.user_ptr[user]), int(log.user_ptr[user + 1])
    n = hi - lo
    return UserData(
        user=user,
        items=log.item[lo:hi].copy(),
        times=log.time[lo:hi].copy(),
        explanations=[log.explanations.row(e).copy() for e in range(lo, hi)],
        num_train=n - 2 if n >= MIN_EVENTS_FOR_EVAL else n,
    )


def partition_users(num_users: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Shuffle users with ``seed`` and deal them into ``num_partitions`` near-equal groups (sorted inside).

    With ``num_partitions == num_users`` every partition is one user: one device per user.
    """
    if not 1 <= num_partitions <= num_users:
        raise ValueError(f"num_partitions must be in 1..{num_users}, got {num_partitions}")
    order = np.random.default_rng(seed).permutation(num_users)
    return [np.sort(part) for part in np.array_split(order, num_partitions)]
