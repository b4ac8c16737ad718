"""Multihead LRU: the parallel scan and the O(1) step agree, left padding is inert, init and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared_model.lru import LRUBlock, LRUEncoder, MultiheadLRU, scan_offsets

Recurrent = MultiheadLRU | LRUBlock | LRUEncoder


def _roll(module: Recurrent, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed x (B, L, d) event by event through ``module.step``: outputs (B, L, d) and the final state."""
    state = module.initial_state(x.shape[0])
    outputs = []
    for t in range(x.shape[1]):
        y, state = module.step(x[:, t], state)
        outputs.append(y)
    return torch.stack(outputs, dim=1), state


@torch.no_grad()
def test_encoder_step_matches_scan_over_200_events():
    torch.manual_seed(0)
    enc = LRUEncoder(d_model=64, num_heads=4, num_blocks=2).eval()
    x = torch.randn(3, 200, 64)
    y_scan, state_scan = enc.scan_with_state(x)
    y_step, state_step = _roll(enc, x)
    assert y_scan.shape == (3, 200, 64)
    assert state_scan.shape == state_step.shape == (3, 2, 4, 16, 2)
    assert (y_scan - y_step).abs().max() <= 1e-4
    assert torch.equal(enc(x), y_scan)
    torch.testing.assert_close(state_scan, state_step, atol=1e-4, rtol=1e-4)


@settings(max_examples=15, deadline=None)
@given(
    length=st.integers(1, 300),
    num_heads=st.sampled_from([1, 2, 4]),
    expansion=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
@torch.no_grad()
def test_lru_scan_equals_step(length: int, num_heads: int, expansion: int, seed: int):
    torch.manual_seed(seed)
    lru = MultiheadLRU(d_model=16, num_heads=num_heads, state_expansion=expansion)
    x = torch.randn(2, length, 16)
    y_scan, state_scan = lru.scan_with_state(x)
    y_step, state_step = _roll(lru, x)
    torch.testing.assert_close(y_scan, y_step, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state_scan, state_step, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("make", [MultiheadLRU, LRUBlock, lambda d, h: LRUEncoder(d, h, num_blocks=3)])
def test_left_padding_is_inert(make):
    torch.manual_seed(1)
    module = make(32, 4).eval()
    x = torch.randn(2, 37, 32)
    padded = torch.cat((torch.zeros(2, 50, 32), x), dim=1)
    y, state = module.scan_with_state(x)
    y_pad, state_pad = module.scan_with_state(padded)
    assert torch.equal(y_pad[:, :50], torch.zeros(2, 50, 32))
    torch.testing.assert_close(y_pad[:, 50:], y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state_pad, state, atol=1e-5, rtol=1e-5)


def test_shapes_and_initial_state():
    enc = LRUEncoder(d_model=24, num_heads=3, num_blocks=2)
    assert enc(torch.randn(5, 7, 24)).shape == (5, 7, 24)
    assert torch.equal(enc.initial_state(5), torch.zeros(5, 2, 3, 8, 2))
    y_t, state = enc.step(torch.randn(5, 24), enc.initial_state(5))
    assert y_t.shape == (5, 24) and state.shape == (5, 2, 3, 8, 2)
    with pytest.raises(AssertionError):
        MultiheadLRU(d_model=10, num_heads=4)


def test_ring_initialisation():
    torch.manual_seed(2)
    lru = MultiheadLRU(d_model=256, num_heads=4, r_min=0.5, r_max=0.9, phase_max=math.pi)
    re, im = lru.lambda_power(1)
    modulus, angle = torch.hypot(re, im), torch.exp(lru.theta_log)
    assert modulus.shape == (4, 64)
    assert modulus.min() >= 0.5 - 1e-6 and modulus.max() <= 0.9 + 1e-6
    assert angle.min() > 0 and angle.max() <= math.pi + 1e-6
    assert modulus.max() - modulus.min() > 0.3  # spread over the ring, not collapsed


def test_gradients_reach_every_parameter():
    torch.manual_seed(3)
    enc = LRUEncoder(d_model=16, num_heads=2, num_blocks=2)
    enc(torch.randn(2, 9, 16)).square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    lru_names = {name.rsplit(".", 1)[-1] for name, _ in enc.blocks[0].lru.named_parameters()}
    assert {"nu_log", "theta_log", "B_re", "B_im", "C_re", "C_im", "D"} == lru_names


def test_heads_own_their_channels():
    torch.manual_seed(4)
    lru = MultiheadLRU(d_model=12, num_heads=3)
    x = torch.randn(1, 6, 12)
    x2 = x.clone()
    x2[..., 4:8] += 1.0  # change only head 1's channels
    diff = (lru(x2) - lru(x)).abs().amax(dim=(0, 1))
    assert torch.all(diff[:4] == 0) and torch.all(diff[8:] == 0) and torch.all(diff[4:8] > 0)


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 200, 256, 257, 1000])
def test_scan_depth_is_logarithmic(length: int):
    assert len(scan_offsets(length)) == math.ceil(math.log2(length))


def _reference_scan(lru: MultiheadLRU, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The direct form of the chunked scan (per-position einsums over complex pairs), kept as the reference
    that the channel-major batched-matmul implementation must equal."""
    b, length, _ = x.shape
    chunk = min(16, length)
    pad = (-length) % chunk
    xp = torch.nn.functional.pad(x, (0, 0, pad, 0))
    u = (xp @ lru.drive_matrix()).reshape(b, (length + pad) // chunk, chunk, lru.num_heads, lru.d_state, 2)
    p_re, p_im = lru._powers(0, chunk)
    lag = torch.arange(chunk)[:, None] - torch.arange(chunk)[None, :]
    causal = (lag >= 0).to(x.dtype)[:, :, None, None]
    t_re, t_im = p_re[lag.clamp(min=0)] * causal, p_im[lag.clamp(min=0)] * causal
    u_re, u_im = u.unbind(-1)
    h_re = torch.einsum("tshn,bmshn->bmthn", t_re, u_re) - torch.einsum("tshn,bmshn->bmthn", t_im, u_im)
    h_im = torch.einsum("tshn,bmshn->bmthn", t_re, u_im) + torch.einsum("tshn,bmshn->bmthn", t_im, u_re)
    state_re = torch.zeros_like(h_re[:, 0, 0])
    state_im = torch.zeros_like(state_re)
    q_re, q_im = lru._powers(1, chunk)
    outs = []
    for j in range(h_re.shape[1]):  # sequential carry across chunks
        c_re, c_im = state_re[:, None], state_im[:, None]
        o_re = h_re[:, j] + q_re * c_re - q_im * c_im
        o_im = h_im[:, j] + q_re * c_im + q_im * c_re
        outs.append(torch.stack((o_re, o_im), -1))
        state_re, state_im = o_re[:, -1], o_im[:, -1]
    h = torch.cat(outs, dim=1)[:, pad:].flatten(2)
    return h @ lru.readout_matrix() + lru.D * x, torch.stack((state_re, state_im), -1)


@pytest.mark.parametrize(
    ("length", "num_heads", "expansion"), [(1, 1, 1), (16, 4, 1), (37, 2, 2), (200, 4, 1), (203, 1, 2)]
)
def test_batched_chunk_product_equals_reference_einsum(length: int, num_heads: int, expansion: int):
    """Values and gradients (inputs and every parameter) in float64."""
    torch.manual_seed(length)
    lru = MultiheadLRU(d_model=16, num_heads=num_heads, state_expansion=expansion).double()
    x = torch.randn(3, length, 16, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, length, 16, dtype=torch.float64)
    outputs = []
    for scan in (lru.scan_with_state, lambda x: _reference_scan(lru, x)):
        y, state = scan(x)
        params = [x, *lru.parameters()]
        grads = torch.autograd.grad((y * weights).sum() + state.sum(), params)
        outputs.append((y, state, grads))
    (y, state, grads), (y_ref, state_ref, grads_ref) = outputs
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, state_ref, rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)
