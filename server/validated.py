"""The strategy every run uses: a wrapper (Flower's pattern for its DP strategies: it holds ``self.strategy``)
that validates every update before the wrapped strategy sees it.

:class:`ValidatedStrategy` samples seeded cohorts, densifies sparse updates, rejects invalid ones (logged, never
averaged), holds the item rows that fewer than ``row_quorum`` distinct devices have supported
(:mod:`server.row_quorum`), clips the valid ones (``clip_norm``, ``row_clip``:
:mod:`shared_model.protocol.clipping`), folds the devices' head shares into the population estimate, and skips
aggregation when fewer than ``min_reply_fraction`` of the sampled devices replied validly (the round completes;
the arrays stay). What it wraps aggregates and steps: Flower's FedAvg or FedAdam, possibly behind :class:`server.robust.RobustAggregate`
or :class:`server.dp.CentralDP` (``server/strategies.py`` composes them from the run config).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, Strategy

from shared_model.protocol.clipping import clip_update
from shared_model.protocol.updates import ITEM_TABLES

from .records import WEIGHT_KEY, numpy_to_record, record_to_numpy
from .row_quorum import RowQuorum
from .validation import UpdateRejected, validate_update
from .wrapper import Wrapper, innermost, wrappers

log = logging.getLogger("tmepsr.server")
SHARE_KEY = "head-share"  # the devices' metrics head-share-<h>; the round config's population estimate
SHARE_MEMORY = (
    0.9  # the estimate keeps this much of the previous rounds' (a cohort is a tenth of the devices)
)


class ValidatedStrategy(Wrapper):
    """Validation, clipping, the head-share estimate and the minimum-reply rule in front of ``strategy``."""

    def __init__(
        self,
        strategy: Strategy,
        norm_bound: float,
        min_reply_fraction: float,
        clip_norm: float = 0.0,
        row_clip: float = 0.0,
        max_examples: float = math.inf,
        states_lr: float = 0.0,
        row_quorum: int = 0,
    ) -> None:
        super().__init__(strategy)
        self.base = innermost(strategy)  # the Flower strategy that samples, addresses and steps
        self.norm_bound = norm_bound
        self.max_examples = max_examples
        self.min_reply_fraction = min_reply_fraction
        self.clip_norm = clip_norm
        self.row_clip = row_clip
        self.states_lr = states_lr  # > 0: sparse updates with output states are completed at this local lr
        self.row_quorum = row_quorum  # > 0: item rows held until this many distinct devices support them
        # created at the first round, when the item table's size is known
        self.quorum: RowQuorum | None = None
        self.sent: dict[str, np.ndarray] = {}
        self.sampled = 0
        self._last_round: dict[str, Any] = {}
        self.partitions: dict[int, int] = {}  # node id -> partition id: a device's stable identity
        self.sampling_seed: int | None = None  # None: Flower's own, unseeded cohorts
        self.sampled_partitions: list[int] = []  # partition ids of the last seeded cohort
        self.head_share: np.ndarray | None = None  # the population's head shares of target items, estimated

    # ------------------------------------------------------------------ rounds
    def setup_sampling(self, partitions: dict[int, int], seed: int | None) -> None:
        """``partitions`` maps each node id to its partition id, a node's stable identity (Flower draws new
        random node ids every run), which the row quorum counts devices by. With a ``seed``, seeded cohorts:
        each round samples partitions with a generator seeded by (seed, round), so a rerun or a resumed run
        trains the same devices in every round; None keeps Flower's own sampling."""
        self.partitions = dict(partitions)
        self.sampling_seed = seed

    @property
    def seeded(self) -> bool:
        """Whether cohorts are drawn by :meth:`sample_nodes` (a seed and the nodes' partition ids are known)."""
        return self.sampling_seed is not None and bool(self.partitions)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # the wrapped strategies' own configure_train keeps their side effects (FedAdam remembers the sent
        # arrays, DP counts the round); with seeded cohorts the messages are re-addressed to the seeded sample
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self.seeded and messages:
            nodes = self.sample_nodes(server_round, set(grid.get_node_ids()))
            messages = list(self.base._construct_messages(messages[0].content, nodes, MessageType.TRAIN))
        self.begin_round(record_to_numpy(arrays), len(messages))
        return messages

    def begin_round(self, sent: dict[str, np.ndarray], sampled: int) -> None:
        """What this round's replies are checked against and stepped from: the arrays sent and the number of
        devices asked. ``configure_train`` records both; a caller that aggregates replies it did not ask for
        (a benchmark or test replaying replies) calls this instead."""
        self.sent, self.sampled = sent, sampled
        if self.row_quorum and self.quorum is None:
            self.quorum = RowQuorum(self.row_quorum, len(sent[ITEM_TABLES[1]]))
        for wrapper in wrappers(self.strategy):
            wrapper.expect(sent)
        if isinstance(self.base, FedAdam):  # it steps from the arrays it sent
            self.base.current_arrays = dict(sent)

    def sample_nodes(self, server_round: int, connected: set[int]) -> list[int]:
        """The round's cohort: ``fraction_train`` of the connected nodes (at least ``min_train_nodes``),
        drawn over their partition ids with the generator of (seed, round)."""
        candidates = sorted((p, n) for n, p in self.partitions.items() if n in connected)
        size = max(int(len(candidates) * self.base.fraction_train), self.base.min_train_nodes)
        rng = np.random.default_rng([self.sampling_seed, server_round])
        picked = sorted(rng.choice(len(candidates), size=min(size, len(candidates)), replace=False))
        self.sampled_partitions = [candidates[i][0] for i in picked]
        return [candidates[i][1] for i in picked]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted, rejected, failed, clipped, failed_users = [], [], 0, [0, 0], 0
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
                dense = validate_update(
                    update,
                    self.sent,
                    metrics.get(WEIGHT_KEY),
                    self.norm_bound,
                    self.max_examples,
                    self.states_lr,
                    self.row_clip,
                )
            except (UpdateRejected, KeyError, ValueError, TypeError) as exc:
                rejected.append(str(exc))
                log.warning(
                    "round %d: rejected update from node %s: %s", server_round, msg.metadata.src_node_id, exc
                )
                continue
            failed_users += int(metrics.get("failed-users", 0))  # users whose stores could not be read
            accepted.append((msg, dense, metrics))
        if self.quorum is not None:  # this round's supporters count before any row is held
            for msg, dense, _ in accepted:
                device = self.partitions.get(msg.metadata.src_node_id, msg.metadata.src_node_id)
                self.quorum.observe(device, dense, self.sent)
        held = 0
        for msg, dense, metrics in accepted:
            if self.quorum is not None:
                dense, raised = self.quorum.hold(dense, self.sent)
                held += raised
            clip = clip_update(dense, self.sent, self.clip_norm, self.row_clip)
            clipped[0] += clip.norm_clipped
            clipped[1] += clip.rows_clipped
            msg.content = RecordDict({"arrays": numpy_to_record(clip.arrays), "metrics": metrics})
        valid = [msg for msg, _, _ in accepted]
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
            self._last_round |= {"norm_clipped": clipped[0], "rows_clipped": clipped[1]}
        if self.quorum is not None:
            self._last_round |= {"promotions_held": held, "rows_open": int(self.quorum.open_rows.sum())}
        if len(valid) < needed:
            log.warning(
                "round %d: %d valid replies < %d needed; shared arrays unchanged",
                server_round,
                len(valid),
                needed,
            )
            return None, None
        return self.server_step(server_round, valid)

    def server_step(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregation and server step on accepted replies, in the sent dtypes (FedAdam's
        step computes in float64). SecAgg+ rounds call it with their one validated aggregate."""
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = numpy_to_record(
                {k: v.astype(self.sent[k].dtype) for k, v in record_to_numpy(arrays).items()}
            )
        return arrays, metrics

    def needed(self, sampled: int) -> int:
        """Valid replies a round of ``sampled`` devices needs to aggregate (the minimum-reply rule)."""
        return max(1, math.ceil(self.min_reply_fraction * sampled))

    @property
    def last_round(self) -> dict[str, Any]:
        """The last round's summary, plus what the wrapped strategies report (central DP: the privacy spent)."""
        report = dict(self._last_round)
        for wrapper in wrappers(self.strategy):
            report |= wrapper.round_report()
        return report

    @last_round.setter
    def last_round(self, value: dict[str, Any]) -> None:
        self._last_round = dict(value)

    # ------------------------------------------------------------------ state across rounds
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
        moments; none for FedAvg), the row quorum's supporters and the population's head shares."""
        moments = {"m_t": getattr(self.base, "m_t", None), "v_t": getattr(self.base, "v_t", None)}
        state = {f"{name}/{k}": v for name, m in moments.items() if m for k, v in m.items()}
        state |= {} if self.quorum is None else self.quorum.state()
        return state | ({} if self.head_share is None else {SHARE_KEY: self.head_share})

    def restore_server_state(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`server_state` (a resumed run continues with the saved moments and shares)."""
        for name in ("m_t", "v_t"):
            part = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(name + "/")}
            if part:
                setattr(self.base, name, part)
        if SHARE_KEY in state:
            self.head_share = np.asarray(state[SHARE_KEY], np.float64)
        if self.row_quorum and "row-quorum/count" in state:
            self.quorum = RowQuorum(self.row_quorum, len(state["row-quorum/count"]))
            self.quorum.restore(state)
