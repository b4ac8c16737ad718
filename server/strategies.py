"""The strategy a run config asks for, composed from wrappers around Flower's FedAvg or FedAdam:

ValidatedStrategy(                       server/validated.py: validation, clips, minimum replies
    CentralDP( ... )                     server/dp.py: privacy="dp"
    | RobustAggregate( ... )             server/robust.py: aggregation="median" / "trimmed-mean"
        FedAvg | ServerAdam)             Flower's FedAvg; server/server_adam.py: FedAdam + lr decay
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, Strategy

from shared_model.config import FederatedConfig
from shared_model.protocol.updates import max_update_weight

from .dp import CentralDP
from .records import WEIGHT_KEY
from .robust import RobustAggregate
from .server_adam import ServerAdam
from .validated import ValidatedStrategy


def make_strategy(cfg: FederatedConfig, num_nodes: int, num_users: int) -> ValidatedStrategy:
    """The strategy a config asks for; the minimum node counts follow the cohort (so a run never waits).
    ``num_users``: the federation's users, hosted by the ``num_nodes`` nodes in near-equal partitions, which
    bounds the example weight a node may claim."""
    sample = max(1, round(cfg.fraction_train * num_nodes))
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=sample,
        min_evaluate_nodes=1,
        min_available_nodes=num_nodes,
        weighted_by_key=WEIGHT_KEY,
    )
    adam = cfg.server_optimizer == "fedadam"
    step: Strategy
    if adam:
        step = ServerAdam(
            eta=cfg.server_lr,
            tau=cfg.server_tau,
            num_rounds=cfg.num_rounds,
            decay=cfg.server_lr_decay,
            tau_items=cfg.server_tau_items,
            **common,
        )
    else:
        step = FedAvg(**common)
    if (
        cfg.aggregation != "mean"
    ):  # the robust scope applies to FedAdam's step; FedAvg's is robust on every array
        scope = cfg.robust_scope if adam else "all"
        step = RobustAggregate(step, cfg.aggregation, cfg.trim_fraction, scope)
    if cfg.privacy == "dp":
        step = CentralDP(step, cfg.dp_noise, cfg.dp_clip, cfg.dp_delta, sample, num_nodes)
    most = max_update_weight(cfg.max_len, cfg.local_epochs, num_users, num_nodes)
    return ValidatedStrategy(
        step,
        cfg.norm_bound,
        cfg.min_reply_fraction,
        cfg.clip_norm,
        cfg.row_clip,
        max_examples=most,
        states_lr=cfg.states_lr,
        # SecAgg+ rounds never show one device's update: no quorum to count
        row_quorum=0 if cfg.privacy == "secagg" else effective_quorum(cfg.row_quorum, num_nodes),
    )


def effective_quorum(row_quorum: int, num_nodes: int) -> int:
    """The row quorum a federation of ``num_nodes`` devices runs with: ``row_quorum`` capped at a tenth of the
    devices, and none (0) below 2, so a small federation still learns its items (server/row_quorum.py)."""
    quorum = min(row_quorum, num_nodes // 10)
    return quorum if quorum >= 2 else 0
