"""What every sequence model in tme-psr shares: the item table, routed full-softmax scoring and the item loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batching import Batch
from .config import ModelConfig
from .softmax_ce import routed_softmax_cross_entropy

GROUP_WIDTHS = (8, 16, 32, 64, 128)  # grid widths :meth:`SequenceModel.encode` trims groups of short rows to


class SequenceModel(nn.Module):
    """Base class: an item table (``item_emb``, ``item_bias``; id 0 = padding) scored by interest vectors.

    Subclasses implement :meth:`encode` (states after each event) and either :meth:`user_vector` (one vector
    per state) or :meth:`interests_of` (several interests with log-priors; each item is scored by the
    interests that match it, ``logsumexp_h (v_h . e_i + c_h) + b_i``).
    """

    # :meth:`encode` runs rows in length groups (False: an encoder that skips padding itself)
    groups_rows = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.explanation: nn.Module | None = None  # subclasses with an explanation branch replace it
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.d_model, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.item_bias = nn.Parameter(torch.zeros(cfg.num_items + 1))
        # when a list, :meth:`item_loss` appends the output states it scores (a detached copy of each call's
        # head coordinates and log-priors: what a "states" upload sends, shared_model.softmax_change)
        self.output_states: list[tuple[Tensor, Tensor]] | None = None

    def encode(self, batch: Batch) -> Tensor:
        """States (B, L, d) after each event of a left-padded batch (unspecified at padding).

        Rows run in groups of similar length, each group's grid trimmed to its longest row (widths 8, 16, 32,
        ... up to L): left padding changes no state of any model here (:meth:`encode_grid`), so the states
        are those of the full grid, but short-sequence data skips most padded cells (in a random batch of
        128 Beauty 5-core users, 11% of the 50-wide grid is events). A batch whose rows all need the full
        width is one call on the grid as it is, and so is every batch on a GPU (where each group's kernel
        launches cost more than its padded cells)."""
        if not self.groups_rows or batch.items.device.type != "cpu":
            return self.encode_grid(batch)
        lengths = batch.mask.sum(1)
        width = batch.items.shape[1]
        widths = [w for w in GROUP_WIDTHS if w < width] + [width]
        group = torch.bucketize(lengths, torch.tensor(widths, device=lengths.device))
        present = group.unique().tolist()
        if present == [len(widths) - 1]:
            return self.encode_grid(batch)
        parts, rows = [], []
        for g in present:
            idx = (group == g).nonzero()[:, 0]
            w = widths[g]
            sub = Batch(batch.items[idx, -w:], batch.times[idx, -w:], batch.mask[idx, -w:])
            parts.append(F.pad(self.encode_grid(sub), (0, 0, width - w, 0)))
            rows.append(idx)
        return torch.cat(parts)[torch.argsort(torch.cat(rows))]

    def encode_grid(self, batch: Batch) -> Tensor:
        """States (B, L, d) computed over every cell of the left-padded grid (each model's encoder). Padding
        must change no state: a row's states are the same in any grid wide enough for its events."""
        raise NotImplementedError

    def user_vector(self, states: Tensor) -> Tensor:
        """The vector that scores items, (..., d), for a single-interest model."""
        raise NotImplementedError

    def interests_of(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """Interest vectors (..., H, d) and their log-priors (..., H) of states (..., d); one interest with
        prior 0 (the user vector) unless a subclass has several."""
        u = self.user_vector(states)
        return u.unsqueeze(-2), u.new_zeros(*u.shape[:-1], 1)

    def interest_coordinates(self, states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What the item loss scores: each interest in its own head's coordinates ``a`` (N, H, k), log-priors
        (N, H), and every item in each head's coordinates (H, num_items, k), with ``a_h . tables[h, i]`` the
        interest's dot product with item ``i`` (one interest: the user vector against the item table)."""
        v, prior = self.interests_of(states)
        return v, prior, self.item_emb.weight[1:].expand(v.shape[-2], -1, -1)

    def item_scores(self, states: Tensor) -> Tensor:
        """Scores of every item (..., num_items): column ``i`` is dense item ``i`` (padding dropped), scored by
        the interests that match it, ``logsumexp_h (v_h . e_i + c_h) + b_i``."""
        v, prior = self.interests_of(states)
        if v.shape[-2] == 1:  # one interest: F.linear (the prior of a single interest is 0)
            return F.linear(v[..., 0, :], self.item_emb.weight[1:], self.item_bias[1:])
        logits = torch.matmul(v, self.item_emb.weight[1:].T) + prior.unsqueeze(-1)
        return torch.logsumexp(logits, dim=-2) + self.item_bias[1:]

    def item_loss(self, a: Tensor, prior: Tensor, tables: Tensor, targets: Tensor) -> Tensor:
        """Full-softmax next-item cross-entropy of the routed scores (:meth:`interest_coordinates`) against
        dense item ids (N,)."""
        if self.output_states is not None:
            self.output_states.append((a.detach().clone(), prior.detach().clone()))
        return routed_softmax_cross_entropy(a, prior, tables, self.item_bias[1:], targets)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Training loss and its parts (plain next-item cross-entropy over every position with a target)."""
        assert batch.targets is not None, "training batches carry targets"
        has_target = batch.targets > 0
        states = self.encode(batch)[has_target]
        ce = self.item_loss(*self.interest_coordinates(states), batch.targets[has_target] - 1)
        return ce, {"ce_items": ce.item(), "loss": ce.item()}
