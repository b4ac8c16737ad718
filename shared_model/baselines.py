"""Non-learned baselines evaluated with the same protocol: item popularity and explanation popularity."""

from __future__ import annotations

from typing import Literal

import numpy as np

from .batching import history_of
from .data.log import InteractionLog, Ragged
from .data.split import LeaveOneOutSplit
from .metrics import multilabel_metrics, ranking_metrics, target_ranks


def _targets(log: InteractionLog, split: LeaveOneOutSplit, stage: Literal["val", "test"]):
    target = split.target_events(stage)
    return log.user_ptr[split.eval_users], target


def popularity_item_metrics(
    log: InteractionLog, split: LeaveOneOutSplit, stage: Literal["val", "test"], batch_size: int = 1024
) -> dict[str, float]:
    """Rank items by their count among training events (history masked, as for every model)."""
    counts = np.bincount(log.item[split.train_mask], minlength=log.num_items).astype(np.float32)
    starts, target = _targets(log, split, stage)
    ranks = [
        target_ranks(
            np.broadcast_to(counts, (len(target[b : b + batch_size]), log.num_items)),
            log.item[target[b : b + batch_size]],
            history_of(log, starts[b : b + batch_size], target[b : b + batch_size]),
        )
        for b in range(0, len(target), batch_size)
    ]
    return ranking_metrics(np.concatenate(ranks))


def popularity_explanation_metrics(
    log: InteractionLog, split: LeaveOneOutSplit, stage: Literal["val", "test"]
) -> dict[str, float]:
    """Explanation baselines given the target item: global label popularity, and the labels most often
    attached to that same item in training (``item_*``; a stronger, item-aware reference)."""
    if not len(log.vocab):
        raise ValueError(f"{log.name} has no explanation vocabulary")
    train = np.flatnonzero(split.train_mask)
    labels = log.explanations.take(train)
    rows = np.repeat(train, labels.lengths())
    global_counts = np.bincount(labels.ids, minlength=len(log.vocab)).astype(np.float64)
    per_item = np.zeros((log.num_items, len(log.vocab)))
    np.add.at(per_item, (log.item[rows], labels.ids), 1.0)
    _, target = _targets(log, split, stage)
    truth: Ragged = log.explanations.take(target)
    glob = multilabel_metrics(np.broadcast_to(global_counts, (len(target), len(log.vocab))), truth, ks=(10,))
    # ties among unseen labels fall back to global popularity
    item_scores = per_item[log.item[target]] + global_counts / (global_counts.sum() + 1)
    item = multilabel_metrics(item_scores, truth, ks=(10,))
    return {
        "expl_recall@10": glob["recall@10"],
        "expl_ndcg@10": glob["ndcg@10"],
        "item_expl_recall@10": item["recall@10"],
        "item_expl_ndcg@10": item["ndcg@10"],
    }
