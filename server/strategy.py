"""Flower strategies that validate every update and aggregate only the shared arrays.

:class:`ValidatedAggregation` sits in front of Flower's own ``FedAvg`` / ``FedAdam`` (flwr.serverapp.strategy):
it densifies sparse updates, rejects invalid ones (logged, never averaged), and skips aggregation when fewer
than ``min_reply_fraction`` of the sampled devices replied validly (the round completes; the arrays stay).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg

from shared_model.config import FederatedConfig

from .validation import UpdateRejected, validate_update

log = logging.getLogger("tmepsr.server")
WEIGHT_KEY = "num-examples"


def record_to_numpy(record: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


class ValidatedAggregation:
    """Mixin for a Flower strategy: validation, densification and the minimum-reply rule."""

    def setup_validation(self, norm_bound: float, min_reply_fraction: float) -> None:
        self.norm_bound = norm_bound
        self.min_reply_fraction = min_reply_fraction
        self.sent: dict = {}
        self.sampled = 0
        self.last_round: dict = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = record_to_numpy(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self.sampled = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, rejected, failed = [], [], 0
        for msg in replies:
            if msg.has_error():
                failed += 1
                log.warning(
                    "round %d: device %s failed: %s", server_round, msg.metadata.src_node_id, msg.error.reason
                )
                continue
            try:
                content = msg.content
                metrics = next(iter(content.metric_records.values()))
                update = record_to_numpy(next(iter(content.array_records.values())))
                dense = validate_update(update, self.sent, metrics.get(WEIGHT_KEY), self.norm_bound)
            except (UpdateRejected, StopIteration, KeyError, ValueError, TypeError) as exc:
                rejected.append(str(exc))
                log.warning(
                    "round %d: rejected update from node %s: %s", server_round, msg.metadata.src_node_id, exc
                )
                continue
            msg.content = RecordDict({"arrays": numpy_to_record(dense), "metrics": metrics})
            valid.append(msg)
        needed = max(1, math.ceil(self.min_reply_fraction * self.sampled))
        self.last_round = {"sampled": self.sampled, "valid": len(valid), "rejected": len(rejected),
                           "failed": failed, "rejections": rejected, "aggregated": len(valid) >= needed}  # fmt: skip
        if len(valid) < needed:
            log.warning(
                "round %d: %d valid replies < %d needed; shared arrays unchanged",
                server_round,
                len(valid),
                needed,
            )
            return None, None
        arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[misc]
        if arrays is not None:  # FedAdam's server step computes in float64: keep the model's dtypes
            arrays = numpy_to_record(
                {k: v.astype(self.sent[k].dtype) for k, v in record_to_numpy(arrays).items()}
            )
        return arrays, metrics


class ValidatedFedAvg(ValidatedAggregation, FedAvg):
    """FedAvg (example-weighted mean) over validated updates."""


class ValidatedFedAdam(ValidatedAggregation, FedAdam):
    """FedAdam (a server-side Adam step on the averaged update) over validated updates."""


def make_strategy(cfg: FederatedConfig, num_nodes: int) -> ValidatedAggregation:
    """The strategy a config asks for; the minimum node counts follow the cohort (so a run never waits)."""
    sample = max(1, round(cfg.fraction_train * num_nodes))
    common = dict(
        fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate, min_train_nodes=sample,
        min_evaluate_nodes=1, min_available_nodes=num_nodes, weighted_by_key=WEIGHT_KEY,
    )  # fmt: skip
    if cfg.server_optimizer == "fedadam":
        strategy: ValidatedAggregation = ValidatedFedAdam(eta=cfg.server_lr, **common)
    else:
        strategy = ValidatedFedAvg(**common)
    strategy.setup_validation(cfg.norm_bound, cfg.min_reply_fraction)
    return strategy
