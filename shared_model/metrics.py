"""Full-ranking metrics: Recall@K, NDCG@K and MRR for items, Recall/NDCG@K for
explanations.

One rank definition serves both: the rank of a target is the number of *other* candidates that score at
least as high as it (0 = first). Ties therefore count against the target, so a model that gives every item
the same score gets no credit. Item ranking masks the user's history (every item already seen, except the
target itself), as LRURec does. Everything is vectorised over a batch of rows; callers evaluate in batches
and concatenate ranks.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .data.log import Ragged

DEFAULT_KS = (10, 20)


def _as_scores(scores: object) -> np.ndarray:
    if hasattr(scores, "detach"):  # a torch tensor, without importing torch here
        scores = scores.detach().cpu().numpy()
    arr = np.asarray(scores)
    if arr.ndim != 2:
        raise ValueError(f"scores must be 2-D (rows x candidates), got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError("scores contain NaN")
    return arr


def target_ranks(scores: object, targets: np.ndarray, exclude: Ragged | None = None) -> np.ndarray:
    """0-based pessimistic rank of ``targets[b]`` in row ``b`` of ``scores``, ignoring ``exclude.row(b)``.

    ``exclude`` (for example each user's history) never hides the target itself.
    """
    s = _as_scores(scores)
    targets = np.asarray(targets, dtype=np.int64)
    rows = np.arange(len(s))
    if len(targets) != len(s):
        raise ValueError(f"{len(targets)} targets for {len(s)} score rows")
    if len(s) and (targets.min() < 0 or targets.max() >= s.shape[1]):
        raise ValueError("target index outside the candidate range")
    keep = np.ones(s.shape, dtype=bool)
    if exclude is not None:
        if len(exclude) != len(s):
            raise ValueError(f"{len(exclude)} exclusion rows for {len(s)} score rows")
        keep[np.repeat(rows, exclude.lengths()), exclude.ids] = False
        keep[rows, targets] = True
    t = s[rows, targets][:, None]
    return ((s >= t) & keep).sum(axis=1) - 1


def ranking_metrics(ranks: np.ndarray, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean Recall@K, NDCG@K (one relevant item per row) and MRR from 0-based ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("no ranks to summarise")
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float((hit / np.log2(ranks + 2)).mean())
    out["mrr"] = float((1.0 / (ranks + 1)).mean())
    return out


def multilabel_metrics(scores: object, targets: Ragged, ks: Iterable[int] = (10,)) -> dict[str, float]:
    """Recall@K and NDCG@K when each row has a set of relevant ids (explanations).

    Rows without any relevant id are skipped; ``"rows"`` in the result says how many were scored.
    """
    s = _as_scores(scores)
    if len(targets) != len(s):
        raise ValueError(f"{len(targets)} target rows for {len(s)} score rows")
    lengths = targets.lengths()
    scored = lengths > 0
    if not scored.any():
        raise ValueError("no row has a relevant id")
    row_of = np.repeat(np.arange(len(s)), lengths)
    t = s[row_of, targets.ids][:, None]
    ranks = (s[row_of] >= t).sum(axis=1) - 1  # pessimistic, as target_ranks
    out: dict[str, float] = {"rows": float(scored.sum())}
    for k in ks:
        hit = ranks < k
        hits = np.bincount(row_of, weights=hit, minlength=len(s))
        dcg = np.bincount(row_of, weights=hit / np.log2(ranks + 2), minlength=len(s))
        discounts = np.cumsum(1.0 / np.log2(np.arange(k) + 2))
        idcg = discounts[np.minimum(lengths, k) - 1]
        out[f"recall@{k}"] = float((hits[scored] / lengths[scored]).mean())
        out[f"ndcg@{k}"] = float((dcg[scored] / idcg[scored]).mean())
    return out
