"""Flower strategies that validate every update and aggregate only the shared arrays.

:class:`ValidatedAggregation` sits in front of Flower's own strategies (flwr.serverapp.strategy):
it densifies sparse updates, rejects invalid ones (logged, never averaged), clips the valid ones
(``clip_norm``, ``row_clip``: :mod:`shared_model.protocol.clipping`) and skips aggregation when fewer than
``min_reply_fraction`` of the sampled devices replied validly (the round completes; the arrays stay).

``aggregation`` picks the aggregate: ``mean`` (FedAvg, example-weighted; or FedAdam's server step on it),
``trimmed-mean`` (Flower's ``FedTrimmedAvg``, coordinate-wise, cutting ``trim_fraction`` at each end) or
``median`` (Flower's ``FedMedian``, coordinate-wise); with FedAdam, its server step runs on the robust
aggregate. The robust aggregates give every device one vote (the example weights, which a device reports
itself, only weight the metrics).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedTrimmedAvg

from shared_model.protocol.clipping import clip_update
from shared_model.protocol.updates import ITEM_TABLES

from .validation import UpdateRejected, validate_update

log = logging.getLogger("tmepsr.server")
WEIGHT_KEY = "num-examples"
SHARE_KEY = "head-share"  # the devices' metrics head-share-<h>; the round config's population estimate
SHARE_MEMORY = (
    0.9  # the estimate keeps this much of the previous rounds' (a cohort is a tenth of the devices)
)


def record_to_numpy(record: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


class ValidatedAggregation:
    """Mixin for a Flower strategy: validation, densification, clipping and the minimum-reply rule."""

    def setup_validation(
        self, norm_bound: float, min_reply_fraction: float, clip_norm: float = 0.0, row_clip: float = 0.0
    ) -> None:
        self.norm_bound = norm_bound
        self.min_reply_fraction = min_reply_fraction
        self.clip_norm = clip_norm
        self.row_clip = row_clip
        self.sent: dict = {}
        self.sampled = 0
        self.last_round: dict = {}
        self.partitions: dict[int, int] = {}
        self.sampling_seed = 0
        self.sampled_partitions: list[int] = []  # partition ids of the last seeded cohort
        self.head_share: np.ndarray | None = None  # the population's head shares of target items, estimated

    def setup_sampling(self, partitions: dict[int, int], seed: int) -> None:
        """Seeded cohorts. ``partitions`` maps each node id to its partition id, a node's stable identity
        (Flower draws new random node ids every run); each round then samples partitions with a generator
        seeded by (seed, round), so a rerun or a resumed run trains the same devices in every round."""
        self.partitions = dict(partitions)
        self.sampling_seed = seed

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = record_to_numpy(arrays)
        # the Flower strategy's own configure_train keeps its side effects (FedAdam remembers the sent
        # arrays); with seeded cohorts its messages are re-addressed to the seeded sample
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        if self.partitions and messages:
            nodes = self.sample_nodes(server_round, set(grid.get_node_ids()))
            messages = list(self._construct_messages(messages[0].content, nodes, MessageType.TRAIN))  # type: ignore[attr-defined]
        self.sampled = len(messages)
        return messages

    def sample_nodes(self, server_round: int, connected: set[int]) -> list[int]:
        """The round's cohort: ``fraction_train`` of the connected nodes (at least ``min_train_nodes``),
        drawn over their partition ids with the generator of (seed, round)."""
        candidates = sorted((p, n) for n, p in self.partitions.items() if n in connected)
        size = max(int(len(candidates) * self.fraction_train), self.min_train_nodes)  # type: ignore[attr-defined]
        rng = np.random.default_rng([self.sampling_seed, server_round])
        picked = sorted(rng.choice(len(candidates), size=min(size, len(candidates)), replace=False))
        self.sampled_partitions = [candidates[i][0] for i in picked]
        return [candidates[i][1] for i in picked]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, rejected, failed, clipped, failed_users = [], [], 0, [0, 0], 0
        for msg in replies:
            if msg.has_error():
                failed += 1
                log.warning(
                    "round %d: device %s failed: %s", server_round, msg.metadata.src_node_id, msg.error.reason
                )
                continue
            try:
                content = msg.content
                if len(content.array_records) != 1 or len(content.metric_records) != 1:
                    raise UpdateRejected("a reply needs exactly one ArrayRecord and one MetricRecord")
                metrics = next(iter(content.metric_records.values()))
                update = record_to_numpy(next(iter(content.array_records.values())))
                dense = validate_update(update, self.sent, metrics.get(WEIGHT_KEY), self.norm_bound)
            except (UpdateRejected, KeyError, ValueError, TypeError) as exc:
                rejected.append(str(exc))
                log.warning(
                    "round %d: rejected update from node %s: %s", server_round, msg.metadata.src_node_id, exc
                )
                continue
            failed_users += int(metrics.get("failed-users", 0))  # users whose stores could not be read
            clip = clip_update(dense, self.sent, self.clip_norm, self.row_clip)
            clipped[0] += clip.norm_clipped
            clipped[1] += clip.rows_clipped
            msg.content = RecordDict({"arrays": numpy_to_record(clip.arrays), "metrics": metrics})
            valid.append(msg)
        self._update_head_share(valid)
        needed = self.needed(self.sampled)
        self.last_round = {
            "sampled": self.sampled,
            "valid": len(valid),
            "rejected": len(rejected),
            "failed": failed,
            "rejections": rejected,
            "aggregated": len(valid) >= needed,
            "failed_users": failed_users,
        }
        if self.clip_norm or self.row_clip:
            self.last_round |= {"norm_clipped": clipped[0], "rows_clipped": clipped[1]}
        if len(valid) < needed:
            log.warning(
                "round %d: %d valid replies < %d needed; shared arrays unchanged",
                server_round,
                len(valid),
                needed,
            )
            return None, None
        return self.server_step(server_round, valid)

    def _update_head_share(self, valid: list[Message]) -> None:
        """Fold the cohort's example-weighted mean head shares (the devices' ``head-share-<h>`` metrics) into
        the population estimate. A report that is not a distribution (negative, NaN, not summing to 1) is
        ignored, so a hostile device can shift the estimate by at most its example weight's share."""
        reports, weights = [], []
        for msg in valid:
            metrics = msg.content["metrics"]
            heads = sorted(k for k in metrics if k.startswith(SHARE_KEY + "-"))
            share = np.array([float(metrics[k]) for k in heads])
            if heads and np.all(np.isfinite(share)) and share.min() >= 0 and abs(share.sum() - 1) < 1e-3:
                reports.append(share)
                weights.append(float(metrics[WEIGHT_KEY]))
        if not reports or len({len(r) for r in reports}) != 1 or sum(weights) <= 0:
            return
        cohort = np.average(np.stack(reports), axis=0, weights=weights)
        if self.head_share is None or len(self.head_share) != len(cohort):
            self.head_share = cohort
        else:
            self.head_share = SHARE_MEMORY * self.head_share + (1 - SHARE_MEMORY) * cohort

    def round_config(self) -> dict[str, list[float]]:
        """What every device's next round needs from the server beyond the run config: the population's head
        shares, once estimated."""
        return {} if self.head_share is None else {SHARE_KEY: [float(x) for x in self.head_share]}

    def server_state(self) -> dict[str, np.ndarray]:
        """The server's state across rounds for the checkpoint: the optimizer's (FedAdam's first and second
        moments; none for the stateless aggregates) and the population's head shares."""
        moments = {"m_t": getattr(self, "m_t", None), "v_t": getattr(self, "v_t", None)}
        state = {f"{name}/{k}": v for name, m in moments.items() if m for k, v in m.items()}
        return state | ({} if self.head_share is None else {SHARE_KEY: self.head_share})

    def restore_server_state(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`server_state` (a resumed run continues with the saved moments and shares)."""
        for name in ("m_t", "v_t"):
            part = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(name + "/")}
            if part:
                setattr(self, name, part)
        if SHARE_KEY in state:
            self.head_share = np.asarray(state[SHARE_KEY], np.float64)

    def needed(self, sampled: int) -> int:
        """Valid replies a round of ``sampled`` devices needs to aggregate (the minimum-reply rule)."""
        return max(1, math.ceil(self.min_reply_fraction * sampled))

    def server_step(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The Flower strategy's own aggregation and server step on accepted replies, in the sent dtypes."""
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None:  # FedAdam's server step computes in float64: keep the model's dtypes
            arrays = numpy_to_record(
                {k: v.astype(self.sent[k].dtype) for k, v in record_to_numpy(arrays).items()}
            )
        return arrays, metrics


class ValidatedFedAvg(ValidatedAggregation, FedAvg):
    """FedAvg (example-weighted mean) over validated updates."""


class ValidatedFedAdam(ValidatedAggregation, FedAdam):
    """FedAdam (a server-side Adam step) over validated updates: on their example-weighted mean, or with
    ``robust`` set to "median" / "trimmed-mean", on Flower's coordinate-wise median / trimmed mean of them (one
    vote per device), so that the step's per-coordinate normalization cannot amplify a few devices' push.
    ``robust_scope="item-tables"`` takes the robust aggregate for the item tables only (where a promotion
    attack pushes) and the example-weighted mean for every other array. ``tau_items`` > 0 gives the item
    tables their own Adam epsilon, so that tiny consistent changes of rows honest devices barely move (a cold
    item's) are not normalised into full steps."""

    robust: str = "mean"
    trim_fraction: float = 0.1
    robust_scope: str = "all"
    tau_items: float = 0.0  # Adam's epsilon for the item tables (0: the strategy's tau)
    _robust_aggregate: ArrayRecord | None = None

    def server_step(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self._adam_step(server_round, replies)
        if arrays is None or not self.tau_items:
            return arrays, metrics
        # the item tables' step again with their own epsilon, from the moments Flower's step just updated
        eta_norm = (
            self.eta
            * np.sqrt(1 - self.beta_2 ** (server_round + 1.0))
            / (1 - self.beta_1 ** (server_round + 1.0))
        )
        new = record_to_numpy(arrays)
        for k in set(ITEM_TABLES) & new.keys():
            step = eta_norm * self.m_t[k] / (np.sqrt(self.v_t[k]) + self.tau_items)
            new[k] = (self.current_arrays[k] + step).astype(self.sent[k].dtype)
        return numpy_to_record(new), metrics

    def _adam_step(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.robust == "mean":
            return super().server_step(server_round, replies)
        arrays = [record_to_numpy(m.content["arrays"]) for m in replies]
        keys = sorted(k for k in self.sent if self.robust_scope == "all" or k in ITEM_TABLES)
        results = [([a[k].astype(np.float64) for k in keys], 1) for a in arrays]  # float64: no rounding drift
        agg = (
            aggregate_median(results)
            if self.robust == "median"
            else aggregate_trimmed_avg(results, self.trim_fraction)
        )
        robust = dict(zip(keys, agg, strict=True))
        if len(keys) < len(self.sent):  # the other arrays: the example-weighted mean, as FedAdam takes it
            weights = np.array([float(m.content["metrics"][WEIGHT_KEY]) for m in replies])
            weights = weights / weights.sum()
            for k in self.sent.keys() - robust.keys():
                robust[k] = sum(w * a[k].astype(np.float64) for w, a in zip(weights, arrays, strict=True))
        self._robust_aggregate = numpy_to_record(
            {k: robust[k].astype(self.sent[k].dtype) for k in sorted(robust)}
        )
        try:  # Flower's FedAdam step, on the robust aggregate instead of its weighted mean
            return super().server_step(server_round, replies)
        finally:
            self._robust_aggregate = None

    def _compute_deltat_and_mt(self, aggregated_arrayrecord: ArrayRecord) -> tuple[dict, dict, dict]:
        return super()._compute_deltat_and_mt(self._robust_aggregate or aggregated_arrayrecord)  # type: ignore[misc]


class ValidatedFedTrimmedAvg(ValidatedAggregation, FedTrimmedAvg):
    """Coordinate-wise trimmed mean (unweighted, ``beta`` cut at each end) over validated updates."""


class ValidatedFedMedian(ValidatedAggregation, FedMedian):
    """Coordinate-wise median (unweighted) over validated updates."""
