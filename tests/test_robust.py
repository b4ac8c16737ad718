"""Robust aggregation (shared_model.protocol.clipping, the strategies of server/strategies.py): update and item-row clipping, the
coordinate-wise trimmed mean and median, their interplay with validation, and the hostile-update suite of the
poisoning benchmark sent in one round together with good updates."""

from __future__ import annotations

import numpy as np
import pytest

from server.row_quorum import UNSET, RowQuorum
from server.strategies import effective_quorum, make_strategy
from server.validation import UpdateRejected, validate_update
from shared_model.config import FederatedConfig
from shared_model.protocol.clipping import clip_update
from shared_model.protocol.updates import (
    compress,
    encode_sparse,
    max_update_weight,
    sample_rows,
    update_weight,
)
from simulations.hostile_updates import aggregate_round, hostile_round, hostile_updates, strategy_round


def _sent(rng: np.random.Generator, rows: int = 12) -> dict[str, np.ndarray]:
    return {
        "item_emb.weight": rng.standard_normal((rows, 4)).astype(np.float32),
        "item_bias": rng.standard_normal(rows).astype(np.float32),
        "explanation.bias": rng.standard_normal(3).astype(np.float32),
    }


def _moved(sent: dict, rng: np.random.Generator, size: float = 0.1) -> dict[str, np.ndarray]:
    return {k: (v + size * rng.standard_normal(v.shape)).astype(np.float32) for k, v in sent.items()}


def _change(update: dict, sent: dict) -> dict[str, np.ndarray]:
    return {k: update[k].astype(np.float64) - sent[k] for k in sent}


def _norm(delta: dict) -> float:
    return float(np.sqrt(sum(np.sum(d**2) for d in delta.values())))


def test_norm_clip_bounds_the_change_keeps_its_direction_and_dtype():
    rng = np.random.default_rng(0)
    sent = _sent(rng)
    update = _moved(sent, rng, size=1.0)
    before = _change(update, sent)
    clipped = clip_update(update, sent, clip_norm=0.5, row_clip=0)
    after = _change(clipped.arrays, sent)
    assert clipped.norm_clipped and clipped.rows_clipped == 0
    assert _norm(after) == pytest.approx(0.5, rel=1e-5)
    for k in sent:  # scaled, not reshaped
        np.testing.assert_allclose(after[k], before[k] * 0.5 / _norm(before), atol=1e-6)
        assert clipped.arrays[k].dtype == np.float32
    small = clip_update(update, sent, clip_norm=2 * _norm(before), row_clip=0)
    assert not small.norm_clipped and all(
        small.arrays[k] is update[k] for k in sent
    )  # untouched, same arrays
    off = clip_update(update, sent, clip_norm=0, row_clip=0)
    assert all(off.arrays[k] is update[k] for k in sent)


def test_row_clip_bounds_each_item_rows_change_and_leaves_other_arrays():
    rng = np.random.default_rng(1)
    sent = _sent(rng)
    update = _moved(sent, rng, size=0.01)
    update["item_emb.weight"][5] += 3.0  # one promoted item: a large change of its embedding and bias
    update["item_bias"][5] += 4.0
    update["explanation.bias"] += 9.0  # not an item table: row clipping leaves it alone
    clipped = clip_update(update, sent, clip_norm=0, row_clip=0.5)
    delta = _change(clipped.arrays, sent)
    row_norm = np.sqrt(np.sum(delta["item_emb.weight"] ** 2, axis=1) + delta["item_bias"] ** 2)
    assert clipped.rows_clipped == 1 and row_norm[5] == pytest.approx(0.5, rel=1e-5)
    assert (row_norm <= 0.5 + 1e-6).all()
    others = np.arange(12) != 5
    np.testing.assert_array_equal(
        clipped.arrays["item_emb.weight"][others], update["item_emb.weight"][others]
    )
    np.testing.assert_array_equal(clipped.arrays["explanation.bias"], update["explanation.bias"])
    assert all(v.dtype == np.float32 for v in clipped.arrays.values())
    # both clips: rows first, then the whole update
    both = clip_update(update, sent, clip_norm=0.3, row_clip=0.5)
    assert both.norm_clipped and _norm(_change(both.arrays, sent)) == pytest.approx(0.3, rel=1e-5)


def _constant(sent: dict, value: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, value) for k, v in sent.items()}


@pytest.mark.parametrize(
    "aggregation,expected",
    [("mean", (0 + 1 + 2 + 3 + 50 * 100) / 54), ("trimmed-mean", 2.0), ("median", 2.0)],
)
def test_robust_aggregates_ignore_an_outlier(aggregation, expected):
    """Five devices send every value as 0, 1, 2, 3 and 100 (the last claiming 50 examples, the most one round
    trains at max_len 50): the weighted
    mean follows the outlier; the trimmed mean (one cut at each end) and the median give 2 exactly."""
    sent = _constant(_sent(np.random.default_rng(2)), 0.0)
    cfg = FederatedConfig(
        server_optimizer="fedavg", row_clip=0, aggregation=aggregation, trim_fraction=0.2, norm_bound=1e4
    )
    replies = [(_constant(sent, v), 1) for v in (0, 1, 2, 3)] + [(_constant(sent, 100), 50)]
    arrays, stats = aggregate_round(cfg, sent, replies)
    assert stats["valid"] == 5 and stats["aggregated"]
    for k, v in arrays.items():
        assert v.dtype == np.float32 and v.shape == sent[k].shape
        np.testing.assert_allclose(v, expected, rtol=1e-6)


def test_trimmed_mean_cuts_nothing_with_too_few_updates():
    sent = _constant(_sent(np.random.default_rng(3)), 0.0)
    cfg = FederatedConfig(
        server_optimizer="fedavg", row_clip=0, aggregation="trimmed-mean", trim_fraction=0.1, norm_bound=1e4
    )
    arrays, _ = aggregate_round(cfg, sent, [(_constant(sent, v), 1) for v in (0, 1, 2, 3, 100)])
    np.testing.assert_allclose(arrays["item_bias"], 106 / 5, rtol=1e-6)  # floor(0.1 * 5) = 0 cut: the mean


def test_clipping_comes_after_validation():
    """An update over the norm bound is rejected, not clipped into the aggregate; valid ones are clipped."""
    sent = _constant(_sent(np.random.default_rng(4)), 0.0)
    size = np.sqrt(sum(v.size for v in sent.values()))  # the norm of an update of all ones
    cfg = FederatedConfig(
        server_optimizer="fedavg",
        row_clip=0,
        row_quorum=0,
        norm_bound=3 * size,
        clip_norm=size / 2,
        min_reply_fraction=0.5,
    )
    replies = [
        (_constant(sent, 1.0), 1),
        (_constant(sent, 2.0), 1),
        (_constant(sent, 4.0), 1),
        (_constant(sent, np.nan), 1),
    ]
    arrays, stats = aggregate_round(cfg, sent, replies)
    assert stats["valid"] == 2 and stats["rejected"] == 2 and stats["norm_clipped"] == 2
    assert any("norm" in r for r in stats["rejections"]) and any(
        "non-finite" in r for r in stats["rejections"]
    )
    for v in arrays.values():  # both valid updates clipped to all-0.5: the 4.0 and NaN ones never counted
        np.testing.assert_allclose(v, 0.5, rtol=1e-6)
    assert (
        "norm_clipped"
        not in aggregate_round(
            FederatedConfig(server_optimizer="fedavg", row_clip=0, row_quorum=0, norm_bound=1e4),
            sent,
            replies[:2],
        )[1]
    )


def test_row_clip_limits_a_promoted_item_in_the_aggregate():
    rng = np.random.default_rng(5)
    sent = _sent(rng)
    honest = [(_moved(sent, rng, size=0.01), 10) for _ in range(9)]
    attack = {k: v.copy() for k, v in sent.items()}
    attack["item_bias"][7] += 20.0
    plain, _ = aggregate_round(
        FederatedConfig(server_optimizer="fedavg", row_clip=0, norm_bound=50), sent, honest + [(attack, 10)]
    )
    clipped, stats = aggregate_round(
        FederatedConfig(server_optimizer="fedavg", norm_bound=50, row_clip=0.1), sent, honest + [(attack, 10)]
    )
    assert plain["item_bias"][7] - sent["item_bias"][7] > 1.9  # a tenth of the boost gets through the mean
    assert abs(clipped["item_bias"][7] - sent["item_bias"][7]) < 0.1 / 10 + 0.01
    assert stats["rows_clipped"] >= 1


def test_sparse_updates_under_trimmed_mean_move_only_rows_enough_devices_touched():
    """Densified sparse updates carry zero change on the rows a device did not send: with five devices and a
    trim of one at each end, a row only one device sent keeps none of its change (the mean keeps a fifth)."""
    sent = _constant(_sent(np.random.default_rng(6)), 0.0)
    new = _constant(sent, 1.0)
    replies = [(encode_sparse(new, np.array([0, 1])), 1)] + [(encode_sparse(new, np.array([1])), 1)] * 4
    trimmed, _ = aggregate_round(
        FederatedConfig(
            server_optimizer="fedavg", row_clip=0, row_quorum=0, aggregation="trimmed-mean", trim_fraction=0.2
        ),
        sent,
        replies,
    )
    mean, _ = aggregate_round(
        FederatedConfig(server_optimizer="fedavg", row_clip=0, row_quorum=0), sent, replies
    )
    assert trimmed["item_bias"][0] == 0.0 and mean["item_bias"][0] == pytest.approx(0.2)
    assert trimmed["item_bias"][1] == 1.0 and (trimmed["item_bias"][2:] == 0).all()


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
def test_fedadam_steps_on_a_robust_aggregate(aggregation):
    """A promotion push on one row by a minority of devices: FedAdam on the mean moves that row by a full
    server step (its per-coordinate normalization turns any consistent change into one); on the coordinate-
    wise median or trimmed mean the row does not move, while rows every device moves do."""
    rng = np.random.default_rng(3)
    sent = _sent(rng, rows=30)
    honest = []
    for _ in range(7):
        moved = {k: v.copy() for k, v in sent.items()}
        moved["item_bias"][5:] += 0.01 + 0.001 * rng.standard_normal(len(moved["item_bias"]) - 5)
        honest.append((moved, 10))
    attack = {k: v.copy() for k, v in sent.items()}
    attack["item_bias"][1] += 0.4  # the promoted row, within the row clip
    replies = honest + [(attack, 10), (attack, 10)]
    base = dict(
        server_optimizer="fedadam",
        server_tau=1e-8,
        row_clip=0.5,
        row_quorum=0,
        norm_bound=1e4,
        trim_fraction=0.25,
    )
    plain, _ = aggregate_round(FederatedConfig(**base), sent, replies)
    robust, _ = aggregate_round(FederatedConfig(**base, aggregation=aggregation), sent, replies)
    step = plain["item_bias"][5] - sent["item_bias"][5]
    assert step > 0 and plain["item_bias"][1] - sent["item_bias"][1] == pytest.approx(step, rel=1e-3)
    assert robust["item_bias"][1] == pytest.approx(sent["item_bias"][1], abs=1e-6)
    assert robust["item_bias"][5] - sent["item_bias"][5] == pytest.approx(step, rel=1e-3)


def test_fedadam_robust_on_the_item_tables_only():
    """robust_scope=item-tables: the promoted row stays put (median), while every other array takes the same
    step as FedAdam on the example-weighted mean (unequal weights, so a plain mean would differ)."""
    rng = np.random.default_rng(4)
    sent = _sent(rng, rows=30)
    replies = []
    for weight in (3, 10, 4, 7, 12):
        moved = {k: v.copy() for k, v in sent.items()}
        moved["item_bias"][5:] += 0.01
        moved["explanation.bias"] += 0.01 * rng.standard_normal(3).astype(np.float32)
        replies.append((moved, weight))
    attack = {k: v.copy() for k, v in sent.items()}
    attack["item_bias"][1] += 0.4
    replies += [(attack, 5)]
    base = dict(server_optimizer="fedadam", server_tau=1e-8, row_clip=0.5, row_quorum=0, norm_bound=1e4)
    plain, _ = aggregate_round(FederatedConfig(**base), sent, replies)
    scoped, _ = aggregate_round(
        FederatedConfig(**base, aggregation="median", robust_scope="item-tables"), sent, replies
    )
    everything, _ = aggregate_round(FederatedConfig(**base, aggregation="median"), sent, replies)
    np.testing.assert_allclose(scoped["explanation.bias"], plain["explanation.bias"], rtol=1e-6)
    assert not np.allclose(everything["explanation.bias"], plain["explanation.bias"], rtol=1e-4)
    np.testing.assert_allclose(scoped["item_bias"], everything["item_bias"], rtol=1e-6)
    assert plain["item_bias"][1] - sent["item_bias"][1] > 1e-3  # the mean lets the push through
    assert scoped["item_bias"][1] == pytest.approx(sent["item_bias"][1], abs=1e-6)


@pytest.mark.parametrize("aggregation", ["mean", "trimmed-mean", "median"])
def test_every_hostile_update_is_rejected_in_a_round_with_good_ones(aggregation):
    """The hostile-update attack (THREAT_MODEL.md): the whole hostile suite plus dense, sparse and int8 good updates in ONE round."""
    rng = np.random.default_rng(7)
    sent = _sent(rng, rows=30) | {"encoder.w": rng.standard_normal((2, 10, 4)).astype(np.float32)}
    goods = [
        (_moved(sent, rng), 3),
        (_moved(sent, rng), 5),
        (_moved(sent, rng), 2),
        (sample_rows(encode_sparse(_moved(sent, rng), np.array([2, 9, 11])), sent, 0.5, rng), 4),
        (compress(_moved(sent, rng), sent, rng), 6),
    ]
    cfg = FederatedConfig(
        server_optimizer="fedavg",
        row_clip=0,
        aggregation=aggregation,
        norm_bound=5.0,
        min_reply_fraction=0.1,
        clip_norm=0.8,
    )
    result = hostile_round(cfg, sent, goods)
    hostile = hostile_updates(sent, goods[0][0], cfg.norm_bound, rng)
    assert result["hostile"] == len(hostile) and result["rejected"] == len(hostile) and result["valid"] == 5
    assert result["round_completed"] and result["aggregate_equals_good_only"] and result["float32"]
    assert set(result["reasons"]) == set(hostile) and all(result["reasons"].values())  # each with a reason
    kinds = (
        "wrong shape",
        "NaN",
        "Inf",
        "huge norm",
        "missing key",
        "extra key",
        "float64",
        "example weight",
        "sparse: row",
        "int8: negative scale",
        "int8: NaN scale",
        "sampled rows",
        "no arrays",
    )
    assert all(any(kind in name for name in hostile) for kind in kinds)


def test_population_head_shares_come_from_well_formed_reports_only():
    """The server's estimate of the population's head shares (sent to the devices for the responsibility
    balance): example-weighted over the cohort, kept across rounds, ignoring reports that are no distribution,
    saved with the server state."""
    from server.strategies import make_strategy
    from server.validated import SHARE_MEMORY
    from simulations.hostile_updates import train_reply

    rng = np.random.default_rng(0)
    sent = _sent(rng)
    cfg = FederatedConfig(server_optimizer="fedavg", row_clip=0, norm_bound=1e4)
    strategy = make_strategy(cfg, 4, 4)
    assert strategy.round_config() == {}  # nothing to steer by before the first reports

    def round_of(shares: list[tuple[list[float], int]], server_round: int) -> None:
        messages = []
        for node, (share, examples) in enumerate(shares, 1):
            msg = train_reply(_moved(sent, rng, 0.01), examples, node)
            for h, x in enumerate(share):
                msg.content["metrics"][f"head-share-{h}"] = x
            messages.append(msg)
        strategy.begin_round(sent, len(messages))
        strategy.aggregate_train(server_round, messages)

    hostile = [([float("nan"), 1, 0, 0], 100), ([2.0, -1.0, 0, 0], 100), ([0.9, 0.9, 0, 0], 100)]
    round_of([([0.5, 0.5, 0, 0], 1), ([0, 0, 0.5, 0.5], 3), *hostile], 1)
    np.testing.assert_allclose(strategy.head_share, [0.125, 0.125, 0.375, 0.375])
    round_of([([1.0, 0, 0, 0], 2)], 2)
    expected = SHARE_MEMORY * np.array([0.125, 0.125, 0.375, 0.375]) + (1 - SHARE_MEMORY) * np.eye(4)[0]
    np.testing.assert_allclose(strategy.round_config()["head-share"], expected)
    resumed = make_strategy(cfg, 4, 4)
    resumed.restore_server_state(strategy.server_state())
    np.testing.assert_allclose(resumed.head_share, expected)


def test_example_weight_bound():
    """A node's example weight counts the targets its users trained (at most max_len per user and epoch); the
    server rejects a claim above what its largest partition can train, and accepts one at the bound."""
    assert [update_weight(n, 50, 1) for n in (1, 2, 30, 51, 52, 2698)] == [0, 1, 29, 50, 50, 50]
    assert update_weight(2698, 50, 3) == 150
    assert max_update_weight(50, 1, 610, 61) == 500  # 10 users per node
    assert max_update_weight(50, 2, 611, 61) == 1100  # 11 users on the largest partition
    sent = _sent(np.random.default_rng(7))
    validate_update(sent, sent, 500, 1e4, max_examples=500)
    with pytest.raises(UpdateRejected, match="exceeds what one round trains"):
        validate_update(sent, sent, 501, 1e4, max_examples=500)


def _raising(sent: dict, rows: list[int], size: float = 0.1) -> dict[str, np.ndarray]:
    """An update that raises the bias of ``rows`` (and moves their embedding), lowers every other bias."""
    update = {k: v.copy() for k, v in sent.items()}
    update["item_bias"] -= np.float32(0.01)
    update["item_bias"][rows] += np.float32(size + 0.01)
    update["item_emb.weight"][rows] += np.float32(size)
    return update


def test_row_quorum_counts_distinct_devices_and_holds_rows_until_then():
    sent = _sent(np.random.default_rng(8))
    quorum = RowQuorum(3, len(sent["item_bias"]))
    for device in (7, 7, 8):  # a device counts once per row, however often it comes back
        quorum.observe(device, _raising(sent, [2, 5]), sent)
    quorum.observe(9, _raising(sent, [5]), sent)
    assert quorum.count[2] == 2 and quorum.count[5] == 3 and quorum.open_rows.sum() == 1
    assert (quorum.supporters[5] == UNSET).all()  # an open row forgets its supporters
    held, raised = quorum.hold(_raising(sent, [2, 5]), sent)
    assert raised == 1  # row 2's rise was held back; row 5 is open
    np.testing.assert_array_equal(held["item_emb.weight"][2], sent["item_emb.weight"][2])
    assert held["item_bias"][2] == sent["item_bias"][2]
    assert held["item_bias"][5] > sent["item_bias"][5]  # open: moves as sent
    np.testing.assert_array_equal(held["item_emb.weight"][5], _raising(sent, [5])["item_emb.weight"][5])
    assert held["item_bias"][0] < sent["item_bias"][0]  # held rows may still go down
    np.testing.assert_array_equal(held["explanation.bias"], sent["explanation.bias"])
    restored = RowQuorum(3, len(sent["item_bias"]))
    restored.restore(quorum.state())
    np.testing.assert_array_equal(restored.count, quorum.count)
    quorum.observe(9, _raising(sent, [2]), sent)  # the state is a copy
    assert restored.count[2] == 2 and quorum.count[2] == 3


def test_row_quorum_counts_flower_node_ids_and_reads_signed_checkpoints():
    """Without partition ids a device is its Flower node id, an unsigned 64-bit integer (a central-DP run, whose
    cohorts are not seeded, overflowed a signed registry); checkpoints of the signed registry still restore."""
    sent = _sent(np.random.default_rng(10))
    quorum = RowQuorum(2, len(sent["item_bias"]))
    big = 2**64 - 2
    for device in (big, big, 2**63 + 5):
        quorum.observe(device, _raising(sent, [3]), sent)
    assert quorum.open_rows[3] and quorum.count[3] == 2
    quorum.observe(big, _raising(sent, [1]), sent)
    assert quorum.supporters[1, 0] == big and quorum.count[1] == 1
    signed = {
        "row-quorum/supporters": np.where(quorum.supporters == UNSET, -1, 7).astype(np.int64),
        "row-quorum/count": quorum.count,
    }
    restored = RowQuorum(2, len(sent["item_bias"]))
    restored.restore(signed)
    assert restored.supporters[1, 0] == 7 and restored.supporters[1, 1] == UNSET
    restored.observe(7, _raising(sent, [1]), sent)  # the same device: still one supporter
    assert restored.count[1] == 1


def test_row_quorum_keeps_a_few_devices_from_promoting_an_item_across_rounds():
    """Two devices push item 3 in every round, with honest devices that never raise it: under the quorum the
    item's row never moves up and its embedding never moves; without it the pushers' rise gets through. The
    quorum's supporters survive a checkpoint (server_state) and identify devices by partition."""
    rng = np.random.default_rng(9)
    sent = _sent(rng)
    honest_rows = [[0, 1], [1, 2], [0, 2], [1, 4], [0, 4], [2, 4]]  # rows 0, 1, 2, 4 reach a quorum of 3
    ends = {}
    for quorum in (0, 3):
        cfg = FederatedConfig(server_optimizer="fedavg", row_clip=0, norm_bound=50, row_quorum=quorum)
        strategy = make_strategy(cfg, 40, 40)  # a quorum of 3 needs a federation of 30 or more
        arrays = sent
        for rnd in range(1, 4):
            replies = [(_raising(arrays, [3], 1.0), 5), (_raising(arrays, [3], 1.0), 5)]
            replies += [(_raising(arrays, rows), 5) for rows in honest_rows]
            nodes = [101, 102] + list(range(6))
            arrays, stats = strategy_round(strategy, rnd, arrays, replies, nodes)
        ends[quorum] = (arrays, stats, strategy.server_state())
    plain, held = ends[0][0], ends[3][0]
    assert plain["item_bias"][3] > sent["item_bias"][3] + 0.5
    assert held["item_bias"][3] < sent["item_bias"][3]
    np.testing.assert_allclose(held["item_emb.weight"][3], sent["item_emb.weight"][3], atol=1e-6)
    assert held["item_bias"][4] > sent["item_bias"][4]  # the honest quorum's rows are learned
    stats, state = ends[3][1], ends[3][2]
    assert stats["rows_open"] == 4 and stats["promotions_held"] == 2  # the two pushes on row 3, last round
    assert "row-quorum/count" not in ends[0][2] and state["row-quorum/count"][3] == 2
    resumed = make_strategy(
        FederatedConfig(server_optimizer="fedavg", row_clip=0, norm_bound=50, row_quorum=3), 40, 40
    )
    resumed.restore_server_state(state)
    np.testing.assert_array_equal(
        resumed.server_state()["row-quorum/supporters"], state["row-quorum/supporters"]
    )
    assert [effective_quorum(4, n) for n in (10, 19, 20, 39, 61, 610)] == [0, 0, 2, 3, 4, 4]
    secagg = FederatedConfig(privacy="secagg", row_quorum=4)
    assert make_strategy(secagg, 61, 610).row_quorum == 0  # SecAgg+ rounds cannot count devices


def test_quorum_reach_reports_the_items_a_quorum_leaves_unlearned(tmp_path):
    """The poisoning benchmark's quorum part on an untrained latest-small checkpoint: shares in [0, 1] that grow
    with the quorum, and a run without the quorum's state reported as such."""
    from server.app import initial_shared
    from server.checkpoint import save_server_checkpoint
    from simulations.bench_poisoning import quorum_reach

    cfg = FederatedConfig()
    save_server_checkpoint(tmp_path, initial_shared(cfg), 1, [], {})
    low, high = (quorum_reach(cfg, tmp_path, q) for q in (2, 4))
    assert not high["trained_with_quorum"] and high["round"] == 1
    for key in ("items_below", "train_events_below", "test_targets_below", "top10_slots_below"):
        assert 0 <= low[key] <= high[key] <= 1
    assert 0.5 < high["items_below"] < 0.7 and high["train_events_below"] < 0.15  # latest-small: a long tail
