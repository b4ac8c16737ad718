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
        table = _attested_candidates(log)
        candidates = table[items]
        n = min(explanations, candidates.shape[1])
        bonus = model.explanation.input_bonus(table, batch.items, batch.mask)  # one row: the user's
        expl = model.explanation.shown_top(
            model.explanation_scores(state.expand(k, -1), items), candidates, n, bonus
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


def head_profiles(
    heads: np.ndarray,
    items: np.ndarray,
    candidates: np.ndarray,
    num_heads: int,
    top: int = 3,
    min_share: float = 0.1,
) -> list[list[int]]:
    """What each interest head favours: per head, up to ``top`` explanation ids most over-represented among the
    shown items it drove (``heads`` and ``items``: the same shape, one entry per shown item) relative to all shown
    items, by the difference of shares (share among the head's items - share among all: a ratio would favour
    rare ids), counting only ids carried by at least ``min_share`` of the head's items. ``candidates``: per item,
    its attested explanation ids (-1 padded)."""
    heads, items = np.asarray(heads).reshape(-1), np.asarray(items).reshape(-1)
    labels = candidates[items]  # (shown, M)
    num = int(candidates.max(initial=-1)) + 1
    if num == 0:
        return [[] for _ in range(num_heads)]
    rows = np.repeat(np.arange(len(items)), labels.shape[1])
    flat = labels.reshape(-1)
    carried = np.zeros((len(items), num), dtype=bool)
    carried[rows[flat >= 0], flat[flat >= 0]] = True
    overall = carried.mean(0)
    profiles = []
    for h in range(num_heads):
        mine = carried[heads == h]
        if not len(mine):
            profiles.append([])
            continue
        share = mine.mean(0)
        excess = np.where(share >= min_share, share - overall, 0.0)
        best = np.argsort(-excess, kind="stable")[:top]
        profiles.append([int(e) for e in best if excess[e] > 0])
    return profiles


@torch.no_grad()
def head_usage(model: SequenceModel, log: InteractionLog, users: np.ndarray, k: int = 10) -> dict[str, Any]:
    """How the interest heads share the top-``k`` unseen items of ``users`` (each user's whole history): the
    share of users whose list draws on 2+ heads, each head's share of all shown items and, when the log has
    explanation labels, what each head favours (:func:`head_profiles`, as texts)."""
    model.eval()
    starts, ends = log.user_ptr[users], log.user_ptr[users + 1]
    state = model.encode(input_batch(log, starts, ends, model.cfg.max_len))[:, -1]
    scores = model.item_scores(state)
    seen = exclude_mask([log.item[a:b] for a, b in zip(starts, ends, strict=True)], log.num_items)
    scores = scores.masked_fill(torch.from_numpy(seen), -torch.inf)
    items = scores.topk(k).indices
    heads = model.head_contributions(state, items).argmax(-1)
    per_user = torch.tensor([len(set(row)) for row in heads.tolist()])
    shares = torch.bincount(heads.reshape(-1), minlength=model.cfg.num_heads) / heads.numel()
    profiles = (
        head_profiles(heads.numpy(), items.numpy(), _attested_candidates(log).numpy(), model.cfg.num_heads)
        if len(log.vocab)
        else [[] for _ in range(model.cfg.num_heads)]
    )
    return {
        "users": len(users),
        "multi_head_users": float((per_user >= 2).float().mean()),
        "head_shares": [round(float(x), 3) for x in shares],
        "head_favours": [[log.vocab.texts[e] for e in row] for row in profiles],
    }


@torch.no_grad()
def head_sources(
    model: SequenceModel, log: InteractionLog, user: int, heads: list[int], n: int = 3
) -> dict[int, list[int]]:
    """What each of ``heads`` follows in ``user``'s own history: per head, up to ``n`` of the user's last
    ``max_len`` distinct items whose largest head term (:meth:`head_contributions` at the user's current state)
    is that head's, strongest first. A head's index means a different taste for each user (its vector is made
    from the user's history), so this, not a population label, says what it stands for here."""
    model.eval()
    lo, hi = log.user_ptr[user], log.user_ptr[user + 1]
    state = model.encode(input_batch(log, np.array([lo]), np.array([hi]), model.cfg.max_len))[:, -1]
    recent = list(dict.fromkeys(log.item[max(lo, hi - model.cfg.max_len) : hi][::-1].tolist()))
    terms = model.head_contributions(state, torch.tensor([recent]))[0]  # (items, H)
    best, owner = terms.max(-1)
    out = {}
    for h in dict.fromkeys(heads):
        mine = torch.nonzero(owner == h).reshape(-1)
        order = mine[best[mine].argsort(descending=True, stable=True)][:n]
        out[h] = [recent[i] for i in order.tolist()]
    return out


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
