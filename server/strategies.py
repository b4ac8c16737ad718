"""The strategy a run config asks for: validated FedAvg, FedAdam (optionally on a robust aggregate), trimmed
mean or median (:mod:`server.strategy`), each with central DP when ``privacy="dp"`` (:mod:`server.dp`)."""

from __future__ import annotations

from shared_model.config import FederatedConfig

from .dp import DPFedAdam, DPFedAvg
from .strategy import (
    WEIGHT_KEY,
    ValidatedAggregation,
    ValidatedFedAdam,
    ValidatedFedAvg,
    ValidatedFedMedian,
    ValidatedFedTrimmedAvg,
)


def make_strategy(cfg: FederatedConfig, num_nodes: int) -> ValidatedAggregation:
    """The strategy a config asks for; the minimum node counts follow the cohort (so a run never waits)."""
    sample = max(1, round(cfg.fraction_train * num_nodes))
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=sample,
        min_evaluate_nodes=1,
        min_available_nodes=num_nodes,
        weighted_by_key=WEIGHT_KEY,
    )
    dp = cfg.privacy == "dp"
    if cfg.server_optimizer == "fedadam":
        strategy: ValidatedAggregation = (DPFedAdam if dp else ValidatedFedAdam)(
            eta=cfg.server_lr, tau=cfg.server_tau, **common
        )
        if isinstance(strategy, ValidatedFedAdam):
            strategy.robust, strategy.trim_fraction = cfg.aggregation, cfg.trim_fraction
            strategy.robust_scope, strategy.tau_items = cfg.robust_scope, cfg.server_tau_items
    elif cfg.aggregation == "trimmed-mean":
        strategy = ValidatedFedTrimmedAvg(beta=cfg.trim_fraction, **common)
    elif cfg.aggregation == "median":
        strategy = ValidatedFedMedian(**common)
    else:
        strategy = (DPFedAvg if dp else ValidatedFedAvg)(**common)
    strategy.setup_validation(cfg.norm_bound, cfg.min_reply_fraction, cfg.clip_norm, cfg.row_clip)
    if dp:
        strategy.setup_dp(cfg.dp_noise, cfg.dp_clip, cfg.dp_delta, sample, num_nodes)
    return strategy
