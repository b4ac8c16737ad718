"""Full-softmax cross-entropy over a large output table, fused and chunked, with per-item interest routing.

A row ``n`` carries ``H`` interest vectors and log-priors ``c_nh``; item ``i`` is scored by the interests that
match it, ``s_ni = log sum_h exp(t_nhi + c_nh) + b_i`` (a soft maximum: the best-matching interest dominates,
and each head's share of the item is its softmax weight; ``H = 1``, ``c = 0``: the plain ``x . w_i + b_i`` of a
single-vector model). Each head's term is a dot product in that head's own coordinates,
``t_nhi = a_nh . u_hi`` with ``a_nh`` (k) and the head's item table ``u_h`` (V, k): a model whose interest
vectors are ``v_nh = a_nh P_h`` (P_h: k x d) scores ``v_nh . w_i = a_nh . (P_h w_i)``, so its heads are scored
against ``u_h = W P_h^T`` at k (not d) multiply-adds per term; with k = d / H, exact routing over all H heads
costs the multiply-adds of a single d-wide head.

The log-partition splits by head: ``log sum_i exp(s_ni) = logsumexp_h (c_nh + Z_nh)`` with
``Z_nh = logsumexp_i (a_nh . u_hi + b_i)``, one :func:`row_logsumexp` per head: the log-sum-exp of
``x . w_i + b_i`` over the whole table, computed row chunk by row chunk (forward: only the per-row result is
kept; backward: each chunk's logits are recomputed and ``exp(logit - lse)`` is the softmax gradient), so nothing
of size (rows, items) is ever stored: at 128 x 200 positions and 3,416 items one such tensor is 350 MB, and the
unfused form keeps several.
"""

from __future__ import annotations

import torch
from torch import Tensor

CE_CHUNK_ROWS = 256  # rows per chunk: 256 x 3,416 logits (3.5 MB) was fastest on 2 cores


class _RowLogSumExp(torch.autograd.Function):
    """``logsumexp_i (x_n . w_i + b_i)`` per row, chunked; backward recomputes each chunk's softmax."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        lse = x.new_empty(len(x))
        for s in range(0, len(x), chunk):
            lse[s : s + chunk] = torch.logsumexp(torch.addmm(bias, x[s : s + chunk], weight.T), dim=1)
        ctx.save_for_backward(x, weight, bias, lse)
        ctx.chunk = chunk
        return lse

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, bias, lse = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight)
        grad_b = torch.zeros_like(bias)
        for s in range(0, len(x), ctx.chunk):
            xc = x[s : s + ctx.chunk]
            p = torch.addmm(bias, xc, weight.T).sub_(lse[s : s + ctx.chunk, None]).exp_()
            p.mul_(grad[s : s + ctx.chunk, None])
            grad_b.add_(p.sum(0))
            grad_x[s : s + ctx.chunk] = p @ weight
            grad_w.addmm_(p.T, xc)
        return grad_x, grad_w, grad_b, None


def row_logsumexp(x: Tensor, weight: Tensor, bias: Tensor, chunk: int = CE_CHUNK_ROWS) -> Tensor:
    """``logsumexp(x @ weight.T + bias, dim=1)`` for x (N, k), weight (V, k), bias (V,) -> (N,), with the
    same gradients, never materialising the (N, V) logits."""
    return _RowLogSumExp.apply(x.contiguous(), weight, bias, chunk)


def target_terms(a: Tensor, prior: Tensor, tables: Tensor, target: Tensor) -> Tensor:
    """Each head's term at each row's target item, ``a[n, h] . tables[h, target[n]] + prior[n, h]`` (N, H):
    their softmax over heads is each head's responsibility for the target."""
    # index_select, not tables[:, target]: its backward (index_add) is deterministic on CPU, advanced
    # indexing's accumulating index_put is not, and runs must repeat bit for bit (resumed training)
    return (a * tables.index_select(1, target).transpose(0, 1)).sum(-1) + prior


def routed_softmax_cross_entropy(
    a: Tensor, prior: Tensor, tables: Tensor, bias: Tensor, target: Tensor, chunk: int = CE_CHUNK_ROWS
) -> Tensor:
    """Mean cross-entropy of the routed scores ``logsumexp_h (a[n, h] . tables[h, i] + prior[n, h]) + bias[i]``
    over the N rows; ``a`` (N, H, k), ``prior`` (N, H), ``tables`` (H, V, k), ``bias`` (V,), ``target`` (N,)
    int64 in [0, V). Same value and gradients as the unfused form."""
    if len(a) == 0:
        raise ValueError("routed_softmax_cross_entropy needs at least one row")
    at_target = target_terms(a, prior, tables, target)
    picked = torch.logsumexp(at_target, dim=1) + bias.index_select(0, target)
    log_z = torch.stack([row_logsumexp(a[:, h], tables[h], bias, chunk) for h in range(a.shape[1])], dim=1)
    return (torch.logsumexp(prior + log_z, dim=1) - picked).mean()


def full_softmax_cross_entropy(
    x: Tensor, weight: Tensor, bias: Tensor, target: Tensor, chunk: int = CE_CHUNK_ROWS
) -> Tensor:
    """Mean of ``cross_entropy(x @ weight.T + bias, target)`` over the N rows of ``x`` (N, d): the routed
    loss with one interest and no prior."""
    return routed_softmax_cross_entropy(x[:, None], x.new_zeros(len(x), 1), weight[None], bias, target, chunk)
