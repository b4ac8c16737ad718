"""SecAgg+ rounds (``privacy="secagg"``, server.secagg): the server's aggregate equals the plaintext
example-weighted mean of the survivors' real device updates within the quantization error, a device dropping
out after sharing its keys does not stop the round, what leaves a device is masked, and the same runs on the
deployment engine (a real SuperLink and three SuperNodes on 127.0.0.1)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client_sdk.device import HostedUsers
from client_sdk.flower_client import make_client_app
from server.app import initial_shared
from server.checkpoint import load_server_checkpoint
from server.records import numpy_to_record
from server.secagg import MOD_RANGE, _check_aggregate, quantization_range
from server.validation import UpdateRejected
from shared_model.config import FederatedConfig
from shared_model.data import load_dataset
from shared_model.data.split import partition_users
from shared_model.protocol import secagg_vector
from shared_model.protocol.clipping import clip_update
from simulations.simulate import run_simulation

from .helpers import request_message, small_federation
from .local_deployment import (
    DEADLINE_S,
    LocalDeployment,
    copy_app,
    free_ports,
    run_to_completion,
    start_federation,
)
from .local_deployment import NODES as DEPLOYED

NODES, USERS_PER_NODE = 4, 2
FLOAT_SLACK = 2e-5


def _cfg(tmp_path: Path, users: int, **overrides) -> FederatedConfig:
    secagg = dict(num_rounds=1, local_epochs=2, eval_every=1, privacy="secagg", server_optimizer="fedavg")
    return small_federation(tmp_path, users, **(secagg | overrides))


@pytest.mark.parametrize(
    "overrides,reason",
    [
        ({"upload": "sparse"}, "upload='sparse'"),
        ({"compress": "int8"}, "compress='int8'"),
        ({"aggregation": "trimmed-mean"}, "aggregation='trimmed-mean'"),
        ({"secagg_threshold": 3}, "majority threshold"),
        ({"secagg_shares": 4, "secagg_threshold": 2}, "majority threshold"),
        ({"secagg_clip": 0.0}, "secagg_clip"),
    ],
)
def test_config_refuses_what_secagg_cannot_do(overrides, reason):
    with pytest.raises(ValueError, match=reason):
        FederatedConfig(privacy="secagg", server_optimizer="fedavg", **overrides)
    FederatedConfig(
        privacy="plain",
        server_optimizer="fedavg",
        **{k: v for k, v in overrides.items() if k != "secagg_clip"},
    )


@pytest.mark.parametrize("cohort", [3, 4, 5, 60, 1000, 4095])
def test_quantization_range_is_the_largest_that_never_wraps(cohort):
    t = quantization_range(cohort)
    assert t & (t - 1) == 0 and cohort * t < MOD_RANGE
    assert t == 1 << 30 or cohort * 2 * t >= MOD_RANGE


def test_encode_clips_changes_and_decode_inverts():
    rng = np.random.default_rng(0)
    sent = {
        "b": rng.standard_normal(5).astype(np.float32),
        "a": rng.standard_normal((3, 2)).astype(np.float32),
    }
    update = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in sent.items()}
    vector = secagg_vector.encode(update, sent, loss=3.5, clip=0.5)
    assert [v.shape for v in vector] == [(3, 2), (5,), (1,)]  # sorted keys, then the loss
    deltas, loss = secagg_vector.decode(vector, sent, clip=0.5)
    for k in sent:
        np.testing.assert_allclose(deltas[k], np.clip(update[k] - sent[k].astype(np.float64), -0.5, 0.5))
    assert loss == pytest.approx(3.5) and secagg_vector.weight(5000) == secagg_vector.MAX_WEIGHT
    with pytest.raises(ValueError, match="non-finite"):
        secagg_vector.encode({**update, "a": np.full((3, 2), np.nan, np.float32)}, sent, 1.0, 0.5)
    with pytest.raises(ValueError, match="shapes"):
        secagg_vector.decode(vector[1:], sent, 0.5)


def test_unmasked_aggregate_is_validated():
    cfg = FederatedConfig(privacy="secagg", secagg_clip=1.0, norm_bound=2.0)
    sent = {"a": np.zeros((4, 4), np.float32), "b": np.zeros(3, np.float32)}
    good = [np.full((4, 4), 0.1), np.full(3, -0.1), np.array([0.004])]
    new, loss = _check_aggregate(good, sent, cfg, 3)
    np.testing.assert_allclose(new["a"], 0.1)
    assert new["a"].dtype == np.float32 and loss == pytest.approx(4.0)
    for bad, reason in [
        ([good[0], np.array([0.1, np.inf, 0.0]), good[2]], "non-finite"),
        ([np.full((4, 4), 5.0), good[1], good[2]], "clip range"),  # what an overflowing sum looks like
        ([np.full((4, 4), 0.9), good[1], good[2]], "norm"),  # within the clip range, beyond the norm bound
    ]:
        with pytest.raises(UpdateRejected, match=reason):
            _check_aggregate(bad, sent, cfg, 3)


def test_device_never_sends_a_plaintext_update_in_a_secagg_run(tmp_path, task_identity):
    cfg = _cfg(tmp_path, users=3)
    node = {"partition-id": 0, "num-partitions": 3, "store-dir": str(tmp_path / "store")}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="only masked"):
        make_client_app()(request_message(cfg, initial_shared(cfg), "train"), context)
    assert not (tmp_path / "store").exists()  # refused before training


def dropping_client_app(drops: dict[int, set[int]], spy_dir: Path) -> ClientApp:
    """The real ClientApp, except that in round r the partitions ``drops[r]`` go offline in the collect stage
    (after they shared their keys); in round 1 every other node saves the reply it sends in that stage under
    ``spy_dir``."""

    def drop_and_spy(msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        pid, rnd = int(context.node_config["partition-id"]), int(msg.metadata.group_id)
        collect = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE] == Stage.COLLECT_MASKED_VECTORS
        if collect and pid in drops[rnd]:
            raise RuntimeError("device went offline after sharing its keys")
        reply = call_next(msg, context)
        if collect and rnd == 1:
            masked = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
            np.savez(
                spy_dir / f"collect-{pid}.npz",
                *[bytes_to_ndarray(b) for b in masked],
                arrays=len(reply.content.array_records["fitres.parameters"]),
                weight=reply.content.metric_records["fitres.num_examples"]["num_examples"],
            )
        return reply

    return make_client_app([drop_and_spy])


@pytest.mark.slow
def test_default_fedadam_steps_on_the_unmasked_mean(tmp_path):
    """The default server optimizer behind SecAgg+: one round, then FedAdam's first step from zero moments,
    which moves a coordinate by at most eta's bias-corrected value times (1 - beta_1) / sqrt(1 - beta_2), and
    by exactly that wherever the unmasked mean change is large against tau (most coordinates)."""
    cfg = _cfg(tmp_path, users=NODES, server_optimizer="fedadam", num_rounds=1)
    history = run_simulation(cfg, num_cpus=2)["history"]
    assert history[0]["valid"] == NODES and history[0]["aggregated"]
    sent = initial_shared(cfg)
    shared, *_ = load_server_checkpoint(cfg.out_dir)
    step = cfg.server_lr * math.sqrt(1 - 0.99**2) / (1 - 0.9**2) * (1 - 0.9) / math.sqrt(1 - 0.99)
    full = 0
    for key, value in sent.items():
        change = np.abs(shared[key].astype(np.float64) - value)
        assert change.max() < step * (1 + 1e-3), key
        full += int((np.abs(change - step) < 1e-3 * step).sum())
    assert full > 0.5 * sum(v.size for v in sent.values())


@pytest.mark.slow
def test_simulation_survives_a_dropout_with_the_survivors_weighted_mean(tmp_path):
    """Round 1: one of 4 devices drops out (shares 3 - threshold 2 = 1 may): the survivors' weighted mean.
    Round 2: two drop out, more than the threshold allows: the round completes without aggregating."""
    cfg = _cfg(tmp_path, users=NODES * USERS_PER_NODE - 1, users_per_node=USERS_PER_NODE, num_rounds=2)
    hosted = partition_users(load_dataset(cfg.dataset).num_users, NODES, cfg.seed)
    # drop a node hosting two users, so that the survivors differ in weight
    drop = next(p for p, users in enumerate(hosted) if len(users) == USERS_PER_NODE)
    spy = tmp_path / "spy"
    spy.mkdir()
    app = dropping_client_app({1: {drop}, 2: {drop, (drop + 1) % NODES}}, spy)
    history = run_simulation(cfg, num_cpus=2, client_app=app)["history"]

    row, halted = history
    counts = ("sampled", "valid", "rejected", "failed", "dropped")
    assert [row[k] for k in counts] == [NODES, 3, 0, 1, 1] and row["aggregated"], row
    assert [halted[k] for k in counts] == [NODES, 0, 0, NODES, 2] and not halted["aggregated"], halted
    assert "halted" in halted["rejections"][0] and "train_loss" not in halted
    assert 0 <= halted["test"]["ndcg@10"] <= 1 and math.isfinite(row["train_loss"])
    sent = initial_shared(cfg)
    dense = numpy_to_record(sent).count_bytes()  # what a plaintext dense round uploads (tests/test_federated)
    assert set(row["upload_bytes_by_stage"]) == {"setup", "share_keys", "collect_masked_vectors", "unmask"}
    assert dense < row["upload_bytes_per_device"] <= 2 * dense

    # The survivors' updates, recomputed outside Flower from the same deterministic local training.
    results = [HostedUsers(cfg, p, NODES, tmp_path / "ref").train(sent, 1) for p in range(NODES) if p != drop]
    weights = np.array([r.num_examples for r in results], dtype=np.float64)
    updates = [clip_update(r.update, sent, cfg.clip_norm, cfg.row_clip).arrays for r in results]  # on device
    assert len(set(weights)) > 1
    shared, rnd, _, _ = load_server_checkpoint(cfg.out_dir)
    assert rnd == 2  # round 2 kept round 1's aggregate
    # each survivor's stochastic rounding errs by < 1 step of 2 * clip / T in its weighted value; float32
    # local training repeated in this process agrees with the Ray workers' only up to BLAS summation order
    # (observed up to 4e-6 after two AdamW epochs), hence FLOAT_SLACK
    steps = sum(round(w / secagg_vector.MAX_WEIGHT * quantization_range(NODES)) for w in weights)
    quantum = len(results) * 2 * cfg.secagg_clip / steps
    for key, value in sent.items():
        changes = np.stack(
            [np.clip(u[key] - value.astype(np.float64), -cfg.secagg_clip, cfg.secagg_clip) for u in updates]
        )
        weighted = value + np.tensordot(weights / weights.sum(), changes, axes=1)
        np.testing.assert_allclose(shared[key], weighted, rtol=0, atol=quantum + FLOAT_SLACK, err_msg=key)
    unweighted = sent["item_emb.weight"] + np.mean(
        [u["item_emb.weight"] - sent["item_emb.weight"] for u in updates], axis=0
    )
    assert np.abs(shared["item_emb.weight"] - unweighted).max() > 10 * (quantum + FLOAT_SLACK)
    loss = np.average([r.metrics["train-loss"] for r in results], weights=weights)
    assert row["train_loss"] == pytest.approx(
        loss, abs=quantum * secagg_vector.LOSS_BOUND / cfg.secagg_clip + FLOAT_SLACK
    )

    # What left each surviving device in the collect stage: no arrays, no weight, a uniformly masked vector.
    for p in set(range(NODES)) - {drop}:
        with np.load(spy / f"collect-{p}.npz") as saved:
            assert int(saved["arrays"]) == 0 and int(saved["weight"]) == 0
            masked = np.concatenate([saved[k].ravel() for k in saved.files if k.startswith("arr_")])
        assert masked.dtype == np.uint32 and masked.size == 1 + sum(v.size for v in sent.values()) + 1
        # unmasked, the values would all lie below 2**30 (the quantization range of a cohort of 4)
        assert abs(masked.mean() / 2**32 - 0.5) < 0.03 and masked.max() > 2**31


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the deployment helpers find processes through /proc")
def test_deployment_engine_runs_a_secagg_round(tmp_path):
    # a round is five exchanges per node (four SecAgg+ stages, evaluation), each a poll and a ClientApp process
    deadline = time.monotonic() + 1.5 * DEADLINE_S
    cfg = _cfg(tmp_path, users=DEPLOYED, round_timeout=120.0, out_dir=str(tmp_path / "server-out"))
    defaults = FederatedConfig().to_run_config()
    overrides = {k: v for k, v in cfg.to_run_config().items() if v != defaults[k]}
    app_dir = copy_app(tmp_path / "app")
    link_port, *node_ports = free_ports(1 + DEPLOYED)
    dep = LocalDeployment(tmp_path / "deployment")
    dep.write_cli_config(link_port)
    try:
        start_federation(dep, link_port, node_ports, deadline)
        run_to_completion(dep, app_dir, overrides, deadline)
        row = json.loads((Path(cfg.out_dir) / "metrics.json").read_text())[0]
        assert (row["sampled"], row["valid"], row["failed"], row["dropped"]) == (DEPLOYED, DEPLOYED, 0, 0), (
            row
        )
        assert row["aggregated"] and row["upload_bytes_by_stage"]["collect_masked_vectors"] > 0, row
        assert 0 <= row["test"]["ndcg@10"] <= 1 and math.isfinite(row["train_loss"]), row
        shared, rnd, _, _ = load_server_checkpoint(cfg.out_dir)
        sent = initial_shared(cfg)
        assert rnd == 1 and any(not np.array_equal(shared[k], sent[k]) for k in sent)
    finally:
        leftover = dep.stop_all()
    assert not leftover, leftover
