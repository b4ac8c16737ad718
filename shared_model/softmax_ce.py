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
``Z_nh = logsumexp_i (a_nh . u_hi + b_i)``. :func:`mean_log_partition` computes its mean over the rows row
chunk by row chunk and, in the same pass, its gradients: each chunk's logits are exponentiated once, summed
into ``Z``, and the same buffer is the softmax gradient, with each head's responsibility ``softmax_h (c + Z)``
and ``1 / mass`` applied to the small products it enters (never to the buffer itself). The output is a scalar,
so the backward pass only scales the stored gradients: one exponential per logit (the dominant cost on a CPU)
instead of two for a forward/backward pair that recomputes, and nothing of size (rows, items) outlives its
chunk: at 128 x 200 positions and 3,416 items one such tensor is 350 MB. Rows whose logits provably stay
within 2^+-64 (Cauchy-Schwarz on the interests' and the tables' norms: the usual case) are exponentiated
without subtracting their maximum; per chunk of logits that leaves one matmul writing them, one exp2, one
sum and the two gradient matmuls reading them (measured: 0.87x the time of subtracting the maximum and
scaling the buffer, at 6,400 rows, 4 heads and 3,416 items).
"""

from __future__ import annotations

import torch
from torch import Tensor

LOG2_E = 1.4426950408889634
# logits per chunk (rows x heads x items): on a CPU 4 MB of float32 (1 MB and 16 MB were slower); on a GPU
# 512 MB, where each chunk's dozen kernel launches, not the memory, are what costs
CE_CHUNK_LOGITS = {"cpu": 1 << 20, "gpu": 1 << 27}


UNSHIFTED_LOG2 = 64.0  # a row whose logits provably lie within 2^+-64 is exponentiated without its maximum


def _bounded(a: Tensor, tables: Tensor, bias: Tensor) -> Tensor:
    """(N,) True where every logit of row ``n`` lies within ``+-UNSHIFTED_LOG2`` in log2 units, by
    Cauchy-Schwarz (``|a_nh . u_hi + b_i| <= |a_nh| max_i |u_hi| + max_i |b_i|``): such rows need no max
    subtracted before exp2 (no overflow, and a mass of at least 2^-64), which saves two passes over the logits."""
    bound = a.norm(dim=2) * tables.norm(dim=2).amax(dim=1) + bias.abs().amax()
    return (bound * LOG2_E <= UNSHIFTED_LOG2).all(dim=1)


class _MeanLogPartition(torch.autograd.Function):
    """``sum_n w[n] logsumexp_h (prior[n, h] + logsumexp_i (a[n, h] . tables[h, i] + bias[i])) / N`` with row
    weights ``w``, gradients computed in the forward pass (only those an input needs) and scaled in the
    backward pass."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, a: Tensor, prior: Tensor, tables: Tensor, bias: Tensor, row_weight: Tensor, chunk: int
    ) -> Tensor:
        rows, heads, k = a.shape
        need_a, need_prior, need_tables, need_bias, need_weight = ctx.needs_input_grad[:5]
        grads = need_a or need_prior or need_tables or need_bias
        total = a.new_zeros(())
        grad_a = torch.empty_like(a) if need_a else None
        grad_prior = torch.empty_like(prior) if need_prior else None
        # the bias is one more coordinate of each head's table, [a_nh, 1] . [u_hi, b_i]: the logits' matmul
        # writes it (no copy of the bias into each chunk's buffer first), and the tables' gradient matmul
        # yields the bias's (no second pass over the buffer); logits in log2 units (exp2 is 3x faster than exp
        # on a CPU)
        tables2 = torch.cat((tables, bias.expand(heads, -1)[..., None]), dim=2) * LOG2_E  # (H, V, k + 1)
        grad_tables2 = torch.zeros_like(tables2) if need_tables or need_bias else None
        log_partition = torch.empty_like(row_weight) if need_weight else None
        unshifted = _bounded(a, tables, bias)
        logits = a.new_empty(heads, min(chunk, rows), tables.shape[1])
        a2 = a.new_ones(heads, min(chunk, rows), k + 1)  # [a_nh, 1] per chunk
        for s in range(0, rows, chunk):
            a_c = a[s : s + chunk]
            n = len(a_c)
            e = logits[:, :n]
            a_h = a2[:, :n]
            a_h[..., :k] = a_c.transpose(0, 1)
            torch.bmm(a_h, tables2.transpose(1, 2), out=e)
            if unshifted[s : s + n].all():  # every logit within 2^+-64: no max to subtract
                peak = None
                e.exp2_()
            else:
                peak = e.amax(dim=2, keepdim=True)
                e.sub_(peak).exp2_()
            mass = e.sum(dim=2)  # (H, n)
            log_mass = mass.log() if peak is None else mass.log() + peak[..., 0] / LOG2_E
            log_z = log_mass.T + prior[s : s + n]  # (n, H): c + Z
            row = torch.logsumexp(log_z, dim=1)
            weight = row_weight[s : s + n]
            total += (row * weight).sum()
            if log_partition is not None:
                log_partition[s : s + n] = row
            if not grads:
                continue
            # each head's share of the row's partition, times the row's weight
            resp = (log_z - row[:, None]).exp_() * weight[:, None]  # (n, H)
            if grad_prior is not None:
                grad_prior[s : s + n] = resp
            # the softmax gradient of a logit is e / mass x resp: the per-(head, row) factor scales the
            # small products, not the (H, n, V) buffer
            w = (resp.T / mass)[..., None]  # (H, n, 1)
            if grad_a is not None:
                grad_a[s : s + n] = (torch.bmm(e, tables) * w).transpose(0, 1)
            if grad_tables2 is not None:  # the last coordinate's gradient is the bias's, per head
                grad_tables2.baddbmm_(e.transpose(1, 2), a_h * w)
        grad_tables = grad_bias = None
        if grad_tables2 is not None:
            grad_tables = grad_tables2[..., :k] if need_tables else None
            grad_bias = grad_tables2[..., k].sum(0) if need_bias else None
        ctx.save_for_backward(grad_a, grad_prior, grad_tables, grad_bias, log_partition)
        ctx.rows = rows
        return total / rows

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        scale = grad / ctx.rows
        return (*(None if g is None else g * scale for g in ctx.saved_tensors), None)


def mean_log_partition(
    a: Tensor, prior: Tensor, tables: Tensor, bias: Tensor, chunk: int = 0, row_weight: Tensor | None = None
) -> Tensor:
    """Mean over the N rows of the routed log-partition ``log sum_i exp(s_ni)`` (module docstring), each row
    times ``row_weight[n]`` when given (which may itself need gradients), with its gradients, never
    materialising the (N, H, V) logits; ``chunk``: rows per chunk (0: about ``CE_CHUNK_LOGITS`` logits)."""
    budget = CE_CHUNK_LOGITS["cpu" if a.device.type == "cpu" else "gpu"]
    chunk = chunk or max(1, budget // (a.shape[1] * tables.shape[1]))
    if row_weight is None:
        row_weight = a.new_ones(len(a))
    return _MeanLogPartition.apply(a.contiguous(), prior.contiguous(), tables, bias, row_weight, chunk)


def head_item_tables(table: Tensor, proj: Tensor) -> Tensor:
    """Every item of ``table`` (V, d) in each head's coordinates, (H, V, k), for interests ``v_h = a_h P_h`` with
    ``proj`` (H, k, d): ``a_h . result[h, i]`` is ``v_h . table[i]`` (module docstring)."""
    return torch.einsum("vd,hkd->hvk", table, proj)


def target_terms(a: Tensor, prior: Tensor, tables: Tensor, target: Tensor) -> Tensor:
    """Each head's term at each row's target item, ``a[n, h] . tables[h, target[n]] + prior[n, h]`` (N, H):
    their softmax over heads is each head's responsibility for the target."""
    # index_select, not tables[:, target]: its backward (index_add) is deterministic on CPU, advanced
    # indexing's accumulating index_put is not, and runs must repeat bit for bit (resumed training)
    return (a * tables.index_select(1, target).transpose(0, 1)).sum(-1) + prior


def routed_softmax_cross_entropy(
    a: Tensor, prior: Tensor, tables: Tensor, bias: Tensor, target: Tensor, chunk: int = 0
) -> Tensor:
    """Mean cross-entropy of the routed scores ``logsumexp_h (a[n, h] . tables[h, i] + prior[n, h]) + bias[i]``
    over the N rows; ``a`` (N, H, k), ``prior`` (N, H), ``tables`` (H, V, k), ``bias`` (V,), ``target`` (N,)
    int64 in [0, V). Same value and gradients as the unfused form."""
    if len(a) == 0:
        raise ValueError("routed_softmax_cross_entropy needs at least one row")
    at_target = target_terms(a, prior, tables, target)
    picked = torch.logsumexp(at_target, dim=1) + bias.index_select(0, target)
    return mean_log_partition(a, prior, tables, bias, chunk) - picked.mean()


def full_softmax_cross_entropy(
    x: Tensor, weight: Tensor, bias: Tensor, target: Tensor, chunk: int = 0
) -> Tensor:
    """Mean of ``cross_entropy(x @ weight.T + bias, target)`` over the N rows of ``x`` (N, d): the routed
    loss with one interest and no prior."""
    return routed_softmax_cross_entropy(x[:, None], x.new_zeros(len(x), 1), weight[None], bias, target, chunk)


def soft_target_cross_entropy(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    rows: Tensor,
    ids: Tensor,
    label_weight: Tensor,
    row_weight: Tensor | None = None,
    chunk: int = 0,
) -> Tensor:
    """Mean over the N rows of ``x`` (N, d) of ``row_weight[n] * -(sum_j p_nj log_softmax(x_n . weight^T +
    bias)_j)``, the target distributions ``p`` given sparsely as labels: label ``l`` puts ``label_weight[l]`` on
    class ``ids[l]`` of row ``rows[l]``. Fused like :func:`mean_log_partition` (no (N, V) tensor is kept, no
    dense targets are built); ``row_weight`` (N,) may need gradients (the per-row weighting of an MI term)."""
    if len(x) == 0:
        raise ValueError("soft_target_cross_entropy needs at least one row")
    mass = x.new_zeros(len(x)).index_add_(0, rows, label_weight)  # each row's total label weight
    scale = label_weight if row_weight is None else label_weight * row_weight.index_select(0, rows)
    total_weight = mass if row_weight is None else mass * row_weight
    partition = mean_log_partition(
        x[:, None], x.new_zeros(len(x), 1), weight[None], bias, chunk, row_weight=total_weight
    )
    picked = (x.index_select(0, rows) * weight.index_select(0, ids)).sum(-1) + bias.index_select(0, ids)
    return partition - (scale * picked).sum() / len(x)
