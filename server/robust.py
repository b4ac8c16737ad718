"""Robust aggregates against model poisoning, as a wrapper strategy.

:class:`RobustAggregate` reduces a round's (validated) replies to one coordinate-wise median or trimmed mean
(Flower's ``aggregate_median`` / ``aggregate_trimmed_avg``: one vote per device; the example weights, which a
device reports itself, only weight the metrics) and hands it to the strategy it wraps as the round's one reply:
FedAvg takes it; FedAdam steps towards it, so that the step's per-coordinate normalization cannot amplify a few
devices' push. ``scope="item-tables"`` takes the robust aggregate for the item tables only (where a promotion
attack pushes) and the example-weighted mean for every other array.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from flwr.app import Message, MetricRecord
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
from flwr.serverapp.strategy import Strategy

from shared_model.protocol.updates import ITEM_TABLES

from .records import WEIGHT_KEY, cohort_metrics, record_to_numpy
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
