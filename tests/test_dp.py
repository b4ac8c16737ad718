"""Central differential privacy (server/dp.py): the accountant against Google's dp-accounting, clipping,
the noise, validation before DP, and a real Flower simulation with privacy="dp"."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Error, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from server.app import _round_line
from server.dp import CentralDP, RdpAccountant, rdp_sampled_gaussian
from server.strategies import make_strategy
from server.validated import ValidatedStrategy
from shared_model.config import FederatedConfig
from simulations.hostile_updates import train_reply
from simulations.simulate import run_simulation

from .helpers import small_federation

# (q, noise multiplier, releases, delta, epsilon): epsilon from Google's dp-accounting 0.6.0 (installed in a
# throwaway venv, not a project dependency), computed as
#   acc = dp_accounting.rdp.RdpAccountant(orders=list(range(2, 257)))
#   acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), releases)
#   acc.get_epsilon(delta)
DP_ACCOUNTING_EPSILONS = [
    (0.1, 1.0, 10, 1e-5, 3.5515026696597927),
    (0.1, 1.0, 100, 1e-5, 7.972921510380539),
    (0.01, 1.1, 1000, 1e-5, 1.7252908180449444),
    (0.0997, 0.5, 10, 1e-5, 14.397399503090988),
    (0.0997, 2.0, 10, 1e-5, 0.9328826099847378),
    (1.0, 1.0, 1, 1e-5, 4.752728336819822),
    (0.05, 4.0, 50, 1e-6, 0.41601154575124233),
    (0.5, 0.8, 3, 1e-3, 6.644967322479674),
]
# dp_accounting.rdp.rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(q, z, orders)
ORDERS = [2, 3, 8, 32, 256]
DP_ACCOUNTING_RDP = {
    (0.1, 1.0): [
        0.017036863236176605,
        0.03171230030337645,
        1.3783614113481268,
        13.623137968522595,
        125.68838516154322,
    ],
    (0.01, 2.0): [
        2.8402138324228282e-05,
        4.273444810135939e-05,
        0.00011575614792991869,
        0.0005028946468627525,
        27.376770323086465,
    ],
}


@pytest.mark.parametrize(("q", "z", "releases", "delta", "want"), DP_ACCOUNTING_EPSILONS)
def test_accountant_matches_dp_accounting(q, z, releases, delta, want):
    accountant = RdpAccountant(q, z)
    accountant.step(releases)
    assert accountant.epsilon(delta) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize(("q", "z"), list(DP_ACCOUNTING_RDP))
def test_rdp_per_order_matches_dp_accounting(q, z):
    np.testing.assert_allclose(rdp_sampled_gaussian(q, z, ORDERS), DP_ACCOUNTING_RDP[(q, z)], rtol=1e-9)


def test_epsilon_is_monotone():
    def eps(q: float, z: float, releases: int, delta: float = 1e-5) -> float:
        accountant = RdpAccountant(q, z)
        accountant.step(releases)
        return accountant.epsilon(delta)

    by_round = [eps(0.1, 1.0, r) for r in range(0, 30)]
    assert by_round[0] == 0 and all(a < b for a, b in zip(by_round, by_round[1:], strict=False))
    by_noise = [eps(0.1, z, 10) for z in (0.6, 0.8, 1.0, 2.0, 4.0, 8.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:], strict=False))
    by_rate = [eps(q, 1.0, 10) for q in (0.01, 0.05, 0.1, 0.5, 1.0)]
    assert all(a < b for a, b in zip(by_rate, by_rate[1:], strict=False))
    assert eps(0.1, 1.0, 10, 1e-3) < eps(0.1, 1.0, 10, 1e-5)


def _dp_strategy(noise: float, clip: float, cohort: int = 4, nodes: int = 8) -> ValidatedStrategy:
    cfg = FederatedConfig(
        server_optimizer="fedavg",
        row_clip=0,
        privacy="dp",
        dp_noise=noise,
        dp_clip=clip,
        fraction_train=cohort / nodes,
        norm_bound=1e6,
        min_reply_fraction=0.25,
    )
    strategy = make_strategy(cfg, nodes, nodes)
    assert isinstance(strategy.strategy, CentralDP) and strategy.strategy.cohort == cohort
    assert type(strategy.base) is FedAvg
    return strategy


def _failed() -> Message:
    return Message(
        Error(1, "device dropped out"), reply_to=Message(RecordDict(), dst_node_id=1, message_type="train")
    )


def _aggregate(strategy: ValidatedStrategy, sent: dict, replies: list[Message], rnd: int = 1) -> dict:
    strategy.begin_round(sent, strategy.strategy.cohort)
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return {k: v.numpy() for k, v in arrays.items()}


def _norm(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


def test_clipping_bounds_every_device_contribution(task_identity):
    rng = np.random.default_rng(0)
    sent = {
        "item_bias": rng.standard_normal(50).astype(np.float32),
        "explanation.w": rng.standard_normal((6, 5)).astype(np.float32),
    }
    clip, cohort = 1.0, 4
    strategy = _dp_strategy(noise=1e-9, clip=clip, cohort=cohort)  # noise ~1e-10: the clipped mean shows
    sizes = [0.3, 3.0, 80.0, 4e4]  # norms of the four devices' changes; 4e4 is far beyond any bound
    updates = []
    for size in sizes:
        direction = {k: rng.standard_normal(v.shape) for k, v in sent.items()}
        length = np.sqrt(sum(np.sum(d**2) for d in direction.values()))
        updates.append({k: (sent[k] + size / length * d).astype(np.float32) for k, d in direction.items()})
    full = _aggregate(strategy, sent, [train_reply(u, examples=1 + 16 * i) for i, u in enumerate(updates)])
    want = {
        k: sent[k]
        + sum(min(1, clip / s) * (u[k] - sent[k]) for s, u in zip(sizes, updates, strict=True)) / cohort
        for k in sent
    }  # (uniform weights whatever the example counts)
    assert _norm(full, want) < 1e-5
    assert strategy.last_round["dp_clipped"] == 3 and strategy.last_round["valid"] == cohort
    for i in range(cohort):  # neighbouring cohorts: device i present or dropped out
        without = _aggregate(
            strategy, sent, [train_reply(u) if j != i else _failed() for j, u in enumerate(updates)]
        )
        assert _norm(full, without) <= clip / cohort * (1 + 1e-5)
        assert strategy.last_round["failed"] == 1


def test_noise_std_matches_formula(task_identity):
    sent = {"item_emb.weight": np.zeros((400, 50), np.float32), "item_bias": np.zeros(400, np.float32)}
    noise, clip, cohort = 1.5, 2.0, 4
    strategy = _dp_strategy(noise=noise, clip=clip, cohort=cohort)
    update = {"item_emb.weight": np.full((400, 50), 0.01, np.float32), "item_bias": np.zeros(400, np.float32)}
    # two of the four sampled devices reply: the step halves, the noise does not shrink
    released = _aggregate(strategy, sent, [train_reply(update), train_reply(update), _failed(), _failed()])
    change = np.concatenate([(released[k] - sent[k]).ravel() for k in sent])
    clipped = min(1.0, clip / np.sqrt(400 * 50 * 0.01**2)) * 0.01  # update norm 1.41 < clip: unclipped
    signal = np.concatenate([np.full(400 * 50, 2 * clipped / cohort), np.zeros(400)])
    residual = change - signal
    std = noise * clip / cohort
    assert strategy.strategy.noise_std == pytest.approx(std)
    assert abs(residual.mean()) < 4 * std / np.sqrt(residual.size)
    assert residual.std() == pytest.approx(std, rel=0.02)  # 20,400 draws: the std's own error is ~0.5%
    assert all(v.dtype == np.float32 for v in released.values())


def test_invalid_updates_are_rejected_before_dp(task_identity):
    sent = {"item_bias": np.zeros(4, np.float32), "explanation.bias": np.zeros(2, np.float32)}
    good = {"item_bias": np.full(4, 0.5, np.float32), "explanation.bias": np.full(2, -0.5, np.float32)}
    strategy = _dp_strategy(noise=1e-9, clip=100.0, cohort=4)
    nan = {**good, "item_bias": np.full(4, np.nan, np.float32)}
    wrong_shape = {**good, "item_bias": np.zeros(5, np.float32)}
    extra_key = {**good, "evil": np.zeros(1, np.float32)}
    released = _aggregate(
        strategy,
        sent,
        [train_reply(good), train_reply(nan), train_reply(wrong_shape), train_reply(extra_key)],
    )
    row = strategy.last_round
    assert row["valid"] == 1 and row["rejected"] == 3 and row["aggregated"]
    assert all(np.isfinite(v).all() for v in released.values())
    np.testing.assert_allclose(released["item_bias"], 0.5 / 4, atol=1e-6)  # only the good one, over n = 4
    assert row["epsilon"] > 0


def test_fedadam_steps_on_the_noisy_mean(task_identity):
    """DP hands FedAdam the noisy mean as the round's one reply: noise before Adam's step."""
    from flwr.serverapp.strategy import FedAdam

    cfg = FederatedConfig(
        privacy="dp", server_optimizer="fedadam", dp_noise=1e-9, dp_clip=1.0, fraction_train=1.0
    )
    strategy = make_strategy(cfg, 2, 2)
    assert isinstance(strategy.strategy, CentralDP) and isinstance(strategy.strategy.strategy, FedAdam)
    sent = {"item_bias": np.zeros(3, np.float32)}
    strategy.begin_round(sent, 2)
    up = {"item_bias": np.full(3, 5.0, np.float32)}  # clipped to norm 1: +0.577 per coordinate
    arrays, _ = strategy.aggregate_train(1, [train_reply(up), train_reply(up)])
    result = arrays["item_bias"].numpy()
    assert result.dtype == np.float32 and (result > 0).all() and strategy.last_round["epsilon"] > 0


def test_dp_config_checks():
    with pytest.raises(ValueError, match="aggregation=mean"):
        FederatedConfig(privacy="dp", aggregation="median", server_optimizer="fedavg")
    with pytest.raises(ValueError, match="dp_noise > 0"):
        FederatedConfig(privacy="dp", dp_noise=0.0)


@pytest.mark.slow
def test_simulation_with_dp_reports_increasing_epsilon(tmp_path):
    cfg = small_federation(
        tmp_path,
        users=3,
        local_epochs=1,
        fraction_train=2 / 3,
        privacy="dp",
        dp_noise=1.0,
        dp_clip=0.5,
        eval_every=2,
    )
    history = run_simulation(cfg, num_cpus=2)["history"]
    eps = [row["epsilon"] for row in history]
    want = RdpAccountant(2 / 3, 1.0)
    for row, rounds in zip(history, (1, 2), strict=True):
        assert row["aggregated"] and row["valid"] == 2 and row["dp_delta"] == cfg.dp_delta
        want.releases = rounds
        assert row["epsilon"] == pytest.approx(want.epsilon(cfg.dp_delta))
    assert 0 < eps[0] < eps[1]
    assert f"DP epsilon {eps[1]:.3g} at delta 1e-05" in _round_line(history[1], 2)
    assert 0 <= history[-1]["test"]["ndcg@10"] <= 1


def test_row_quorum_under_dp_counts_devices_by_partition(task_identity):
    """Central DP keeps Flower's unseeded sampling, but the row quorum still counts each device by its stable
    partition id; Flower's node ids (unsigned 64-bit) never enter the registry, and an unknown node counts by
    its node id without overflowing it."""
    nodes = 20  # the quorum runs from 20 nodes on (a tenth of them, at least 2)
    cfg = FederatedConfig(
        server_optimizer="fedavg", privacy="dp", dp_noise=1e-9, dp_clip=10.0, row_quorum=2, norm_bound=1e6
    )
    strategy = make_strategy(cfg, nodes, nodes)
    node_ids = [2**64 - 1 - i for i in range(nodes)]
    strategy.setup_sampling(dict(zip(node_ids, range(nodes), strict=True)), None)
    assert not strategy.seeded and strategy.quorum is None
    sent = {"item_bias": np.zeros(5, np.float32), "item_emb.weight": np.zeros((5, 2), np.float32)}
    raise_row_3 = {
        "item_bias": np.array([0, 0, 0, 1, 0], np.float32),
        "item_emb.weight": sent["item_emb.weight"],
    }
    _aggregate(
        strategy, sent, [train_reply(raise_row_3, node=node_ids[4]), train_reply(raise_row_3, node=2**63)]
    )
    assert strategy.quorum.open_rows[3]  # two distinct devices
    assert set(strategy.quorum.supporters[1:3].ravel().tolist()) <= {int(np.iinfo(np.uint64).max)}
    raise_row_2 = raise_row_3 | {"item_bias": np.array([0, 0, 1, 0, 0], np.float32)}
    _aggregate(strategy, sent, [train_reply(raise_row_2, node=node_ids[4])], rnd=2)
    assert strategy.quorum.supporters[2, 0] == 4  # its partition id
