"""The composed TME-PSR model and its loss.

    item embedding (shared) + dual-view gated time encoder (personal)
        -> multihead LRU blocks (personal) -> interest heads (personal)
        -> item scores  F.linear(u, item table, item bias)       (shared table)
        -> explanation branch with dynamic MI weighting           (shared)

Interest heads: head ``h`` reads the channels of LRU head ``h`` and projects them to a sub-interest vector
``v_h`` (the heads of one state get equal norms, so they compete by direction); a gate on the state gives each
head a log-prior ``c_h = log a_h`` (how active that interest is now). Each item is scored by the interests that
match it (per-item routing, as multi-interest recommenders such as ComiRec/MIND serve), a soft maximum
``s_i = log sum_h exp(<v_h, e_i> + c_h) + b_i``: the best-matching head dominates, so the head that drove a
recommendation is the one with the largest term, and different items come from different heads. Training is
exact full-softmax cross-entropy over these routed scores
(:func:`~shared_model.softmax_ce.routed_softmax_cross_entropy`, chunked), each head scored in its own
``d / H`` coordinates: ``<v_h, e_i> = <slice_h, proj_h e_i>``, so routing over all heads costs the
multiply-adds of one d-wide dot product per item.

Loss: ``CE_items + alpha * CE_explanations + beta * L_MI + gamma * L_reg + head_balance * L_bal +
responsibility_balance * L_resp``; ``L_reg`` penalises the squared cosine similarity between different heads'
sub-interest vectors, ``L_bal`` is the mean KL divergence of each state's head prior from uniform (no state hands
every item to one head), ``L_resp`` the KL divergence from uniform of the heads' mean responsibility for the
batch's target items (each head's softmax share of its target's score), so every head serves some of the
items users go on to choose. Without the first two and the equal norms one head took every top item (measured
on ML-100k: 99% of the top-10 items of 300 users); with them but without ``L_resp`` one of four heads drove 0.1%
of the shown items (ML-100k seed 0, all 943 users' top-10s: 5% / 24% / 71% / 0.1%); with ``L_resp`` (0.1)
17% / 24% / 48% / 11% at the same validation NDCG@10 (0.1233 vs 0.1245).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batching import Batch
from .config import ModelConfig
from .dropout import Dropout
from .explanation import ExplanationBranch
from .lru import LRUEncoder
from .sequence_model import SequenceModel
from .softmax_ce import head_item_tables, target_terms
from .time_encoder import DualViewGatedTimeEncoder


class InterestHeads(nn.Module):
    """Sub-interest vectors per head and their state-dependent log-priors (personal)."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        d_head = d_model // num_heads
        self.proj = nn.Parameter(torch.randn(num_heads, d_head, d_model) / d_head**0.5)
        self.gate = nn.Linear(d_model, num_heads)

    def forward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``y`` (..., d) -> sub-interests ``v`` (..., H, d) and log-priors ``c = log a`` (..., H)."""
        _, v, scale, prior, _ = self._parts(y)
        return v * scale, prior

    def coordinates(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``y`` (..., d) -> each sub-interest in its head's coordinates (..., H, d_head), with
        ``v_h = coordinates_h @ proj_h``, and log-priors (..., H)."""
        slices, _, scale, prior, _ = self._parts(y)
        return slices * scale, prior

    def training_terms(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`coordinates` and the cosines between each state's sub-interests (..., H, H), from their
        Gram matrix (whose diagonal also gives the norms: no pass over the (..., H, d) sub-interests for
        them, which made the heads' share of a training step twice as large)."""
        slices, _, scale, prior, cosines = self._parts(y, cosines=True)
        return slices * scale, cosines, prior

    def item_tables(self, table: Tensor) -> Tensor:
        """Every item in each head's coordinates, (H, V, d_head): ``coordinates_h . item_tables[h, i]`` is
        ``v_h . table[i]``, at d_head instead of d multiply-adds."""
        return head_item_tables(table, self.proj)

    def _parts(
        self, y: Tensor, cosines: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """Head slices (..., H, d_head), unscaled sub-interests (..., H, d), the equal-norm scale (..., H, 1),
        log-priors (..., H) and, with ``cosines``, the sub-interests' cosines (..., H, H)."""
        slices = y.unflatten(-1, (self.num_heads, -1)).movedim(-2, 0)  # (H, ..., d_head)
        # v_h = slices_h @ proj_h as one batched matmul over heads: what einsum("...hk,hkd->...hd") computes
        # (bit for bit), but an ONNX MatMul instead of the slower Einsum kernel
        v = (slices.flatten(1, -2) @ self.proj).unflatten(1, slices.shape[1:-1]).movedim(0, -2)
        cos = None
        if cosines:  # the squared norms are the Gram matrix' diagonal
            gram = v @ v.transpose(-1, -2)
            norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(1e-12).sqrt().unsqueeze(-1)
            cos = gram / (norms * norms.transpose(-1, -2))
        else:
            norms = v.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        # equal norms across a state's heads (their mean norm): heads compete by direction and prior, so one
        # large-norm head cannot own every top item
        scale = norms.mean(-2, keepdim=True) / norms
        return slices.movedim(0, -2), v, scale, torch.log_softmax(self.gate(y), dim=-1), cos


class TMEPSR(SequenceModel):
    """TME-PSR sequence recommender; any module can be switched off through :class:`ModelConfig`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        d = cfg.d_model
        self.time_encoder = DualViewGatedTimeEncoder(d, cfg.time_unit, cfg.max_len) if cfg.use_time else None
        self.encoder = LRUEncoder(d, cfg.num_heads, cfg.num_blocks, cfg.dropout, cfg.lru_state_expansion)
        self.embed_norm = nn.LayerNorm(d, bias=False) if cfg.embed_norm else None
        self.interests = InterestHeads(d, cfg.num_heads)
        # the heads' shares of the whole population's target items (H,), when known: a federated device trains
        # on one user, whose own items need not spread over the heads; the responsibility balance then steers
        # toward the heads the population under-uses (uniform shares: no steering). None: the batch's own.
        self.population_share: Tensor | None = None
        self.explanation = (
            ExplanationBranch(
                d,
                cfg.num_explanations,
                cfg.dynamic_mi,
                cfg.mi_per_user,
                cfg.mi_temperature,
                cfg.explanation_rank_prior,
                cfg.explanation_history_prior,
            )
            if cfg.use_explanations
            else None
        )
        self.dropout = Dropout(cfg.dropout)

    # ------------------------------------------------------------------ encoding and scoring
    def embed(self, items: Tensor, times: Tensor, mask: Tensor) -> Tensor:
        """Input vectors (B, L, d): item embedding plus time vector; exactly zero at padding."""
        x = self.item_emb(items)
        if self.time_encoder is not None:
            x = x + self.time_encoder(times, mask)
        return self._normed(self.dropout(x)) * mask.unsqueeze(-1)

    def _normed(self, x: Tensor) -> Tensor:
        """The optional input LayerNorm (bias-free: a padded zero vector stays zero)."""
        return x if self.embed_norm is None else self.embed_norm(x)

    def encode_grid(self, batch: Batch) -> Tensor:
        """States (B, L, d): the LRU encoder output after each event (parallel scan)."""
        return self.encoder(self.embed(batch.items, batch.times, batch.mask))

    def initial_state(self, batch: int) -> tuple[Tensor, Tensor]:
        """Zero recurrent state: (LRU state (B, blocks, H, d_state, 2), time-encoder state (B, S))."""
        time_state = (
            self.time_encoder.initial_state(batch)
            if self.time_encoder is not None
            else self.item_bias.new_zeros(batch, 0)
        )
        return self.encoder.initial_state(batch), time_state

    def step(
        self, items: Tensor, times: Tensor, lru_state: Tensor, time_state: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """O(1) update with one event per row (dense ``items`` (B,), ``times`` (B,)): the new state vector
        (B, d) (what :meth:`encode` gives at the last position) and the new recurrent states. Eval mode only."""
        x = self.item_vectors(items)
        if self.time_encoder is not None:
            t_vec, time_state = self.time_encoder.step(times, time_state)
            x = x + t_vec
        y, lru_state = self.encoder.step(self._normed(x), lru_state)
        return y, lru_state, time_state

    def reencode(self, items: Tensor, times: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Re-encode left-padded histories (dense ``items``, ``times`` (B, L); ``mask`` True at real events)
        with the parallel scan: the last state vector (B, d) and the recurrent states that rolling
        :meth:`step` over the same events from :meth:`initial_state` reaches. Eval mode only."""
        x = self.embed(torch.where(mask, items + 1, 0), times, mask)
        y, lru_state = self.encoder.scan_with_state(x)
        time_state = (
            self.time_encoder.state_after(times, mask)
            if self.time_encoder is not None
            else y.new_zeros(items.shape[0], 0)
        )
        return y[:, -1], lru_state, time_state

    def interests_of(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """Sub-interest vectors ``v_h`` (..., H, d) and log-priors ``c_h`` (..., H) that score items."""
        return self.interests(states)

    def item_vectors(self, items: Tensor) -> Tensor:
        """Embeddings of dense item ids (...,) -> (..., d): the table without its padding row, as scored
        (an exported graph then gathers from the table it scores against)."""
        return F.embedding(items, self.item_emb.weight[1:])

    def item_scores(self, states: Tensor) -> Tensor:
        """The base class's scores (``logsumexp_h (v_h . e_i + c_h) + b_i``) from :meth:`_head_logits`, with the
        log-sum-exp by its maximum, head by head (elementwise Max, Exp and Add: faster than reductions over the
        head axis, in torch and in onnxruntime) and the exponentials taken in place: evaluating 4,096 Beauty
        5-core users (12,101 items) took 4.2 s instead of 8.6 s. The exported graphs rank with :meth:`top_items`
        (the same order without a log per item)."""
        if self.cfg.num_heads == 1:
            return super().item_scores(states)
        logits = self._head_logits(states.reshape(-1, states.shape[-1]))  # (H, N, V)
        top = functools.reduce(
            torch.maximum, logits.unbind(0)
        )  # elementwise: onnxruntime reduces axis 0 slowly
        scores = top + functools.reduce(torch.add, (logits - top).exp_().unbind(0)).log()
        return scores.reshape(*states.shape[:-1], -1)

    def _head_logits(self, states: Tensor) -> Tensor:
        """Every head's term plus the item's bias, ``l_hi + b_i = <v_h, e_i> + c_h + b_i``, for states (N, d):
        (H, N, num_items). Computed in each head's coordinates (:meth:`InterestHeads.item_tables`: d_head instead
        of d multiply-adds per head and item), the prior and the bias entering the matmul as two extra
        coordinates, ``[a_h, c_h, 1] . [u_hi, 1, b_i]``: the augmented tables depend on the weights only, so an
        exported graph gets them once per set of weights, and no elementwise pass over (H, N, V) adds them."""
        a, prior = self.interests.coordinates(states)  # (N, H, d_head), (N, H)
        ones = torch.ones_like(prior)
        a = torch.cat((a, prior.unsqueeze(-1), ones.unsqueeze(-1)), dim=-1).transpose(
            0, 1
        )  # (H, N, d_head + 2)
        tables = self.interests.item_tables(self.item_emb.weight[1:])  # (H, V, d_head)
        column = torch.ones_like(tables[..., :1])
        bias = self.item_bias[1:, None].expand_as(column)
        return a @ torch.cat((tables, column, bias), dim=-1).transpose(1, 2)

    def top_items(self, states: Tensor, exclude: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` best items of :meth:`item_scores` for states (N, d), leaving out ``exclude`` (N, V) bool:
        (scores, dense items), each (N, k). Ranked without a logarithm per item: ``s_i = log(r_i) + M`` with
        ``r_i = sum_h exp(l_hi + b_i - M)`` (``M``: the state's largest ``l_hi + b_i``), so only the ``k`` winners
        take a log, and the heads are summed by a matmul with ones: on-device scoring and top-10 of 3,416 items
        in fewer graph nodes (onnxruntime's cost per node is most of a step's). The same ranking as
        :meth:`item_scores` up to rounding. Excluded items rank below every other item (score -inf); an item
        scoring more than ~87 below the state's best (float32 underflow of ``r_i``) also gets -inf, which only
        matters if fewer than ``k`` items are within that range."""
        if self.cfg.num_heads == 1:
            return self.item_scores(states).masked_fill(exclude, -torch.inf).topk(k, dim=-1)
        logits = self._head_logits(states)  # (H, N, V): l_hi + b_i
        top = logits.amax(dim=-1, keepdim=True).amax(dim=0)  # (N, 1): onnxruntime reduces the last axis fast
        heads, rows, num = logits.shape
        ranked = (logits.new_ones(1, heads) @ (logits - top).exp().reshape(heads, -1)).reshape(rows, num)
        values, items = ranked.masked_fill(exclude, -1.0).topk(k, dim=-1)
        return values.clamp(min=0).log() + top, items

    def head_contributions(self, states: Tensor, items: Tensor) -> Tensor:
        """Each head's term ``<v_h, e_i> + c_h`` for dense ``items`` (N, K) given ``states`` (N, d):
        (N, K, H). Their log-sum-exp is the item's score without its bias; the largest term's head drove the
        recommendation."""
        v, prior = self.interests(states)
        return self.item_vectors(items) @ v.transpose(-1, -2) + prior.unsqueeze(-2)

    def explanation_scores(self, states: Tensor, items: Tensor) -> Tensor:
        """Explanation-vocabulary scores for (state, dense item) pairs: states (N, d), items (N,) -> (N, V)."""
        if self.explanation is None:
            raise RuntimeError("this model was configured without the explanation branch")
        return self.explanation.scores(self.explanation.query(states, self.item_vectors(items)))

    # ------------------------------------------------------------------ training loss
    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Total loss and its parts for a training batch (targets and explanation labels filled in)."""
        assert batch.targets is not None, "training batches carry targets"
        states = self.encode(batch)
        has_target = batch.targets > 0
        # once, for the item loss and the head regulariser
        a, cosines, prior = self.interests.training_terms(states[has_target])
        tables = self.interests.item_tables(self.item_emb.weight[1:])
        ce_items = self.item_loss(a, prior, tables, batch.targets[has_target] - 1)
        total = ce_items
        parts = {"ce_items": ce_items.item()}
        if self.cfg.num_heads > 1 and self.cfg.gamma > 0:
            squares = cosines.pow(2)  # the off-diagonal ones: every square minus the diagonal's (ones)
            off = squares.sum((-1, -2)) - squares.diagonal(dim1=-2, dim2=-1).sum(-1)
            reg = off.mean() / (self.cfg.num_heads * (self.cfg.num_heads - 1))
            total = total + self.cfg.gamma * reg
            parts["reg_heads"] = reg.item()
        if self.cfg.num_heads > 1 and self.cfg.head_balance > 0:  # mean KL(each state's prior || uniform)
            balance = (prior.exp() * (prior + math.log(self.cfg.num_heads))).sum(-1).mean()
            total = total + self.cfg.head_balance * balance
            parts["balance_heads"] = balance.item()
        if self.cfg.num_heads > 1 and self.cfg.responsibility_balance > 0:
            at_target = target_terms(a, prior, tables, batch.targets[has_target] - 1)
            share = at_target.softmax(-1).mean(0)  # each head's share of the batch's targets
            if self.population_share is None:  # KL(the batch's shares || uniform)
                spread = (share * (share * self.cfg.num_heads).clamp_min(1e-9).log()).sum()
            else:  # that KL's gradient at the population's shares, applied to this batch's shares (floored
                # at a tenth of uniform: the estimate lags the model, and an unused head's pull stays bounded)
                spread = (share * (self.population_share * self.cfg.num_heads).clamp_min(0.1).log()).sum()
            total = total + self.cfg.responsibility_balance * spread
            parts["balance_responsibility"] = spread.item()
            parts |= {f"head_share_{h}": float(x) for h, x in enumerate(share.tolist())}
        if self.explanation is not None and batch.expl_pos is not None and len(batch.expl_pos):
            positions, slot = torch.unique(batch.expl_pos, return_inverse=True)
            flat_states = states.reshape(-1, states.shape[-1])[positions]
            target_items = batch.targets.reshape(-1)[positions]
            item_vec = self.item_emb(target_items)
            query = self.explanation.query(flat_states, item_vec)
            labels = (slot, batch.expl_ids, batch.expl_weight)
            ce_expl = self.explanation.cross_entropy(query, *labels)
            mi = self.explanation.mi_loss(flat_states, query, item_vec, target_items, *labels)
            total = total + self.cfg.alpha * ce_expl + self.cfg.beta * mi
            parts |= {"ce_expl": ce_expl.item(), "mi": mi.item()}
        parts["loss"] = total.item()
        return total, parts
