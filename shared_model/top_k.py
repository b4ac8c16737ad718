"""Top-k recommendations with the driving interest head and ranked explanation texts (torch reference path;
the on-device runtime computes the same from the exported graphs)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from .batching import input_batch
from .data.log import InteractionLog
from .data.split import LeaveOneOutSplit
from .graph_io import exclude_mask
from .sequence_model import SequenceModel


@lru_cache(maxsize=2)
def _attested_candidates(log: InteractionLog) -> torch.Tensor:
    """Per item, the explanation ids attested in the log's training events (computed once per log)."""
    return torch.as_tensor(LeaveOneOutSplit(log).explanation_candidates)


@torch.no_grad()
def recommend(
    model: SequenceModel, log: InteractionLog, user: int, k: int = 10, explanations: int = 2
) -> list[dict[str, Any]]:
    """Top-``k`` unseen items for ``user`` given their whole history, each with score, title, the interest
    head that scored it (TME-PSR) and its top attested explanation texts (when the model explains)."""
    model.eval()
    lo, hi = log.user_ptr[user], log.user_ptr[user + 1]
    batch = input_batch(log, np.array([lo]), np.array([hi]), model.cfg.max_len)
    state = model.encode(batch)[:, -1]
    scores = model.item_scores(state)[0]
    scores[torch.as_tensor(np.unique(log.item[lo:hi]))] = -torch.inf
    top = scores.topk(k)
    items = top.indices
    heads = (
        model.head_contributions(state, items[None])[0].argmax(-1)
        if hasattr(model, "head_contributions")
        else None
    )
    expl = None
    if (
        explanations and model.explanation is not None and len(log.vocab)
    ):  # among the ids attested for each item
        candidates = _attested_candidates(log)[items]
        n = min(explanations, candidates.shape[1])
        expl = model.explanation.shown_top(
            model.explanation_scores(state.expand(k, -1), items), candidates, n
        )
    titles = log.item_meta.titles
    out = []
    for r, item in enumerate(items.tolist()):
        out.append(
            {
                "item": str(log.item_ids[item]),
                "title": titles[item] if titles else str(log.item_ids[item]),
                "score": float(top.values[r]),
                "head": None if heads is None else int(heads[r]),
                "explanations": []
                if expl is None
                else [log.vocab.texts[e] for e in expl[r].tolist() if e >= 0],
            }
        )
    return out


@torch.no_grad()
def head_usage(model: SequenceModel, log: InteractionLog, users: np.ndarray, k: int = 10) -> dict[str, Any]:
    """How the interest heads share the top-``k`` unseen items of ``users`` (each user's whole history): the
    share of users whose list draws on 2+ heads, and each head's share of all shown items."""
    model.eval()
    starts, ends = log.user_ptr[users], log.user_ptr[users + 1]
    state = model.encode(input_batch(log, starts, ends, model.cfg.max_len))[:, -1]
    scores = model.item_scores(state)
    seen = exclude_mask([log.item[a:b] for a, b in zip(starts, ends, strict=True)], log.num_items)
    scores = scores.masked_fill(torch.from_numpy(seen), -torch.inf)
    heads = model.head_contributions(state, scores.topk(k).indices).argmax(-1)
    per_user = torch.tensor([len(set(row)) for row in heads.tolist()])
    shares = torch.bincount(heads.reshape(-1), minlength=model.cfg.num_heads) / heads.numel()
    return {
        "users": len(users),
        "multi_head_users": float((per_user >= 2).float().mean()),
        "head_shares": [round(float(x), 3) for x in shares],
    }


def recent_titles(log: InteractionLog, user: int, n: int = 3) -> str:
    """The titles (or ids) of ``user``'s last ``n`` events, oldest first, for display."""
    lo, hi = log.user_ptr[user], log.user_ptr[user + 1]
    titles = log.item_meta.titles
    return ", ".join(titles[i] if titles else str(log.item_ids[i]) for i in log.item[max(lo, hi - n) : hi])


def format_recommendations(recs: list[dict[str, Any]]) -> str:
    lines = []
    for rank, rec in enumerate(recs, start=1):
        head = "" if rec["head"] is None else f" [interest head {rec['head']}]"
        why = f"  because: {'; '.join(rec['explanations'])}" if rec["explanations"] else ""
        lines.append(f"{rank:2d}. {rec['title']} (score {rec['score']:.2f}){head}{why}")
    return "\n".join(lines)
