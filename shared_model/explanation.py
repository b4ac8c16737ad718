"""Explanation branch with dynamic dual-branch mutual-information weighting (shared).

For a user state ``h`` (the sequence encoder's output before the next event) and an item ``e`` (the item
being recommended, or at training time the true next item), the explanation encoder builds a query
``q = MLP([h; e; h * e])`` and ranks the whole explanation vocabulary by ``q . E_x + b_x``.

Two InfoNCE lower bounds align the branches:

* ``nce_rec``: recommendation state <-> the explanation(s) of the next event, with every explanation in the
  vocabulary as a candidate (no false negatives from repeated labels in a batch);
* ``nce_exp``: explanation state ``q`` <-> the item it explains, with the other items of the batch as
  negatives (positions whose item repeats are masked out of each other's negatives).

The dynamic part: a small network maps each user state to two log-variances ``s``; the MI loss is
``exp(-s_1) nce_rec + s_1 + exp(-s_2) nce_exp + s_2`` (uncertainty weighting), so every user gets their own
balance of the two terms. ``dynamic=False`` fixes ``s = 0`` (equal, fixed weights); ``per_user=False`` learns one
``s`` for everyone (uncertainty weighting without the user's state: the control for the per-user network).

What is shown for an item is ranked among the ids attested for that item only (:meth:`ExplanationBranch.shown_top`; the
table: :func:`~shared_model.data.explanations.attested_explanations`), so an explanation always applies to
the item it explains. The shown ranking adds a prior from that table's order (the ids most used on the item
first): ``- explanation_rank_prior * log(1 + rank)``. Measured on Musical Instruments (review phrases, test,
converged TME-PSR): the branch alone ranks attested phrases at 0.87x the NDCG@10 of the item-aware popularity
baseline, the branch with the prior at 0.99x, the table's order alone at 0.95x; the branch adds what the user's
state says to what the item's reviews say. It also adds the user's own history: ``+ explanation_history_prior *
log(1 + n)``, ``n`` the number of the user's events (those the recurrent state has seen) whose item has the id
attested (:func:`history_counts`): among a film's genres, the one the user watches most; a device knows it from
its own history, without any label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .softmax_ce import soft_target_cross_entropy

MAX_NCE_ITEMS = 512  # positions sampled for the in-batch item InfoNCE (keeps it O(512^2))


class ExplanationBranch(nn.Module):
    """Explanation embeddings, the (state, item) -> explanation encoder, and the MI terms."""

    def __init__(
        self,
        d_model: int,
        num_explanations: int,
        dynamic: bool = True,
        per_user: bool = True,
        temperature: float = 0.2,
        rank_prior: float = 0.0,
        history_prior: float = 0.0,
    ) -> None:
        super().__init__()
        self.rank_prior, self.history_prior = rank_prior, history_prior
        self.embedding = nn.Embedding(num_explanations, d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.bias = nn.Parameter(torch.zeros(num_explanations))
        self.encoder = nn.Sequential(nn.Linear(3 * d_model, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.rec_proj = nn.Linear(d_model, d_model)
        self.exp_proj = nn.Linear(d_model, d_model)
        self.weigher = (
            nn.Sequential(nn.Linear(d_model, d_model // 2), nn.Tanh(), nn.Linear(d_model // 2, 2))
            if dynamic and per_user
            else None
        )
        # the control for the per-user weigher: uncertainty weighting with one pair of learned log-variances
        self.log_variances = nn.Parameter(torch.zeros(2)) if dynamic and not per_user else None
        self.temperature = temperature

    def history_bonus(self, counts: Tensor) -> Tensor:
        """What the user's history adds to each id's shown score, ``history_prior * log(1 + n)``, from the counts
        of :func:`history_counts` (..., V): computed once per state, then shared by every item it ranks."""
        return self.history_prior * torch.log1p(counts)

    def input_bonus(self, candidates: Tensor, items: Tensor, mask: Tensor) -> Tensor | None:
        """:meth:`history_bonus` of a model input's events (``items`` (B, L) as a
        :class:`~shared_model.batching.Batch` holds them, item id + 1; ``mask`` (B, L) True at events;
        ``candidates`` the ids attested per item, (num_items, M), -1 padded): (B, V), or None when the prior is
        off."""
        if not self.history_prior:
            return None
        ids = candidates[(items - 1).clamp(min=0)]
        return self.history_bonus(history_counts(ids, self.embedding.num_embeddings, mask))

    def shown_scores(self, scores: Tensor, candidates: Tensor, bonus: Tensor | None = None) -> Tensor:
        """The scores the shown ranking sorts by: :func:`attested_only` with this branch's rank prior, plus the
        :meth:`history_bonus` ``bonus`` (rows like ``scores``, or one row for all; None: no history)."""
        shown = attested_only(scores, candidates, self.rank_prior)
        return shown if bonus is None else shown + bonus

    def shown_top(self, scores: Tensor, candidates: Tensor, k: int, bonus: Tensor | None = None) -> Tensor:
        """The ``k`` ids shown for each row (N, k) by :meth:`shown_scores`, best first; -1 where a row has
        fewer than ``k`` candidates."""
        top = self.shown_scores(scores, candidates, bonus).topk(k, dim=1)
        return torch.where(top.values > -torch.inf, top.indices, -1)

    def query(self, state: Tensor, item_vec: Tensor) -> Tensor:
        """Explanation state for (user state, item): (..., d)."""
        return self.encoder(torch.cat((state, item_vec, state * item_vec), dim=-1))

    def scores(self, query: Tensor) -> Tensor:
        """Scores of every explanation id: (..., num_explanations)."""
        return F.linear(query, self.embedding.weight, self.bias)

    def mi_weights(self, state: Tensor) -> Tensor:
        """Per-user log-variances (N, 2) of the two MI terms (zeros when weighting is fixed, the same learned
        pair for every row when it is global)."""
        if self.weigher is not None:
            return self.weigher(state)
        if self.log_variances is not None:
            return self.log_variances.expand(state.shape[0], 2)
        return state.new_zeros(state.shape[0], 2)

    def cross_entropy(self, query: Tensor, rows: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        """Mean cross-entropy of the whole-vocabulary scores of N queries (N, d) against their labels (label
        ``l``: id ``ids[l]`` of query ``rows[l]`` with weight ``weights[l]``, a query's weights summing to 1)."""
        return soft_target_cross_entropy(query, self.embedding.weight, self.bias, rows, ids, weights)

    def rec_embeddings(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """The recommendation-side InfoNCE term's two sides: the states' projections, normalised and divided by
        the temperature (N, d), and the normalised explanation embeddings (V, d); their product is its logits."""
        z_rec = F.normalize(self.rec_proj(state), dim=-1) / self.temperature
        return z_rec, F.normalize(self.embedding.weight, dim=-1)

    def mi_loss(
        self,
        state: Tensor,
        query: Tensor,
        item_vec: Tensor,
        items: Tensor,
        rows: Tensor,
        ids: Tensor,
        weights: Tensor,
    ) -> Tensor:
        """Dynamically weighted InfoNCE terms for N labelled positions.

        ``state``/``query``/``item_vec`` (N, d); ``items`` (N,) the explained item ids; the explanation labels
        as in :meth:`cross_entropy`.
        """
        tau = self.temperature
        s = self.mi_weights(state)
        z_rec, z_vocab = self.rec_embeddings(state)
        # mean of exp(-s_1) nce_rec + s_1
        rec_term = (
            soft_target_cross_entropy(
                z_rec,
                z_vocab,
                z_vocab.new_zeros(len(z_vocab)),
                rows,
                ids,
                weights,
                row_weight=torch.exp(-s[:, 0]),
            )
            + s[:, 0].mean()
        )

        n = min(len(items), MAX_NCE_ITEMS)
        pick = torch.randperm(len(items), device=items.device)[:n]
        z_q = F.normalize(self.exp_proj(query[pick]), dim=-1)
        z_i = F.normalize(item_vec[pick], dim=-1)
        logits = z_q @ z_i.T / tau
        same_item = items[pick][:, None] == items[pick][None, :]
        logits = logits.masked_fill(same_item & ~torch.eye(n, dtype=torch.bool, device=logits.device), -1e9)
        nce_exp = F.cross_entropy(logits, torch.arange(n, device=logits.device), reduction="none")

        exp_term = torch.exp(-s[pick, 1]) * nce_exp + s[pick, 1]
        return rec_term + exp_term.mean()


def attested_only(scores: Tensor, candidates: Tensor, rank_prior: float = 0.0) -> Tensor:
    """``scores`` (N, V) of the ids that may be shown: ``-inf`` at every id not among the row's ``candidates``
    (N, M, -1 padded, the item's attested ids most used first); an attested id in column ``j`` scores
    ``scores - rank_prior * log(1 + j)``."""
    num = scores.shape[1]
    prior = -rank_prior * torch.log1p(
        torch.arange(candidates.shape[1], dtype=scores.dtype, device=scores.device)
    )
    shown = torch.full((len(scores), num + 1), -torch.inf, dtype=scores.dtype, device=scores.device)
    shown = shown.scatter(1, torch.where(candidates >= 0, candidates, num), prior.expand(len(scores), -1))
    return scores + shown[:, :num]


def history_counts(ids: Tensor, num: int, events: Tensor | None = None) -> Tensor:
    """How often each explanation id occurs in each row of ``ids`` (N, ..., M; -1 = none), as float32 (N,
    ``num``), counting only where ``events`` (N, ...) is True: given the ids attested for a user's items, how many
    of the user's events each id applies to."""
    if events is not None:
        ids = ids.masked_fill(~events[..., None], -1)
    return add_history_counts(torch.zeros(len(ids), num, dtype=torch.float32, device=ids.device), ids)


def add_history_counts(history: Tensor, ids: Tensor) -> Tensor:
    """``history`` (N, V) float32 counts plus those of ``ids`` (N, ...; -1 = none), as :func:`history_counts`
    counts them: a new event's attested ids added to a user's counts (one ScatterElements in an exported
    graph)."""
    ids = ids.reshape(len(ids), -1)
    return history.scatter_add(1, ids.clamp(min=0), (ids >= 0).to(history.dtype))
