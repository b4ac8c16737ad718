"""The base of the project's wrapper strategies (Flower's pattern for its DP strategies: a strategy holding
``self.strategy``, which it hands every call it does not change)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from .records import one_reply


class Wrapper(Strategy):
    """Delegates to ``self.strategy``; a subclass overrides what it changes (usually ``aggregate_train``)."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def expect(self, sent: dict[str, np.ndarray]) -> None:
        """The arrays this round sent (called every round before its replies arrive); nothing by default."""

    def round_report(self) -> dict[str, Any]:
        """What this wrapper adds to the round's summary; nothing by default."""
        return {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


class Reducer(Wrapper):
    """A wrapper that reduces the cohort's replies to one update (central DP's noisy mean, a robust mean) and
    hands the strategy it wraps that one reply."""

    def reduce(self, replies: list[Message]) -> tuple[dict[str, np.ndarray], MetricRecord]:
        """The cohort's one update and its metrics (``replies`` is not empty)."""
        raise NotImplementedError

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not replies:
            return None, None
        arrays, metrics = self.reduce(replies)
        return self.strategy.aggregate_train(server_round, [one_reply(arrays, metrics, replies[0])])


def wrappers(strategy: Strategy) -> list[Wrapper]:
    """The chain of wrappers from ``strategy`` down to (not including) the Flower strategy at the bottom."""
    chain = []
    while isinstance(strategy, Wrapper):
        chain.append(strategy)
        strategy = strategy.strategy
    return chain


def innermost(strategy: Strategy) -> FedAvg:
    """The Flower strategy at the bottom of a chain of wrappers: it samples, addresses and steps."""
    chain = wrappers(strategy)
    return chain[-1].strategy if chain else strategy  # type: ignore[return-value]
