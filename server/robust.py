"""Robust aggregates against model poisoning, as a wrapper strategy, and FedAdam with its own epsilon for the
item tables.

:class:`RobustAggregate` reduces a round's (validated) replies to one coordinate-wise median or trimmed mean
(Flower's ``aggregate_median`` / ``aggregate_trimmed_avg``: one vote per device; the example weights, which a
device reports itself, only weight the metrics) and hands it to the strategy it wraps as the round's one reply:
FedAvg takes it; FedAdam steps towards it, so that the step's per-coordinate normalization cannot amplify a few
devices' push. ``scope="item-tables"`` takes the robust aggregate for the item tables only (where a promotion
attack pushes) and the example-weighted mean for every other array.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
from flwr.serverapp.strategy import FedAdam, Strategy

from shared_model.protocol.updates import ITEM_TABLES

from .records import WEIGHT_KEY, cohort_metrics, numpy_to_record, record_to_numpy
from .wrapper import Reducer


class RobustAggregate(Reducer):
    """The coordinate-wise median or trimmed mean of the replies, handed to ``strategy`` as one reply."""

    def __init__(
        self,
        strategy: Strategy,
        rule: Literal["median", "trimmed-mean"],
        trim_fraction: float = 0.1,
        scope: Literal["all", "item-tables"] = "all",
    ) -> None:
        super().__init__(strategy)
        self.rule, self.trim_fraction, self.scope = rule, trim_fraction, scope

    def reduce(self, replies: list[Message]) -> tuple[dict[str, np.ndarray], MetricRecord]:
        """The robust rule on the arrays in scope, the example-weighted mean on the others."""
        arrays = [record_to_numpy(m.content["arrays"]) for m in replies]
        names = sorted(arrays[0])
        keys = [k for k in names if self.scope == "all" or k in ITEM_TABLES]
        results = [([a[k].astype(np.float64) for k in keys], 1) for a in arrays]  # float64: no rounding drift
        agg = (
            aggregate_median(results)
            if self.rule == "median"
            else aggregate_trimmed_avg(results, self.trim_fraction)
        )
        robust = dict(zip(keys, agg, strict=True))
        weights = np.array([float(m.content["metrics"][WEIGHT_KEY]) for m in replies])
        weights = weights / weights.sum()
        for k in set(names) - robust.keys():  # the other arrays: the example-weighted mean
            robust[k] = sum(w * a[k].astype(np.float64) for w, a in zip(weights, arrays, strict=True))
        return {k: robust[k].astype(arrays[0][k].dtype) for k in names}, cohort_metrics(replies)


class FedAdamItemEpsilon(FedAdam):
    """FedAdam with its own epsilon for the item tables (``tau_items`` > 0), so that tiny consistent changes of
    rows honest devices barely move (a cold item's) are not normalised into full steps."""

    def __init__(self, *args: Any, tau_items: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tau_items = tau_items

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        # the item tables' step again with their own epsilon, from the moments Flower's step just updated
        eta_norm = (
            self.eta
            * np.sqrt(1 - self.beta_2 ** (server_round + 1.0))
            / (1 - self.beta_1 ** (server_round + 1.0))
        )
        new = dict(record_to_numpy(arrays))  # a new record: the one Flower returned stays as it is
        for k in set(ITEM_TABLES) & new.keys():
            step = eta_norm * self.m_t[k] / (np.sqrt(self.v_t[k]) + self.tau_items)
            new[k] = self.current_arrays[k] + step
        return numpy_to_record(new), metrics
