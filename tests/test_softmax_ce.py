"""The fused, chunked full-softmax cross-entropy equals the unfused reference (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared_model.softmax_ce import (
    full_softmax_cross_entropy,
    routed_softmax_cross_entropy,
    soft_target_cross_entropy,
)


def _assert_same(fused, reference, inputs, scale=1.0, grad_rtol=1e-10):
    """``fused`` equals ``reference`` in value (float64) and in the gradients of ``scale x`` each w.r.t.
    ``inputs``."""
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(
        torch.autograd.grad(scale * fused, inputs),
        torch.autograd.grad(scale * reference, inputs),
        strict=True,
    ):
        torch.testing.assert_close(g, g_ref, rtol=grad_rtol, atol=1e-12)


@pytest.mark.parametrize(("rows", "chunk"), [(1, 256), (7, 3), (300, 256), (513, 64)])
def test_equals_reference_in_float64(rows: int, chunk: int):
    torch.manual_seed(rows)
    x = torch.randn(rows, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (rows,))
    fused = full_softmax_cross_entropy(x, weight, bias, target, chunk=chunk)
    reference = F.cross_entropy(F.linear(x, weight, bias), target)
    _assert_same(fused, reference, (x, weight, bias), scale=3.0)


def test_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 5, 2, 2, 1])
    assert torch.autograd.gradcheck(
        lambda x, w, b: full_softmax_cross_entropy(x, w, b, target, chunk=2), (x, weight, bias)
    )


def test_sliced_table_and_float32():
    """As the models call it: a view of the item table without its padding row, float32."""
    torch.manual_seed(1)
    table = torch.randn(21, 4, requires_grad=True)
    bias = torch.zeros(21, requires_grad=True)
    x = torch.randn(9, 4, requires_grad=True)
    target = torch.randint(0, 20, (9,))
    full_softmax_cross_entropy(x, table[1:], bias[1:], target, chunk=4).backward()
    assert torch.count_nonzero(table.grad[0]) == 0 and bias.grad[0] == 0
    grads = (x.grad, table.grad, bias.grad)
    x.grad = table.grad = bias.grad = None
    F.cross_entropy(F.linear(x, table[1:], bias[1:]), target).backward()
    for g, g_ref in zip(grads, (x.grad, table.grad, bias.grad), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_no_rows_is_an_error():
    with pytest.raises(ValueError, match="at least one row"):
        full_softmax_cross_entropy(
            torch.zeros(0, 2), torch.zeros(3, 2), torch.zeros(3), torch.zeros(0).long()
        )


def _routed_reference(a, prior, tables, bias, target):
    terms = torch.einsum("nhk,hvk->nhv", a, tables) + prior[..., None]
    return F.cross_entropy(terms.logsumexp(1) + bias, target)


@pytest.mark.parametrize(("rows", "heads", "chunk"), [(1, 2, 256), (7, 3, 2), (300, 4, 256), (65, 4, 16)])
def test_routed_equals_reference_in_float64(rows: int, heads: int, chunk: int):
    """Each item scored by its best interest, each head in its own coordinates (its own item table): values,
    and gradients routed to the winning interest."""
    torch.manual_seed(rows)
    a = torch.randn(rows, heads, 4, dtype=torch.float64, requires_grad=True)
    prior = torch.randn(rows, heads, dtype=torch.float64).log_softmax(-1).requires_grad_()
    tables = torch.randn(heads, 50, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (rows,))
    fused = routed_softmax_cross_entropy(a, prior, tables, bias, target, chunk=chunk)
    reference = _routed_reference(a, prior, tables, bias, target)
    _assert_same(fused, reference, (a, prior, tables, bias), scale=2.0)


def test_routed_gradcheck():
    torch.manual_seed(0)
    a = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    prior = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    tables = torch.randn(3, 6, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 5, 2, 2, 1])
    assert torch.autograd.gradcheck(
        lambda a, c, u, b: routed_softmax_cross_entropy(a, c, u, b, target, chunk=2), (a, prior, tables, bias)
    )


def test_routed_without_gradients_and_default_chunks():
    """Evaluation (no gradients wanted) gives the same value, and the default chunking (rows sized to the
    heads x items of a chunk) the same value and gradients as small chunks."""
    torch.manual_seed(3)
    a = torch.randn(40, 4, 3, dtype=torch.float64, requires_grad=True)
    prior = torch.randn(40, 4, dtype=torch.float64).log_softmax(-1)
    tables = torch.randn(4, 30, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(30, dtype=torch.float64)
    target = torch.randint(0, 30, (40,))
    reference = _routed_reference(a, prior, tables, bias, target)
    with torch.no_grad():
        torch.testing.assert_close(routed_softmax_cross_entropy(a, prior, tables, bias, target), reference)
    default = routed_softmax_cross_entropy(a, prior, tables, bias, target)
    small = routed_softmax_cross_entropy(a, prior, tables, bias, target, chunk=7)
    for g, g_ref in zip(
        torch.autograd.grad(default, (a, tables)), torch.autograd.grad(small, (a, tables)), strict=True
    ):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)


def test_large_logits_subtract_their_maximum():
    """Rows whose logits may leave 2^+-64 (large interests or tables) take the max-subtracting path: the same
    value and gradients as the reference, where exponentiating unshifted would overflow."""
    from shared_model.softmax_ce import _bounded

    torch.manual_seed(4)
    a = (40 * torch.randn(30, 3, 4, dtype=torch.float64)).requires_grad_()
    prior = torch.randn(30, 3, dtype=torch.float64).log_softmax(-1).requires_grad_()
    tables = (10 * torch.randn(3, 50, 4, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (30,))
    assert not _bounded(a, tables, bias).any()
    fused = routed_softmax_cross_entropy(a, prior, tables, bias, target, chunk=8)
    reference = _routed_reference(a, prior, tables, bias, target)
    assert torch.isfinite(fused)
    _assert_same(fused, reference, (a, prior, tables, bias), grad_rtol=1e-9)


def _dense_soft_targets(x, weight, bias, rows, ids, label_weight, row_weight):
    dist = torch.zeros(len(x), len(weight), dtype=x.dtype)
    dist.index_put_((rows, ids), label_weight, accumulate=True)
    per_row = -(dist * F.log_softmax(F.linear(x, weight, bias), dim=-1)).sum(-1)
    return (per_row * row_weight).mean()


@pytest.mark.parametrize(("rows", "chunk"), [(1, 256), (9, 2), (200, 64)])
def test_soft_targets_equal_dense_reference_in_float64(rows: int, chunk: int):
    """Sparse labels (several per row, repeated ids, weights summing to 1 or not) and a row weight that
    needs gradients: the value and every gradient equal the dense (N, V) formula's."""
    torch.manual_seed(rows)
    x = torch.randn(rows, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, dtype=torch.float64, requires_grad=True)
    s = torch.randn(rows, dtype=torch.float64, requires_grad=True)
    counts = torch.randint(1, 4, (rows,))
    label_rows = torch.repeat_interleave(torch.arange(rows), counts)
    ids = torch.randint(0, 40, (len(label_rows),))
    label_weight = torch.rand(len(label_rows), dtype=torch.float64)
    for weighted in (False, True):
        fused = soft_target_cross_entropy(
            x, weight, bias, label_rows, ids, label_weight, torch.exp(-s) if weighted else None, chunk
        )
        reference = _dense_soft_targets(
            x, weight, bias, label_rows, ids, label_weight, torch.exp(-s) if weighted else torch.ones(rows)
        )
        _assert_same(fused, reference, (x, weight, bias, s) if weighted else (x, weight, bias), scale=2.0)


def test_soft_targets_without_bias_gradient():
    """A constant bias (the MI term's zeros) needs no gradient; the others are unchanged."""
    torch.manual_seed(3)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    rows, ids, w = torch.arange(5), torch.tensor([0, 6, 2, 2, 1]), torch.ones(5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, weight: soft_target_cross_entropy(
            x, weight, torch.zeros(7, dtype=torch.float64), rows, ids, w
        ),
        (x, weight),
    )


@pytest.mark.parametrize("heads", [1, 4])
def test_softmax_change_is_the_sgd_step_on_untouched_items(heads: int):
    """:func:`shared_model.softmax_change.softmax_change`: from the output states alone, the change one SGD step
    on the routed cross-entropy gives every item row that is not a target (with and without head projections),
    row-clipped like a device's update."""
    import numpy as np

    from shared_model.softmax_change import softmax_change

    rng = np.random.default_rng(heads)
    items, d, k, rows, lr = 40, 8, 8 // heads, 6, 0.5
    sent = {
        "item_emb.weight": rng.normal(size=(items + 1, d)).astype(np.float32),
        "item_bias": rng.normal(size=items + 1).astype(np.float32),
    }
    if heads > 1:
        sent["interests.proj"] = rng.normal(size=(heads, k, d)).astype(np.float32)
    states = rng.normal(size=(rows, heads, (k if heads > 1 else d) + 1)).astype(np.float32)
    if heads == 1:
        states[..., -1] = 0  # one interest: log-prior 0
    targets = torch.tensor([3, 3, 7, 11, 20, 1])
    emb = torch.from_numpy(sent["item_emb.weight"]).requires_grad_()
    bias = torch.from_numpy(sent["item_bias"]).requires_grad_()
    proj = torch.from_numpy(sent["interests.proj"]) if heads > 1 else None
    tables = torch.einsum("vd,hkd->hvk", emb[1:], proj) if proj is not None else emb[1:].expand(1, -1, -1)
    a, prior = torch.from_numpy(states[..., :-1]), torch.from_numpy(states[..., -1])
    routed_softmax_cross_entropy(a, prior, tables, bias[1:], targets).backward()
    untouched = np.setdiff1d(np.arange(1, items + 1), targets.numpy() + 1)
    for clip in (0.0, 0.05):
        change = softmax_change(sent, states, np.array([rows]), np.ones(1), lr, clip)
        want = [-lr * t.grad.double().numpy() for t in (emb, bias)]
        if clip:
            norm = np.sqrt((want[0] ** 2).sum(1) + want[1] ** 2)
            scale = np.minimum(1, clip / np.maximum(norm, 1e-300))
            want = [want[0] * scale[:, None], want[1] * scale]
            assert (scale[untouched] < 1).any()  # the clip bites somewhere
        np.testing.assert_allclose(
            change["item_emb.weight"][untouched], want[0][untouched], rtol=1e-5, atol=1e-8
        )
        np.testing.assert_allclose(change["item_bias"][untouched], want[1][untouched], rtol=1e-5, atol=1e-8)
        assert not change["item_emb.weight"][0].any() and change["item_bias"][0] == 0  # padding
    two = softmax_change(
        sent, np.concatenate([states, states]), np.array([rows, rows]), np.full(2, 0.5), lr, 0
    )
    one = softmax_change(sent, states, np.array([rows]), np.ones(1), lr, 0)
    np.testing.assert_allclose(two["item_bias"], one["item_bias"], rtol=1e-6)  # shares weight the users
