"""The server's Adam step (server/server_adam.py): the learning-rate schedule over the run's rounds and the item
tables' own epsilon."""

from __future__ import annotations

import numpy as np
import pytest

from server.server_adam import server_lr_at
from server.strategies import make_strategy
from shared_model.config import FederatedConfig
from simulations.hostile_updates import aggregate_round, strategy_round


def _sent(rng: np.random.Generator, rows: int = 10) -> dict[str, np.ndarray]:
    return {
        "item_emb.weight": rng.standard_normal((rows, 4)).astype(np.float32),
        "item_bias": rng.standard_normal(rows).astype(np.float32),
        "explanation.bias": rng.standard_normal(3).astype(np.float32),
    }


def test_the_decay_keeps_the_peak_then_falls_to_zero_over_the_last_rounds():
    assert server_lr_at(1, 2e-3, 400, 1.0) == 2e-3  # a cosine over the whole run
    assert server_lr_at(201, 2e-3, 400, 1.0) == pytest.approx(1e-3)
    assert 0 < server_lr_at(400, 2e-3, 400, 1.0) < 1e-7
    assert server_lr_at(500, 2e-3, 400, 1.0) == 0.0  # a resumed run past its end takes no step
    lrs = [server_lr_at(r, 1.0, 50, 1.0) for r in range(1, 51)]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    # the last quarter: the peak through round 301, half of it at round 351
    assert [server_lr_at(r, 2e-3, 400, 0.25) for r in (1, 300, 301)] == [2e-3] * 3
    assert server_lr_at(351, 2e-3, 400, 0.25) == pytest.approx(1e-3)
    assert server_lr_at(302, 2e-3, 400, 0.25) < 2e-3
    assert {server_lr_at(r, 2e-3, 400, 0.0) for r in (1, 200, 400)} == {2e-3}  # constant


def test_each_rounds_step_is_scaled_by_the_decay():
    """The same update in every round moves FedAdam's moments alike under both schedules, so each round's
    cosine step is the constant step times the schedule's factor."""
    rng = np.random.default_rng(3)
    sent = _sent(rng)
    replies = [({k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in sent.items()}, 1)]
    base = dict(server_optimizer="fedadam", server_lr=1e-2, num_rounds=4, row_clip=0.0, norm_bound=1e4)
    constant = make_strategy(FederatedConfig(**base), 1, 1)
    cosine = make_strategy(FederatedConfig(**base, server_lr_decay=1.0), 1, 1)
    for rnd in range(1, 5):
        flat, _ = strategy_round(constant, rnd, sent, replies)
        scheduled, _ = strategy_round(cosine, rnd, sent, replies)
        factor = server_lr_at(rnd, 1.0, 4, 1.0)
        for k in sent:
            np.testing.assert_allclose(
                scheduled[k] - sent[k], factor * (flat[k] - sent[k]), rtol=1e-4, atol=1e-7
            )


def test_item_tables_own_adam_epsilon_damps_tiny_consistent_pushes():
    """server_tau_items: a row moved by 1e-6 per value (a cold item's) takes a tiny step instead of a full
    one, a row moved by 0.1 still about a full step; other arrays take the plain FedAdam step."""
    rng = np.random.default_rng(5)
    sent = _sent(rng, rows=10)
    moved = {k: v.copy() for k, v in sent.items()}
    moved["item_bias"][1] += 1e-6
    moved["item_bias"][5] += 1e-1
    moved["explanation.bias"] += 1e-6
    replies = [(moved, 4), (moved, 6)]
    base = dict(server_optimizer="fedadam", server_tau=1e-8, row_clip=0.0, row_quorum=0, norm_bound=1e4)
    plain, _ = aggregate_round(FederatedConfig(**base), sent, replies)
    damped, _ = aggregate_round(FederatedConfig(**base, server_tau_items=1e-3), sent, replies)
    step = plain["item_bias"][5] - sent["item_bias"][5]
    assert plain["item_bias"][1] - sent["item_bias"][1] == pytest.approx(step, rel=0.15)  # Adam: ~full step
    assert 0 < damped["item_bias"][1] - sent["item_bias"][1] < step / 100
    assert damped["item_bias"][5] - sent["item_bias"][5] == pytest.approx(step, rel=0.1)
    np.testing.assert_array_equal(damped["explanation.bias"], plain["explanation.bias"])
