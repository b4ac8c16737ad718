"""Full-softmax cross-entropy over a large output table, fused and chunked, with per-item interest routing.

A row ``n`` carries ``H`` interest vectors ``v_nh`` (d) and log-priors ``c_nh``; item ``i`` is scored by the
interests that match it, ``s_ni = log sum_h exp(v_nh . w_i + c_nh) + b_i`` (a soft maximum: the best-matching
interest dominates, and each head's share of the item is its softmax weight; ``H = 1``, ``c = 0``: the plain
``x . w_i + b_i`` of a single-vector model). The unfused form materialises an (N, H, V) logit tensor, its
log-softmax and, in the backward pass, more tensors of that size: at N = 128 x 200 positions and V = 3,416
items that is 350 MB per tensor for one head and most of a training step on a CPU.
:func:`routed_softmax_cross_entropy` computes the same loss and the same gradients row chunk by row chunk, and
treats every (head, item) term as one logit of a joint softmax (``sum_i exp(s_i)`` is the sum of the terms'
exponentials): the forward pass keeps only the per-row log-sum-exp over all terms, the backward pass recomputes
each chunk's terms and their ``exp(term - lse)``, which is each head's share of each item's probability, so no
per-item log-sum-exp over heads or head softmax is ever formed (one exponential per term each way). Each chunk
stays in cache and nothing of size (N, V) is stored; every model of the project trains on it (tested equal to
the reference in float64, values and gradients). The cost grows with H: H dot products per (row, item), as any
exact per-item routing needs (measured in ``simulations/bench_efficiency.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

CE_CHUNK_LOGITS = 256  # (row, interest) pairs per chunk: 256 x 3,416 logits (3.5 MB) was fastest on 2 cores


def _chunk_logits(v: Tensor, prior: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Every head's term ``v . w_i + c + b_i`` for a chunk: v (c, H, d), prior (c, H) -> (c, H, V)."""
    logits = torch.addmm(bias, v.flatten(0, 1), weight.T).view(*v.shape[:2], -1)
    return logits.add_(prior[:, :, None])


class _RoutedSoftmaxCE(torch.autograd.Function):
    """Uses ``sum_i exp(s_i) = sum_(h, i) exp(v_h . w_i + c_h + b_i)``: the log-partition is one log-sum-exp
    over every (head, item) term, and each term's gradient is its own ``exp(term - lse)`` (its head's share of
    the item's softmax probability), less the head's softmax weight at the target item. One exponential per
    term forward and one backward, whatever H."""

    @staticmethod
    def forward(
        ctx, v: Tensor, prior: Tensor, weight: Tensor, bias: Tensor, target: Tensor, chunk: int
    ) -> Tensor:  # type: ignore[override]
        lse = v.new_empty(len(v))
        picked = v.new_empty(len(v))
        for s in range(0, len(v), chunk):
            logits = _chunk_logits(v[s : s + chunk], prior[s : s + chunk], weight, bias)
            at_target = logits.gather(2, target[s : s + chunk, None, None].expand(-1, v.shape[1], 1))[:, :, 0]
            picked[s : s + chunk] = torch.logsumexp(at_target, dim=1)
            lse[s : s + chunk] = torch.logsumexp(logits.flatten(1), dim=1)
        ctx.save_for_backward(v, prior, weight, bias, target, lse)
        ctx.chunk = chunk
        return (lse - picked).mean()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        v, prior, weight, bias, target, lse = ctx.saved_tensors
        chunk, heads = ctx.chunk, v.shape[1]
        grad_v = torch.empty_like(v)
        grad_prior = torch.empty_like(prior)
        grad_w = torch.zeros_like(weight)
        grad_b = torch.zeros_like(bias)
        scale = grad / len(v)
        for s in range(0, len(v), chunk):
            vc, tc = v[s : s + chunk], target[s : s + chunk, None, None].expand(-1, heads, 1)
            logits = _chunk_logits(vc, prior[s : s + chunk], weight, bias)
            at_target = logits.gather(2, tc).softmax(1)  # each head's share of the target item
            routed = logits.sub_(lse[s : s + chunk, None, None]).exp_()  # each head's share of each item's p
            routed.scatter_add_(2, tc, -at_target).mul_(scale)
            grad_b.add_(routed.sum((0, 1)))
            grad_prior[s : s + chunk] = routed.sum(-1)
            flat = routed.flatten(0, 1)
            grad_v[s : s + chunk] = (flat @ weight).view_as(vc)
            grad_w.addmm_(flat.T, vc.flatten(0, 1))
        return grad_v, grad_prior, grad_w, grad_b, None, None


def routed_softmax_cross_entropy(
    v: Tensor, prior: Tensor, weight: Tensor, bias: Tensor, target: Tensor, chunk: int | None = None
) -> Tensor:
    """Mean cross-entropy of the routed scores ``logsumexp_h (v[n, h] . weight[i] + prior[n, h]) + bias[i]``
    over the N rows; ``v`` (N, H, d), ``prior`` (N, H), ``weight`` (V, d), ``bias`` (V,), ``target`` (N,)
    int64 in [0, V). Same value and gradients as the unfused form."""
    if len(v) == 0:
        raise ValueError("routed_softmax_cross_entropy needs at least one row")
    chunk = chunk or max(1, CE_CHUNK_LOGITS // v.shape[1])
    return _RoutedSoftmaxCE.apply(v, prior, weight, bias, target, chunk)


def full_softmax_cross_entropy(
    x: Tensor, weight: Tensor, bias: Tensor, target: Tensor, chunk: int | None = None
) -> Tensor:
    """Mean of ``cross_entropy(x @ weight.T + bias, target)`` over the N rows of ``x`` (N, d): the routed
    loss with one interest and no prior."""
    return routed_softmax_cross_entropy(x[:, None], x.new_zeros(len(x), 1), weight, bias, target, chunk)
