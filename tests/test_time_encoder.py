"""Dual-view gated time encoder: step == forward, padding, gate range, order mode, personal rhythm, the
calendar features and the exact (day, second) state, in torch and in an exported step graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared_model.export.torch_graphs import _export_graph
from shared_model.graph_io import session
from shared_model.time_encoder import (
    SECONDS_PER_DAY,
    SECONDS_PER_WEEK,
    SECONDS_PER_YEAR,
    DualViewGatedTimeEncoder,
    day_and_second,
    gap_features,
)

D_MODEL = 16


def _times(batch: int, length: int, time_unit: str, seed: int = 0) -> torch.Tensor:
    """Realistic timestamps from 1.5e9 s: gaps log-uniform from a second to ~4 months, a fifth of them ties."""
    rng = np.random.default_rng(seed)
    gaps = np.exp(rng.uniform(0, np.log(1e7), size=(batch, length))).astype(np.int64)
    gaps[rng.random((batch, length)) < 0.2] = 0
    times = 1_500_000_000 + np.cumsum(gaps, axis=1)
    if time_unit == "days":
        times = times // SECONDS_PER_DAY * SECONDS_PER_DAY
    return torch.from_numpy(times)


def _left_pad(times: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift row b right by pads[b] (dropping its last events), filling with 0 / mask False."""
    out, mask = torch.zeros_like(times), torch.zeros(times.shape, dtype=torch.bool)
    for b, p in enumerate(pads):
        out[b, p:] = times[b, : times.shape[1] - p]
        mask[b, p:] = True
    return out, mask


@torch.no_grad()
@pytest.mark.parametrize("time_unit", ["seconds", "days", "order"])
def test_step_reproduces_forward(time_unit: str):
    torch.manual_seed(0)
    enc = DualViewGatedTimeEncoder(D_MODEL, time_unit, max_len=64)  # order: positions clip within 100 events
    times = _times(4, 100, time_unit)
    full = enc(times, torch.ones(times.shape, dtype=torch.bool))
    state = enc.initial_state(4)
    assert state.dtype == torch.float32 and state.shape[0] == 4
    for i in range(times.shape[1]):
        out, state = enc.step(times[:, i], state)
        assert (out - full[:, i]).abs().max() <= 1e-5, i


@torch.no_grad()
@pytest.mark.parametrize("time_unit", ["seconds", "days", "order"])
def test_left_padding_gives_zeros_and_leaves_real_events_alone(time_unit: str):
    torch.manual_seed(1)
    enc = DualViewGatedTimeEncoder(D_MODEL, time_unit)
    times = _times(3, 40, time_unit, seed=1)
    pads = [0, 5, 39]
    padded, mask = _left_pad(times, pads)
    out = enc(padded, mask)
    assert out.shape == (3, 40, D_MODEL)
    for b, p in enumerate(pads):
        assert torch.equal(out[b, :p], torch.zeros(p, D_MODEL))
        alone = enc(times[b : b + 1, : 40 - p], torch.ones(1, 40 - p, dtype=torch.bool))
        torch.testing.assert_close(out[b, p:], alone[0], atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_outputs_are_causal():
    enc = DualViewGatedTimeEncoder(D_MODEL)
    times = _times(2, 30, "seconds", seed=2)
    mask = torch.ones(times.shape, dtype=torch.bool)
    torch.testing.assert_close(enc(times, mask)[:, :20], enc(times[:, :20], mask[:, :20]))


@torch.no_grad()
@pytest.mark.parametrize("time_unit", ["seconds", "days"])
def test_gate_is_a_probability_per_event(time_unit: str):
    enc = DualViewGatedTimeEncoder(D_MODEL, time_unit)
    times = _times(3, 50, time_unit, seed=3)
    gate = enc.gate(times, torch.ones(times.shape, dtype=torch.bool))
    assert gate.shape == (3, 50, 1)
    assert torch.all((gate > 0) & (gate < 1))


@torch.no_grad()
def test_order_mode_uses_positions_only():
    torch.manual_seed(4)
    enc = DualViewGatedTimeEncoder(D_MODEL, "order", max_len=8)
    padded, mask = _left_pad(_times(1, 12, "order"), [2])
    other = torch.randint(0, 2**40, padded.shape)
    out = enc(padded, mask)
    torch.testing.assert_close(out, enc(other, mask))
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 7, 7])  # clipped at max_len - 1
    torch.testing.assert_close(out[0, 2:], enc.position.weight[positions])
    assert torch.equal(enc.gate(padded, mask), torch.ones(1, 12, 1))
    assert [name for name, _ in enc.named_parameters()] == ["position.weight"]


def test_gap_features_by_hand():
    minute, hour = 60, 3600
    times = torch.tensor(
        [[0, 1_000, 1_000 + hour, 1_000 + 2 * hour, 1_000 + 2 * hour, 1_000 + 2 * hour + minute]]
    )
    mask = torch.tensor([[False, True, True, True, True, True]])
    lg, first, rhythm = gap_features(times, mask)
    h, m = np.log1p(60.0), np.log1p(1.0)
    torch.testing.assert_close(lg, torch.tensor([[0, 0, h, h, 0, m]], dtype=torch.float32))
    assert first.tolist() == [[False, True, False, False, False, False]]
    expected = [0, 0, 0, 0, 0 - h, m - (2 * h + 0) / 3]
    torch.testing.assert_close(rhythm, torch.tensor([expected], dtype=torch.float32))


@torch.no_grad()
def test_personal_rhythm_separates_users_with_different_habits():
    """Same last two timestamps (a one-day gap), different histories: daily vs. hourly users."""
    day, hour = SECONDS_PER_DAY, 3600
    end = 1_700_000_000
    daily = end - day * torch.arange(20, -1, -1)
    hourly = torch.cat((end - day - hour * torch.arange(19, 0, -1), torch.tensor([end - day, end])))
    times = torch.stack((daily, hourly))
    mask = torch.ones(times.shape, dtype=torch.bool)
    _, _, rhythm = gap_features(times, mask)
    assert rhythm[0, -1].abs() < 1e-5  # a day is this user's usual gap
    assert rhythm[1, -1] > 2  # a day is long for this user
    enc = DualViewGatedTimeEncoder(D_MODEL)
    out = enc(times, mask)
    assert (out[0, -1] - out[1, -1]).abs().max() > 1e-3


def test_gradients_and_bad_unit():
    enc = DualViewGatedTimeEncoder(D_MODEL)
    times = _times(2, 10, "seconds", seed=5)
    enc(times, torch.ones(times.shape, dtype=torch.bool)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    with pytest.raises(ValueError):
        DualViewGatedTimeEncoder(D_MODEL, "hours")


# just before and at midnight UTC (where float32 rounds unix seconds across the day boundary), past 2038 (2^31 s),
# before 1970
EDGE_TIMES = [0, 86_399, 1_600_041_599, 1_600_041_600, 2**31 + 86_399, 4_102_444_799, -1]


def test_day_and_second_are_exact():
    t = torch.tensor(EDGE_TIMES)
    day, second = day_and_second(t)
    assert day.dtype == second.dtype == torch.float32
    assert (day.long() * SECONDS_PER_DAY + second.long()).tolist() == EDGE_TIMES
    assert ((second >= 0) & (second < SECONDS_PER_DAY)).all()


@torch.no_grad()
def test_long_view_reads_each_cycle_as_sine_then_cosine():
    """The long view's inputs, computed independently: per cycle (hour of day, day of week from Monday, time of
    year) its sine then its cosine, then the rhythm (the layout trained checkpoints were saved with)."""
    enc = DualViewGatedTimeEncoder(D_MODEL)
    t = torch.tensor(EDGE_TIMES)[:, None]
    rhythm = torch.linspace(-1, 1, len(EDGE_TIMES))[:, None]
    long = enc._views(t, torch.zeros_like(rhythm), torch.zeros_like(t, dtype=torch.bool), rhythm)[1]
    features = []
    for period, shift in (
        (SECONDS_PER_DAY, 0),
        (SECONDS_PER_WEEK, 3 * SECONDS_PER_DAY),
        (SECONDS_PER_YEAR, 0),
    ):
        angle = 2 * np.pi * (((np.array(EDGE_TIMES) + shift) % period) / period)
        features += [np.sin(angle), np.cos(angle)]
    inputs = torch.from_numpy(np.stack(features, axis=1)).float()
    torch.testing.assert_close(long, enc.long(torch.cat((inputs, rhythm), dim=1)), atol=1e-6, rtol=0)


class _Step(torch.nn.Module):
    def __init__(self, enc: DualViewGatedTimeEncoder) -> None:
        super().__init__()
        self.enc = enc

    def forward(self, t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.enc.step(t, state)


@torch.no_grad()
def test_exported_step_keeps_the_state_exact_and_matches_torch():
    """The step as an onnxruntime graph (the runtime's): the new state bit for bit as torch's (day and second
    exact around midnight and past 2038), the time vector within float32 rounding."""
    torch.manual_seed(0)
    enc = DualViewGatedTimeEncoder(D_MODEL).eval()
    t = torch.tensor(EDGE_TIMES)
    state = enc.state_after(t[:, None] - 3_600, torch.ones(len(t), 1, dtype=torch.bool))  # an hour earlier
    proto = _export_graph(_Step(enc), (t, state), ["t", "state"], ["vector", "next_state"])
    sess = session(proto.SerializeToString())
    feeds = {"t": t.numpy(), "state": state.numpy()}
    vector, next_state = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
    expected_vector, expected_state = enc.step(t, state)
    assert np.array_equal(next_state, expected_state.numpy())
    assert (next_state[:, 0].astype(np.int64) * SECONDS_PER_DAY + next_state[:, 1]).tolist() == EDGE_TIMES
    assert np.abs(vector - expected_vector.numpy()).max() <= 1e-6


def test_gap_buckets_have_no_denormal_tail():
    """Far from its centre a bucket reads exactly 0, never a denormal float32 (slow in every matmul it enters)."""
    enc = DualViewGatedTimeEncoder(D_MODEL)
    lg = torch.linspace(0, 20, 2001)[:, None]  # log-gaps from 0 past the last bucket's centre
    buckets = enc.gap_buckets(lg)
    tiny = (buckets > 0) & (buckets < torch.finfo(torch.float32).tiny)
    assert not tiny.any() and (buckets == 0).any()
    assert ((buckets == 0) | (buckets >= np.exp(-20.0) * 0.999)).all()
    assert (buckets.max(dim=1).values > 0.5).all()  # every gap still falls near some bucket
