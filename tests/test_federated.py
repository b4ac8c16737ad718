"""Federated parts without the simulation engine: update codec, validation, the device round, the
ClientApp called directly, virtual users == one user per node, server checkpoints."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from client_sdk.device import HostedUsers
from client_sdk.flower_client import make_client_app
from server.app import initial_shared
from server.checkpoint import load_server_checkpoint, save_server_checkpoint
from server.validation import UpdateRejected, validate_update
from shared_model.config import FederatedConfig
from shared_model.partition import split_state
from shared_model.protocol.updates import (
    ITEM_TABLES,
    balanced_budgets,
    compress,
    decompress,
    densify,
    encode_sparse,
    importance_update,
    largest_rows_update,
    poisson_sample,
    row_bytes,
    sample_rows,
    sampled_names,
    sparse_update,
    unsent_change,
    upload_rows,
)
from simulations.hostile_updates import train_reply

from .helpers import make_events, request_message


@pytest.fixture()
def cfg(tmp_path) -> FederatedConfig:
    data = make_events(tmp_path / "events.csv")
    return FederatedConfig(
        dataset=str(data),
        max_len=16,
        d_model=16,
        num_rounds=2,
        local_epochs=2,
        out_dir=str(tmp_path / "run"),
        fraction_train=1.0,
    )


def test_sparse_codec_roundtrip_and_decoys():
    rng = np.random.default_rng(0)
    ref = {
        "item_emb.weight": rng.standard_normal((50, 4)).astype(np.float32),
        "item_bias": rng.standard_normal(50).astype(np.float32),
        "explanation.bias": np.zeros(3, np.float32),
    }
    new = {k: v + 1 for k, v in ref.items()}
    sparse = encode_sparse(new, upload_rows(np.array([3, 7, 7]), decoys=5, num_rows=50, rng=rng))
    assert len(sparse["item_emb.weight@rows"]) == 7 and {3, 7} <= set(sparse["item_emb.weight@rows"].tolist())
    dense = densify(sparse, ref)
    rows = sparse["item_emb.weight@rows"]
    assert np.array_equal(dense["item_emb.weight"][rows], new["item_emb.weight"][rows])
    untouched = np.setdiff1d(np.arange(50), rows)
    assert np.array_equal(dense["item_emb.weight"][untouched], ref["item_emb.weight"][untouched])
    assert sum(v.nbytes for v in sparse.values()) < sum(v.nbytes for v in new.values())


def test_weighted_decoys_estimate_the_dense_update_without_bias():
    """Decoy rows scaled by the inverse of their sampling chance: averaged over many devices' draws, the
    densified sparse updates match the dense update on every row (touched rows exactly)."""
    rng = np.random.default_rng(2)
    sent = {"item_emb.weight": np.zeros((40, 3), np.float32), "item_bias": np.zeros(40, np.float32)}
    dense = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in sent.items()}
    touched = np.array([1, 5, 5, 9])
    total = {k: np.zeros(v.shape) for k, v in sent.items()}
    draws = 4000
    for _ in range(draws):
        rows = upload_rows(touched, decoys=6, num_rows=40, rng=rng)
        got = densify(sparse_update(dense, sent, touched, rows, 1.0, rng), sent)
        assert np.array_equal(got["item_bias"][[1, 5, 9]], dense["item_bias"][[1, 5, 9]])
        for k in total:
            total[k] += got[k]
    for k in total:
        np.testing.assert_allclose(total[k] / draws, dense[k], atol=0.25)
    no_decoys = sparse_update(dense, sent, touched, np.array([1, 5, 9]), 1.0, rng)
    for k, v in encode_sparse(dense, np.array([1, 5, 9])).items():  # no decoys: the touched rows as trained
        np.testing.assert_array_equal(no_decoys[k], v)


@pytest.mark.parametrize("kind,levels,ratio", [("int8", 127, 0.35), ("int4", 7, 0.2)])
@pytest.mark.parametrize("sparse", [False, True])
def test_quantized_codec_is_unbiased_small_and_validated(sparse, kind, levels, ratio):
    rng = np.random.default_rng(1)
    ref = {
        "item_emb.weight": rng.standard_normal((200, 16)).astype(np.float32),
        "item_bias": rng.standard_normal(200).astype(np.float32),
        "explanation.w": rng.standard_normal((8, 15)).astype(np.float32),  # odd size: int4 pads a nibble
    }
    new = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in ref.items()}
    new["explanation.w"][3] = ref["explanation.w"][3]  # an unchanged row: scale 0, decoded exactly
    update = encode_sparse(new, np.arange(0, 200, 7)) if sparse else new
    packed = compress(update, ref, rng, kind)
    size = lambda u: sum(v.nbytes for k, v in u.items() if not k.endswith("@rows"))  # noqa: E731
    assert size(packed) < ratio * size(update)
    dense = validate_update(packed, ref, 1, norm_bound=10)
    want = densify(update, ref)
    # int4 quantizes matrices only, vectors go as int8 (their one scale is set by a heavy tail)
    assert {k.rsplit("@", 1)[1] for k in packed if k.startswith("item_bias@")} <= {"q8", "scale", "rows"}
    for k in ref:  # at most one quantization step (per row; per array when 1-D) from the exact update
        delta = np.abs(want[k] - ref[k])
        step = (delta.max(axis=1, keepdims=True) if delta.ndim == 2 else delta.max() * levels / 127) / levels
        assert (np.abs(dense[k] - want[k]) <= step * 1.001 + 1e-7).all(), k
    np.testing.assert_array_equal(dense["explanation.w"][3], ref["explanation.w"][3])
    draws = np.mean(
        [
            densify(decompress(compress(update, ref, rng, kind), ref), ref)["explanation.w"]
            for _ in range(1000)
        ],
        axis=0,
    )
    step = np.abs(want["explanation.w"] - ref["explanation.w"]).max() / levels
    assert np.abs(draws - want["explanation.w"]).max() < 0.1 * step  # stochastic rounding: unbiased
    q = "@q8" if kind == "int8" else "@q4"
    minus8 = packed[f"explanation.w{q}"].copy()
    minus8[0] = 0x08  # int4: a level of -8
    for key, bad in [
        (f"explanation.w{q}", packed[f"explanation.w{q}"].astype(np.int16)),
        (f"explanation.w{q}", packed[f"explanation.w{q}"][:-1]),
        ("explanation.w@scale", np.full((8, 1), -1, np.float32)),
        ("explanation.w@scale", np.full((8, 1), np.nan, np.float32)),
        ("item_bias@scale", np.zeros((2,), np.float32)),
        *([(f"explanation.w{q}", minus8)] if kind == "int4" else []),
    ]:
        with pytest.raises(UpdateRejected):
            validate_update({**packed, key: bad}, ref, 1, 10)
    bias = next(k for k in packed if k.startswith("item_bias") and k.endswith("@q8"))
    other = bias.removesuffix("@q8") + "@q4"
    mixed = {
        **{k: v for k, v in packed.items() if k != bias},
        other: packed[bias],
    }  # two codecs in one update
    with pytest.raises(UpdateRejected, match="wrong keys"):
        validate_update(mixed, ref, 1, 10)


def _ref():
    return {
        "item_emb.weight": np.zeros((10, 4), np.float32),
        "item_bias": np.zeros(10, np.float32),
        "explanation.bias": np.zeros(3, np.float32),
    }


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda u: u.pop("item_bias"), "wrong keys"),
        (lambda u: u.__setitem__("extra", np.zeros(1, np.float32)), "wrong keys"),
        (lambda u: u.__setitem__("item_bias", np.zeros(11, np.float32)), "shape"),
        (lambda u: u.__setitem__("item_bias", np.zeros(10, np.float64)), "dtype"),
        (lambda u: u["item_bias"].__setitem__(0, np.nan), "non-finite"),
        (lambda u: u["item_bias"].__setitem__(0, np.inf), "non-finite"),
        (lambda u: u["item_emb.weight"].__setitem__(slice(None), 1e6), "norm"),
    ],
)
def test_hostile_dense_updates_are_rejected(mutate, reason):
    update = {k: v.copy() for k, v in _ref().items()}
    validate_update(update, _ref(), 3, norm_bound=10)  # the clean update passes
    mutate(update)
    with pytest.raises(UpdateRejected, match=reason):
        validate_update(update, _ref(), 3, norm_bound=10)


@pytest.mark.parametrize("examples", [0, -1, float("nan"), "3", None])
def test_bad_example_weight_is_rejected(examples):
    with pytest.raises(UpdateRejected, match="num-examples"):
        validate_update(_ref(), _ref(), examples, norm_bound=10)


def test_hostile_sparse_updates_are_rejected():
    ref = _ref()
    good = encode_sparse(ref, np.array([1, 2]))
    validate_update(good, ref, 1, 10)
    for key, bad in [
        ("item_emb.weight@rows", np.array([1, 99], np.int32)),
        ("item_emb.weight@rows", np.array([1, 1], np.int32)),
        ("item_emb.weight@rows", np.array([1, 2], np.int64)),  # row ids are int32
        ("item_bias@rows", np.array([1, 3], np.int32)),
        ("item_emb.weight@values", np.zeros((3, 4), np.float32)),
    ]:
        with pytest.raises(UpdateRejected):
            validate_update({**good, key: bad}, ref, 1, 10)


def test_sampled_rows_estimate_the_dense_update_and_are_validated():
    """Other shared matrices sampled by rows (rows along the last axis, changes divided by the share sent):
    unbiased over many draws, validated with int8 compression on top, and malformed row sets are rejected."""
    rng = np.random.default_rng(3)
    sent = {
        "item_emb.weight": np.zeros((10, 4), np.float32),
        "item_bias": np.zeros(10, np.float32),
        "blocks.w": np.zeros((4, 8, 6), np.float32),  # 32 rows of 6
        "small.w": np.zeros((3, 6), np.float32),  # too few rows: sent whole
        "norm.weight": np.zeros(6, np.float32),
    }
    new = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in sent.items()}
    update = sample_rows(encode_sparse(new, np.array([2, 5])), sent, 0.25, rng)
    assert sampled_names(sent) == ["blocks.w"] and update["blocks.w@values"].shape == (8, 6)
    assert {"small.w", "norm.weight", "item_emb.weight@rows"} <= update.keys() and "blocks.w" not in update
    dense = validate_update(compress(update, sent, rng), sent, 1, norm_bound=10)
    assert dense["blocks.w"].shape == (4, 8, 6) and (dense["blocks.w"] != 0).any(axis=-1).sum() == 8
    mean = np.mean(
        [densify(sample_rows(new, sent, 0.25, rng), sent)["blocks.w"] for _ in range(3000)], axis=0
    )
    np.testing.assert_allclose(mean, new["blocks.w"], atol=0.03)  # 0.1-scale changes, 4x weighted rows
    for key, bad in [
        ("blocks.w@rows", np.array([0, 1, 2, 3, 4, 5, 6, 32], np.int32)),
        ("blocks.w@rows", np.zeros(8, np.int32)),
        ("blocks.w@values", np.zeros((9, 6), np.float32)),
        ("small.w@rows", np.array([0], np.int32)),
    ]:
        with pytest.raises(UpdateRejected):
            validate_update({**update, key: bad}, sent, 1, 10)
    with pytest.raises(ValueError, match="upload='sparse'"):
        FederatedConfig(row_fraction=0.5)


def test_poisson_sample_draws_rows_with_chances_proportional_to_their_weight():
    rng = np.random.default_rng(4)
    weights = np.array([np.inf, 0.0, 8.0, 1.0, 1.0, 2.0, 0.0, 4.0])
    counts, draws = np.zeros(8), 20000
    for _ in range(draws):
        rows, chance = poisson_sample(weights, 4.0, rng)
        assert (
            rows.dtype == np.int32 and np.all(np.diff(rows) > 0) and 0 in rows
        )  # an infinite weight: always
        counts[rows] += 1
        assert np.all((chance > 0) & (chance <= 1))
    # 0 always, 2 (the largest finite weight) saturates: c * (1 + 1 + 2 + 4) = 2 -> chances 1/4, 1/4, 1/2, 1
    np.testing.assert_allclose(counts / draws, [1, 0, 1, 0.25, 0.25, 0.5, 0, 1], atol=0.015)
    rows, chance = poisson_sample(np.array([0.0, 3.0, 1.0]), 5.0, rng)  # fewer positive rows than the budget
    assert rows.tolist() == [1, 2] and chance.tolist() == [1.0, 1.0]
    rows, _ = poisson_sample(np.array([np.inf, np.inf, 1.0]), 1.0, rng)  # forced rows beyond the budget
    assert rows.tolist() == [0, 1]


def test_importance_sampled_update_is_unbiased_smaller_in_variance_and_validated():
    """Rows drawn by the norm of their change (touched item rows always): unbiased like the uniform draw, at
    the same expected number of rows with a fraction of its error on a heavy-tailed change (a softmax pushes a
    few popular items hard), and it validates with int4 compression on top."""
    rng = np.random.default_rng(5)
    sent = {
        "item_emb.weight": np.zeros((200, 4), np.float32),
        "item_bias": np.zeros(200, np.float32),
        "blocks.w": np.zeros((64, 6), np.float32),
        "norm.weight": np.zeros(6, np.float32),
    }
    size = 1.0 / np.arange(1, 201) ** 1.5  # Zipf-like push-down on the item rows
    new = {
        "item_emb.weight": (size[:, None] * rng.standard_normal((200, 4))).astype(np.float32),
        "item_bias": (-size).astype(np.float32),
        "blocks.w": (rng.standard_normal((64, 6)) * rng.exponential(1, (64, 1))).astype(np.float32),
        "norm.weight": np.ones(6, np.float32),
    }
    touched = np.array([150, 7, 7])
    draws, errors = 3000, {"importance": [], "uniform": []}
    mean = {k: np.zeros(v.shape) for k, v in sent.items()}
    for _ in range(draws):
        one = importance_update(new, sent, touched, decoys=20, fraction=0.25, rng=rng)
        assert {7, 150} <= set(one["item_emb.weight@rows"].tolist()) and "norm.weight" in one
        got = densify(one, sent)
        np.testing.assert_array_equal(got["item_bias"][[7, 150]], new["item_bias"][[7, 150]])
        for k in mean:
            mean[k] += got[k] / draws
        rows = upload_rows(touched, decoys=20, num_rows=200, rng=rng)
        uniform = densify(sparse_update(new, sent, touched, rows, 0.25, rng), sent)
        for name, dense in (("importance", got), ("uniform", uniform)):
            errors[name].append([np.sum((dense[k] - new[k]) ** 2) for k in ("item_emb.weight", "blocks.w")])
    for k in mean:  # a row drawn with chance p averages to its change within a few sqrt((1 - p) / (p draws))
        np.testing.assert_allclose(mean[k], new[k], rtol=0.2, atol=0.02)
    mse = {name: np.mean(e, axis=0) for name, e in errors.items()}
    assert np.all(mse["importance"] < 0.5 * mse["uniform"])  # item table and sampled matrix both
    one = importance_update(new, sent, touched, decoys=20, fraction=0.25, rng=rng)
    dense = validate_update(compress(one, sent, rng, "int4"), sent, 1, norm_bound=100)
    assert dense.keys() == sent.keys()


def test_balanced_budgets_spend_the_bytes_where_the_relative_variance_falls_most():
    """The balanced row budget: the bytes of ``fraction`` of every matrix's rows, shared in proportion to
    ``S / sqrt(cost * E)``; a matrix that would get more than its changed rows gets those and the rest is shared
    again; a matrix that did not change gets nothing."""
    spread = np.ones(100)  # S / sqrt(E) = 10
    peaked = np.r_[np.full(25, 2.0), np.zeros(75)]  # S / sqrt(E) = 5
    cost = {"spread": 9.0, "peaked": 9.0, "still": 9.0}
    got = balanced_budgets({"spread": spread, "peaked": peaked, "still": np.zeros(100)}, 0.2, cost)
    assert got["still"] == 0
    assert sum(cost[a] * b for a, b in got.items()) == pytest.approx(0.2 * 9 * 300)
    assert got["spread"] / got["peaked"] == pytest.approx(2.0)
    got = balanced_budgets({"spread": spread, "peaked": peaked}, 0.5, {"spread": 9.0, "peaked": 1.0})
    assert got["peaked"] == 25  # every changed row; the rest of the bytes go to the other matrix
    assert 9 * got["spread"] + got["peaked"] == pytest.approx(0.5 * (9 * 100 + 100))
    assert row_bytes(64, "int4") == 40 and row_bytes(64, "int8") == 72 and row_bytes(64, "none") == 260


def test_balanced_row_budget_is_unbiased_and_lowers_the_summed_relative_error():
    """Two sampled matrices of the same size, one changed in a few rows and one everywhere: at the same
    expected bytes the balanced budget draws more of the spread one and less of the peaked one, stays unbiased,
    and its summed relative squared error is well below the per-matrix budget's."""
    rng = np.random.default_rng(3)
    sent = {
        "item_emb.weight": np.zeros((30, 4), np.float32),
        "item_bias": np.zeros(30, np.float32),
        "a.w": np.zeros((64, 8), np.float32),
        "b.w": np.zeros((64, 8), np.float32),
    }
    peaked = np.zeros((64, 8))
    peaked[:3] = rng.standard_normal((3, 8))
    new = {
        "item_emb.weight": rng.standard_normal((30, 4)).astype(np.float32),
        "item_bias": rng.standard_normal(30).astype(np.float32),
        "a.w": peaked.astype(np.float32),
        "b.w": (0.1 * rng.standard_normal((64, 8))).astype(np.float32),
    }
    draws, rel, mean = 2000, {}, {k: np.zeros((64, 8)) for k in ("a.w", "b.w")}
    for budget in ("per-matrix", "int4"):
        errors = []
        for _ in range(draws):
            compress = None if budget == "per-matrix" else budget
            got = densify(importance_update(new, sent, [1], 0, 0.25, rng, compress), sent)
            errors.append([np.sum((got[k] - new[k]) ** 2) / np.sum(new[k] ** 2) for k in mean])
            if compress:
                for k in mean:
                    mean[k] += got[k] / draws
        rel[budget] = np.sum(np.mean(errors, axis=0))
    for k in mean:
        np.testing.assert_allclose(mean[k], new[k], rtol=0.2, atol=0.02)
    assert rel["int4"] < 0.6 * rel["per-matrix"]
    with pytest.raises(ValueError, match="sparse_sampling 'importance' or 'states', got 'uniform'"):
        FederatedConfig(upload="sparse", sparse_sampling="uniform", row_budget="balanced")


def test_error_feedback_sends_the_largest_rows_and_carries_the_rest():
    """Error feedback's encoding: the touched item rows, then the decoys and each sampled matrix's share with the
    largest change, unscaled; what is sent plus what is carried is the whole change, and a change that was left
    out is sent once it joins the next round's change."""
    sent = {
        "item_emb.weight": np.zeros((50, 2), np.float32),
        "item_bias": np.zeros(50, np.float32),
        "blocks.w": np.zeros((20, 3), np.float32),
        "norm.weight": np.zeros(3, np.float32),
    }
    push = np.linspace(0.01, 0.5, 50).astype(np.float32)  # row 49 changed most, row 0 least
    new = {
        "item_emb.weight": np.stack([push, push], axis=1),
        "item_bias": -push,
        "blocks.w": np.tile(np.arange(20, dtype=np.float32)[:, None], (1, 3)),
        "norm.weight": np.ones(3, np.float32),
    }
    one = largest_rows_update(new, sent, touched=np.array([3, 3, 0]), decoys=4, fraction=0.25)
    assert one["item_emb.weight@rows"].tolist() == [0, 3, 46, 47, 48, 49]  # touched + the 4 largest
    assert one["blocks.w@rows"].tolist() == [15, 16, 17, 18, 19]  # 25% of 20 rows, the largest
    np.testing.assert_array_equal(
        one["item_bias@values"], new["item_bias"][[0, 3, 46, 47, 48, 49]]
    )  # unscaled
    assert "norm.weight" in one  # small arrays go whole
    carried = unsent_change(new, sent, one)
    assert set(carried) == {"item_emb.weight", "item_bias", "blocks.w"}
    got = densify(one, sent)
    for k, v in carried.items():
        np.testing.assert_allclose(got[k] - sent[k] + v, new[k] - sent[k], atol=1e-7)  # nothing lost
    assert np.all(carried["item_bias"][[0, 3, 46, 47, 48, 49]] == 0)
    # next round: a small fresh change on row 10 only; the carried rows 45, 44, ... now lead the choice
    later = {k: v + carried.get(k, 0) for k, v in sent.items()}
    later["item_bias"][10] -= 0.001
    again = largest_rows_update(later, sent, touched=np.array([10]), decoys=3, fraction=0.25)
    assert again["item_bias@rows"].tolist() == [10, 43, 44, 45]


def test_error_feedback_device_stores_what_it_did_not_send_and_sends_it_later(cfg):
    """A device with error feedback keeps its unsent change in its encrypted store (never uploaded as such) and
    adds it to its next round's change; with the defaults' sparse sizes the update still validates."""
    shared = initial_shared(cfg)
    run = replace(
        cfg,
        upload="sparse",
        sparse_sampling="error-feedback",
        decoy_rows=5,
        row_fraction=0.25,
        compress="int4",
    )
    device = HostedUsers(run, 0, 9, Path(cfg.out_dir) / "devices-ef")
    first = device.train(shared, server_round=1).update
    assert validate_update(first, shared, 1, norm_bound=run.norm_bound).keys() == shared.keys()
    user = int(device.users[0])
    stored = device.stored(user)  # one read: personal weights and the carried change
    carried = stored.carried(shared)
    assert "item_emb.weight" in carried and np.abs(carried["item_emb.weight"]).max() > 0
    assert stored.personal.keys() == device.initial_personal.keys()  # weights unchanged by it
    plain = HostedUsers(replace(run, sparse_sampling="importance"), 0, 9, Path(cfg.out_dir) / "devices-imp")
    plain.train(shared, server_round=1)
    assert plain.stored(user).residual == {}  # only error feedback carries anything
    second = validate_update(
        device.train(shared, server_round=2).update, shared, 1, norm_bound=run.norm_bound
    )
    alone = HostedUsers(run, 0, 9, Path(cfg.out_dir) / "devices-ef-fresh")  # the same round without the carry
    fresh = validate_update(alone.train(shared, server_round=2).update, shared, 1, norm_bound=run.norm_bound)
    assert not np.allclose(second["item_emb.weight"], fresh["item_emb.weight"])


def test_device_round_keeps_personal_weights_on_the_device(cfg):
    cfg = replace(cfg, split="card")
    shared = initial_shared(cfg)
    device = HostedUsers(cfg, partition_id=0, num_partitions=9, store_dir=Path(cfg.out_dir) / "devices")
    result = device.train(shared, server_round=1)
    personal_names = set(split_state(device.model, cfg.split)[1])
    assert set(result.update) == set(shared) and not set(result.update) & personal_names
    assert any(n.startswith("time_encoder.") for n in personal_names)
    store = device.store(int(device.users[0]))
    assert store.exists()
    raw = store.path.read_bytes()
    saved = store.load().weights
    name = next(iter(saved))
    assert saved[name].tobytes() not in raw  # encrypted at rest
    assert any(not np.array_equal(saved[k], device.initial_personal[k]) for k in saved)  # trained
    assert device.personal_weights(int(device.users[0])).keys() == saved.keys()


def test_local_sgd_barely_moves_unseen_items_where_a_fresh_adamw_moves_every_row(cfg):
    """A fresh AdamW's first step moves every parameter with a gradient by about lr (the full softmax gives
    every item one); plain SGD moves each by lr x its gradient, so items the user never saw barely move."""
    shared = initial_shared(cfg)
    moved = {}
    for optimizer in ("adamw", "sgd"):
        run = replace(cfg, local_optimizer=optimizer, local_epochs=1, local_lr=0.1)
        device = HostedUsers(run, partition_id=0, num_partitions=9, store_dir=Path(cfg.out_dir) / optimizer)
        result = device.train(shared, server_round=1)
        seen = np.unique(
            np.concatenate(
                [device.log.item[device.log.user_ptr[u] : device.train_end[u]] for u in device.users]
            )
        )
        unseen = np.setdiff1d(np.arange(device.log.num_items), seen) + 1  # table rows (0 = padding)
        moved[optimizer] = np.median(np.abs(result.update["item_bias"] - shared["item_bias"])[unseen])
    assert moved["adamw"] > 0.5 * 0.1 and moved["sgd"] < 0.1 * moved["adamw"]  # here 0.1 vs 0.0025


def test_sparse_device_trains_only_the_rows_it_uploads(cfg):
    from dataclasses import replace

    shared = initial_shared(cfg)
    run = replace(cfg, upload="sparse", sparse_sampling="uniform", decoy_rows=5)
    device = HostedUsers(run, 0, 9, Path(cfg.out_dir) / "devices")
    result = device.train(shared, server_round=1)
    rows = result.update["item_emb.weight@rows"]
    user = int(device.users[0])
    end = device.train_end[user]  # the user's training events only
    own = device.log.item[device.log.user_ptr[user] : end] + 1
    assert set(np.unique(own).tolist()) < set(rows.tolist())  # touched rows + 5 decoys (trained negatives)
    trained = split_state(device.model, cfg.split)[0]["item_emb.weight"]
    others = np.setdiff1d(np.arange(len(trained)), rows)
    np.testing.assert_allclose(
        trained[others], shared["item_emb.weight"][others], rtol=1e-3, atol=1e-6
    )  # decay only
    moved = np.abs(result.update["item_emb.weight@values"] - shared["item_emb.weight"][rows]).max(axis=1)
    assert (moved > 1e-3).all()  # every uploaded row, decoys included, was trained


def test_sampled_sparse_device_update_is_smaller_and_validates(cfg):
    shared = initial_shared(cfg)
    sizes = {}
    for fraction, kind, sampling in (
        (1.0, "int8", "uniform"),
        (0.25, "int8", "uniform"),
        (0.25, "int4", "uniform"),
        (0.25, "int4", "importance"),
    ):
        run = replace(
            cfg,
            upload="sparse",
            decoy_rows=5,
            compress=kind,
            row_fraction=fraction,
            sparse_sampling=sampling,
        )
        device = HostedUsers(run, 0, 9, Path(cfg.out_dir) / f"devices-{fraction}-{kind}-{sampling}")
        update = device.train(shared, server_round=1).update
        sizes[fraction, kind, sampling] = sum(v.nbytes for v in update.values())
        dense = validate_update(update, shared, 1, norm_bound=run.norm_bound)
        assert dense.keys() == shared.keys()
        rows = update["item_emb.weight@rows"]
        for user in device.users:  # every hosted user's training items are among the rows sent
            own = device.log.item[device.log.user_ptr[user] : device.train_end[user]] + 1
            assert set(own.tolist()) <= set(rows.tolist())
    assert sizes[0.25, "int8", "uniform"] < 0.75 * sizes[1.0, "int8", "uniform"]
    assert sizes[0.25, "int4", "uniform"] < 0.75 * sizes[0.25, "int8", "uniform"]
    assert sizes[0.25, "int4", "importance"] < 1.25 * sizes[0.25, "int4", "uniform"]  # about the same bytes


def test_local_adaptation_is_gated_by_the_users_held_out_recent_events(cfg):
    """The device adapts only the split's adapted parts (time encoder, interest heads) from the population
    values and serves the adaptation only if it predicts its last ``gate_events`` training events better by
    more than ``gate_z`` standard errors; nothing is saved, and evaluation reports the paired population
    metrics."""
    from shared_model.training import next_item_losses

    run = replace(cfg, adapt_epochs=3, gate_events=4, gate_z=0.0)
    shared = initial_shared(run)
    device = HostedUsers(run, 0, 3, Path(run.out_dir) / "devices")
    device.train(shared, server_round=1)
    stored = {u: device.store(int(u)).path.read_bytes() for u in device.users}
    adapted_names = {
        n for n, _ in device.model.named_parameters() if n.split(".")[0] in ("time_encoder", "interests")
    }
    for user in np.intersect1d(device.users, device.split.eval_users):
        result = device.adapt(int(user), shared, server_round=2)
        served = dict(device.model.named_parameters())
        for name, value in shared.items():  # everything else stays at the population values
            if name not in adapted_names or not result.kept:
                np.testing.assert_array_equal(served[name].detach().numpy(), value)
        assert set(result.weights) == (adapted_names if result.kept else set())
        end = int(device.train_end[user])
        held_out = np.arange(end - run.gate_events, end)
        losses = next_item_losses(device.model, device.log, int(device.log.user_ptr[user]), held_out)
        assert losses.mean() == pytest.approx(min(result.population_loss, result.adapted_loss), rel=1e-5)
        assert result.kept == (result.adapted_loss < result.population_loss)  # gate_z 0: any improvement
        strict = HostedUsers(replace(run, gate_z=1e6), 0, 3, Path(run.out_dir) / "devices")
        assert not strict.adapt(int(user), shared, server_round=2).kept  # no gain is a million errors wide
    assert {u: device.store(int(u)).path.read_bytes() for u in device.users} == stored  # nothing saved
    metrics = device.evaluate(shared, "val", server_round=2).metrics
    assert device.evaluate(shared, "val", server_round=2).metrics == metrics  # deterministic per round
    assert {"val/ndcg@10", "val-population/ndcg@10", "gate/kept"} <= set(metrics)
    # an adaptation that wrecks the heads (a huge learning rate) never reaches the user
    wild = HostedUsers(replace(run, adapt_lr=50.0), 0, 3, Path(run.out_dir) / "devices")
    user = int(np.intersect1d(wild.users, wild.split.eval_users)[0])
    assert not wild.adapt(user, shared, server_round=2).kept
    wild_metrics = wild.evaluate(shared, "val", server_round=2).metrics
    assert wild_metrics["gate/kept"] == 0
    assert wild_metrics["val/ndcg@10"] == wild_metrics["val-population/ndcg@10"]


@pytest.mark.parametrize("row_clip", [0.5, 0.002])
def test_virtual_users_equal_one_user_per_node(cfg, row_clip):
    """A node hosting 3 users replies exactly the example-weighted mean of the 3 single-user updates, each
    clipped as the server clips one device's update (a tight row clip binds on every user)."""
    cfg = replace(cfg, row_clip=row_clip)
    shared = initial_shared(cfg)
    group = HostedUsers(cfg, 0, 3, Path(cfg.out_dir) / "grouped")
    singles = []
    for user in group.users:
        d = HostedUsers(cfg, 0, 3, Path(cfg.out_dir) / "single")
        d.users = np.array([user])
        singles.append(d.train(shared, 1))
    grouped = group.train(shared, 1)
    for single in singles:
        moved = np.sqrt(
            sum(
                np.sum((single.update[k].astype(np.float64) - shared[k]).reshape(len(shared[k]), -1) ** 2, 1)
                for k in ITEM_TABLES
            )
        )
        assert moved.max() <= row_clip * (1 + 1e-4)
    assert row_clip > 0.1 or moved.max() > row_clip * 0.99  # the tight clip did bind
    total = sum(s.num_examples for s in singles)
    assert grouped.num_examples == total
    for key in shared:
        mean = sum(s.num_examples * s.update[key].astype(np.float64) for s in singles) / total
        np.testing.assert_allclose(grouped.update[key], mean, rtol=1e-5, atol=1e-6)


def test_update_weight_counts_trained_targets(cfg):
    """A device's example weight is the next-item targets it trained this round (one window of at most
    max_len per local epoch), not all its events: a heavy user does not outweigh a light one by its history."""
    cfg = replace(cfg, local_epochs=2, max_len=8)
    shared = initial_shared(cfg)
    device = HostedUsers(cfg, 0, 3, Path(cfg.out_dir) / "weights")
    hosted = device.users.copy()
    device.train_end = device.train_end.copy()
    device.train_end[hosted[0]] = device.log.user_ptr[hosted[0]] + 5  # a short history
    events = device.train_end[hosted] - device.log.user_ptr[hosted]
    assert (events > cfg.max_len + 1).any() and (events < cfg.max_len).any()  # long and short histories
    for user, n in zip(hosted, events, strict=True):
        device.users = np.array([user])
        assert device.train(shared, 1).num_examples == 2 * min(int(n) - 1, cfg.max_len)


def test_client_app_called_directly(cfg, task_identity):
    shared = initial_shared(cfg)
    app = make_client_app()
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 2, "num-partitions": 9, "store-dir": str(Path(cfg.out_dir) / "devices")},
        state=RecordDict(),
        run_config={},
    )
    reply = app(request_message(cfg, shared, "train"), context)
    arrays = reply.content.array_records["arrays"]
    assert set(arrays.keys()) == set(shared)
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == 2 * 11 and np.isfinite(metrics["train-loss"])  # 2 epochs, 11 targets
    ev = app(request_message(cfg, shared, "evaluate", stage="val,test"), context).content.metric_records[
        "metrics"
    ]
    assert ev["num-examples"] == 1 and 0 <= ev["val/ndcg@10"] <= 1 and "test/expl_recall@10" in ev


def test_server_checkpoint_roundtrip(tmp_path):
    shared = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_server_checkpoint(tmp_path, shared, 4, [{"round": 4}], {"x": 1})
    got, rnd, history, config = load_server_checkpoint(tmp_path)
    assert rnd == 4 and history == [{"round": 4}] and config == {"x": 1}
    assert np.array_equal(got["a"], shared["a"])
    assert load_server_checkpoint(tmp_path / "none") is None


def test_a_rerun_continues_only_its_own_checkpoint(tmp_path):
    """More rounds continue a run; other training settings are refused (never a silent restart), and a
    setting missing from an older checkpoint counts as its default."""
    from server.checkpoint import resumable_checkpoint

    cfg = FederatedConfig(out_dir=str(tmp_path), num_rounds=10)
    assert resumable_checkpoint(cfg) is None
    saved = cfg.to_run_config()
    del saved["gate-z"]  # written before the setting existed
    save_server_checkpoint(tmp_path, {"a": np.zeros(2, np.float32)}, 7, [{"round": 7}], saved)
    assert resumable_checkpoint(replace(cfg, num_rounds=20, eval_every=5))[1] == 7
    with pytest.raises(ValueError, match=r"round 7.*local_lr: .* -> 0\.5"):
        resumable_checkpoint(replace(cfg, local_lr=0.5))


def test_flower_app_config_in_pyproject_matches_defaults():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client_sdk.flower_client:app"}
    assert FederatedConfig.from_run_config(app["config"]) == FederatedConfig()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"split": "bogus"}, "split must be one of population, card, heads-prior; got 'bogus'"),
        ({"privacy": "DP"}, "privacy must be one of plain, dp, secagg; got 'DP'"),
        ({"num-rounds": "5"}, "num_rounds must be int, got '5'"),
    ],
)
def test_flower_run_config_is_checked_like_the_cli(settings, message):
    """`flwr run --run-config` bypasses argparse: the config's own typed check names the setting and its
    allowed values."""
    with pytest.raises(ValueError, match=re.escape(message)):
        FederatedConfig.from_run_config(FederatedConfig().to_run_config() | settings)


@pytest.mark.parametrize("optimizer", ["fedavg", "fedadam"])
def test_strategy_rejects_bad_updates_and_needs_enough_replies(optimizer, task_identity):
    from server.strategies import make_strategy

    sent = {"item_bias": np.zeros(4, np.float32), "explanation.bias": np.zeros(2, np.float32)}
    good = {"item_bias": np.full(4, 0.5, np.float32), "explanation.bias": np.full(2, -0.5, np.float32)}
    strategy = make_strategy(
        FederatedConfig(row_clip=0, server_optimizer=optimizer, min_reply_fraction=0.5, norm_bound=5), 4, 4
    )
    strategy.begin_round(sent, 4)
    nan = {**good, "item_bias": np.full(4, np.nan, np.float32)}
    wrong = {**good, "item_bias": np.zeros(5, np.float32)}
    replies = [train_reply(good), train_reply(good, examples=15), train_reply(nan), train_reply(wrong)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.last_round | {"rejections": None} == {
        "sampled": 4,
        "valid": 2,
        "rejected": 2,
        "failed": 0,
        "rejections": None,
        "aggregated": True,
        "failed_users": 0,
    }
    result = {k: v.numpy() for k, v in arrays.items()}
    assert all(np.isfinite(v).all() for v in result.values())
    assert all(
        v.dtype == np.float32 for v in result.values()
    )  # FedAdam computes in float64; devices need f32
    if optimizer == "fedavg":
        np.testing.assert_allclose(result["item_bias"], 0.5)  # the mean of the two valid updates only
    else:
        assert (result["item_bias"] > 0).all() and (result["explanation.bias"] < 0).all()
    # only one valid reply out of 4 sampled (< 50%): the round completes without changing the arrays
    strategy.begin_round(sent, 4)
    assert strategy.aggregate_train(2, [train_reply(good), train_reply(nan)]) == (None, None)
    assert strategy.last_round["aggregated"] is False


@pytest.mark.parametrize("optimizer", ["fedavg", "fedadam"])
def test_seeded_cohort_keeps_the_flower_strategy_state(optimizer, task_identity):
    """Seeded cohorts re-address the Flower strategy's own messages: FedAdam still remembers the sent arrays."""
    from server.strategies import make_strategy

    class Grid:
        def get_node_ids(self):
            return [11, 22, 33, 44]

    strategy = make_strategy(FederatedConfig(server_optimizer=optimizer, fraction_train=0.5, seed=5), 4, 4)
    strategy.setup_sampling({11: 0, 22: 1, 33: 2, 44: 3}, seed=5)
    sent = {"item_bias": np.zeros(4, np.float32)}
    messages = strategy.configure_train(
        3, ArrayRecord({k: Array(v) for k, v in sent.items()}), ConfigRecord({}), Grid()
    )
    expected = strategy.sample_nodes(3, {11, 22, 33, 44})
    assert [m.metadata.dst_node_id for m in messages] == expected and len(expected) == 2
    assert strategy.sampled == 2 and strategy.sampled_partitions == sorted(
        {11: 0, 22: 1, 33: 2, 44: 3}[n] for n in expected
    )
    assert all(m.content.config_records["config"]["server-round"] == 3 for m in messages)
    if optimizer == "fedadam":
        np.testing.assert_array_equal(strategy.base.current_arrays["item_bias"], sent["item_bias"])


def test_fedadam_moments_survive_a_checkpoint(tmp_path, task_identity):
    """A resumed FedAdam server takes the same step as one that never stopped."""
    from server.checkpoint import load_server_state, save_server_checkpoint
    from server.strategies import make_strategy

    cfg = FederatedConfig(row_clip=0, server_optimizer="fedadam", server_tau=1e-8, norm_bound=5)
    sent = {"item_bias": np.zeros(4, np.float32)}
    steps = [
        {"item_bias": np.array([0.5, -0.2, 0.1, 0.0], np.float32)},
        {"item_bias": np.array([0.1, 0.3, -0.4, 0.2], np.float32)},
    ]

    def step(strategy, rnd, arrays, update):
        strategy.begin_round(arrays, 1)
        out, _ = strategy.aggregate_train(rnd, [train_reply({k: arrays[k] + update[k] for k in arrays})])
        return {k: v.numpy() for k, v in out.items()}

    running = make_strategy(cfg, 4, 4)
    after_1 = step(running, 1, sent, steps[0])
    save_server_checkpoint(tmp_path, after_1, 1, [], {}, running.server_state())
    assert set(load_server_state(tmp_path)) == {"m_t/item_bias", "v_t/item_bias"}
    resumed = make_strategy(cfg, 4, 4)
    resumed.restore_server_state(load_server_state(tmp_path))
    fresh = make_strategy(cfg, 4, 4)
    expected = step(running, 2, after_1, steps[1])["item_bias"]
    np.testing.assert_array_equal(step(resumed, 2, after_1, steps[1])["item_bias"], expected)
    assert not np.array_equal(step(fresh, 2, after_1, steps[1])["item_bias"], expected)  # moments matter


def test_devices_report_head_shares_and_train_toward_the_populations(cfg):
    """A plain round's metrics carry the users' head shares of their target items (the server's population
    estimate); the population's shares change the local step; DP devices report none."""
    shared = initial_shared(cfg)
    store = Path(cfg.out_dir) / "devices"
    plain = HostedUsers(cfg, partition_id=0, num_partitions=3, store_dir=store).train(shared, server_round=1)
    shares = [plain.metrics[f"head-share-{h}"] for h in range(4)]
    assert sum(shares) == pytest.approx(1, abs=1e-5) and min(shares) >= 0
    uniform = HostedUsers(cfg, 0, 3, store_dir=store).train(shared, 1, head_share=[0.25] * 4)
    assert all(
        np.array_equal(plain.update[k], uniform.update[k]) for k in plain.update
    )  # uniform: no steering
    steered = HostedUsers(cfg, 0, 3, store_dir=store).train(shared, 1, head_share=[0.97, 0.01, 0.01, 0.01])
    assert any(not np.array_equal(plain.update[k], steered.update[k]) for k in plain.update)
    dp = replace(cfg, privacy="dp", server_optimizer="fedavg", local_optimizer="sgd")
    private = HostedUsers(dp, 0, 3, store_dir=Path(cfg.out_dir) / "dp").train(shared, 1)
    assert not any(k.startswith("head-share") for k in private.metrics)


def test_states_upload_completes_to_the_dense_update_and_bad_states_are_refused(cfg):
    """``sparse_sampling="states"``: the touched item rows plus each user's output states; the server computes
    every other item row's change from the states, and the completed update equals the dense one (one local
    SGD step, same users, same round). Malformed states are refused."""
    run = replace(cfg, local_epochs=1)
    shared = initial_shared(run)
    dense = HostedUsers(run, 0, 2, Path(cfg.out_dir) / "dense").train(shared, server_round=1).update
    states_run = replace(run, upload="sparse", sparse_sampling="states")
    device = HostedUsers(states_run, 0, 2, Path(cfg.out_dir) / "states")
    result = device.train(shared, server_round=1)
    update = result.update
    assert len(update["softmax@counts"]) == len(device.users) > 1  # one block of states per hosted user
    assert len(update["item_emb.weight@rows"]) < len(shared["item_emb.weight"])
    with pytest.raises(UpdateRejected, match="no output states"):
        validate_update(update, shared, result.num_examples, run.norm_bound)
    lr, clip = states_run.local_lr, states_run.row_clip
    completed = validate_update(
        update, shared, result.num_examples, run.norm_bound, states_lr=lr, row_clip=clip
    )
    assert completed.keys() == dense.keys()
    for name in dense:
        np.testing.assert_allclose(completed[name], dense[name], rtol=0, atol=2e-7, err_msg=name)
    moved = np.abs(completed["item_bias"] - shared["item_bias"])
    assert (moved[1:] > 0).all()  # every item moved, not only the rows sent

    def refused(match: str, **changes: np.ndarray) -> None:
        with pytest.raises(UpdateRejected, match=match):
            validate_update(
                update | changes, shared, result.num_examples, run.norm_bound, states_lr=lr, row_clip=clip
            )

    states, counts = update["softmax@states"], update["softmax@counts"]
    refused("shape", **{"softmax@states": states[:, :, :-1]})
    refused("counts sum", **{"softmax@counts": counts + 1})
    refused("sum to 1", **{"softmax@shares": 2 * update["softmax@shares"]})
    refused("non-finite", **{"softmax@states": np.where(states == states.max(), np.nan, states)})
    refused("int32", **{"softmax@counts": counts.astype(np.int64)})
    with pytest.raises(UpdateRejected, match="as rows"):
        validate_update(
            dense | {k: update[k] for k in ("softmax@states", "softmax@counts", "softmax@shares")},
            shared,
            result.num_examples,
            run.norm_bound,
            states_lr=lr,
        )
    with pytest.raises(ValueError, match="local_epochs=1"):
        replace(states_run, local_epochs=2)


def test_balanced_row_budget_on_a_device_sends_the_same_bytes_and_validates(cfg):
    """A device with ``row_budget="balanced"`` (states, int4, 40% of other rows): about the bytes of the
    per-matrix budget, a different share of each matrix, and an update the server completes and accepts."""
    run = replace(
        cfg, local_epochs=1, upload="sparse", sparse_sampling="states", compress="int4", row_fraction=0.4
    )
    shared = initial_shared(run)
    sizes, shares = {}, {}
    for budget in ("per-matrix", "balanced"):
        one = replace(run, row_budget=budget)
        result = HostedUsers(one, 0, 2, Path(cfg.out_dir) / budget).train(shared, server_round=1)
        sizes[budget] = sum(v.nbytes for v in result.update.values())
        shares[budget] = {k: len(v) for k, v in result.update.items() if k.endswith("@rows")}
        dense = validate_update(
            result.update,
            shared,
            result.num_examples,
            run.norm_bound,
            states_lr=run.local_lr,
            row_clip=run.row_clip,
        )
        assert dense.keys() == shared.keys()
    assert sizes["balanced"] == pytest.approx(sizes["per-matrix"], rel=0.15)
    assert shares["balanced"] != shares["per-matrix"]
