"""End to end through Flower's simulation engine: a device that crashes mid-round and a device that sends a
poisoned update. The rounds complete, the bad update is rejected and never averaged."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict

from client_sdk.flower_client import make_client_app
from server.checkpoint import load_server_checkpoint
from server.strategies import make_strategy
from shared_model.config import FederatedConfig
from shared_model.data import load_dataset
from shared_model.data.split import partition_users
from simulations.cli import main as cli_main
from simulations.simulate import run_simulation

from .helpers import small_federation

CRASHING, POISONING = 0, 1


def faults(msg: Message, context: Context, call_next) -> Message:
    """A mod: in training rounds partition 0 crashes and partition 1 returns NaN arrays."""
    pid = int(context.node_config["partition-id"])
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    if pid == CRASHING:
        raise RuntimeError("device crashed mid-round")
    reply = call_next(msg, context)
    if pid == POISONING:
        arrays = reply.content.array_records["arrays"]
        poisoned = {k: np.full_like(v.numpy(), np.nan) for k, v in arrays.items()}
        metrics = reply.content.metric_records["metrics"]
        reply.content = RecordDict(
            {"arrays": ArrayRecord({k: Array(v) for k, v in poisoned.items()}), "metrics": metrics}
        )
    return reply


@pytest.mark.slow
def test_simulation_survives_crash_and_poison(tmp_path):
    cfg = small_federation(tmp_path, users=6, min_reply_fraction=0.5, eval_every=1)
    result = run_simulation(cfg, num_cpus=2, client_app=make_client_app([faults]))
    history = result["history"]
    assert [h["round"] for h in history] == [1, 2]
    for row in history:
        assert row["sampled"] == 6 and row["valid"] == 4 and row["failed"] == 1 and row["rejected"] == 1
        assert row["aggregated"] and any("non-finite" in r for r in row["rejections"])
        assert 0 <= row["val"]["ndcg@10"] <= 1
    shared, rnd, _, _ = load_server_checkpoint(cfg.out_dir)
    assert rnd == 2 and all(np.isfinite(v).all() for v in shared.values())
    assert json.loads((Path(cfg.out_dir) / "metrics.json").read_text())[-1]["round"] == 2
    assert "test" in history[-1]
    assert len(os.listdir(Path(cfg.out_dir) / "devices")) == 5  # the crashing device never saved


@pytest.mark.slow
def test_unreadable_stores_sit_out_with_one_line_and_are_kept(tmp_path, capfd, caplog):
    """Corrupt stores: their users sit the rounds out (the store is left as it is, nothing lost), a device
    none of whose users can train replies with a one-line error (no traceback), and every evaluation says how
    many users it covered. When no round aggregates, ``tmepsr simulate`` exits 1 and publishes nothing."""
    cfg = small_federation(tmp_path, users=6, users_per_node=3, min_reply_fraction=0.5, eval_every=1)
    log = load_dataset(cfg.dataset)
    first, second = partition_users(log.num_users, 2, cfg.seed)
    corrupt = [first[0], *second]  # one user of the first device, every user of the second
    stores = Path(cfg.out_dir) / "devices"
    stores.mkdir(parents=True)
    for user in corrupt:
        (stores / f"user-{log.user_ids[user]}.store").write_bytes(b"TMEPSR-STORE\0 not a store")
    history = run_simulation(cfg, num_cpus=2)["history"]
    for row in history:
        assert row["sampled"] == 2 and row["valid"] == 1 and row["failed"] == 1 and row["aggregated"]
        assert row["failed_users"] == 1 and row["evaluated_users"] == 2
        assert row["eval_failed"] == 1 and row["eval_failed_users"] == 1
    for user in corrupt:
        assert (stores / f"user-{log.user_ids[user]}.store").read_bytes() == b"TMEPSR-STORE\0 not a store"
    err = capfd.readouterr()
    assert "Traceback" not in err.out + err.err + caplog.text
    assert "failed: DeviceError: no user of this device can train: user" in caplog.text
    assert "over 2 users" in err.out and "1 users with unreadable stores sat training out" in err.out

    for user in first[1:]:  # now every store is unreadable: no round aggregates
        (stores / f"user-{log.user_ids[user]}.store").write_bytes(b"garbage")
    out = tmp_path / "all-corrupt"
    shutil.copytree(stores, out / "devices")
    argv = [
        "simulate",
        "--dataset",
        cfg.dataset,
        "--max-len",
        "16",
        "--d-model",
        "16",
        "--num-rounds",
        "1",
        "--fraction-train",
        "1",
        "--users-per-node",
        "3",
        "--out-dir",
        str(out),
        "--cpus",
        "2",
    ]
    assert cli_main(argv) == 1
    err = capfd.readouterr()
    assert "no round aggregated an update" in err.err and "Traceback" not in err.out + err.err
    assert not (out / "bundle").exists()


def _cohort(seed: int, rnd: int, node_ids: list[int], users: int, fraction: float) -> list[int]:
    cfg = FederatedConfig(dataset="movielens-latest-small", fraction_train=fraction, seed=seed)
    strategy = make_strategy(cfg, users, users)
    strategy.setup_sampling(dict(zip(node_ids, range(users), strict=True)), seed)
    nodes = strategy.sample_nodes(rnd, set(node_ids))
    assert [node_ids.index(n) for n in nodes] == strategy.sampled_partitions
    return strategy.sampled_partitions


def test_seeded_cohorts_depend_on_partitions_not_node_ids():
    ids = list(range(1000, 1100))
    other_ids = [7 * i + 3 for i in range(100)]  # another run: other random node ids, same partitions
    first = [_cohort(0, r, ids, 100, 0.1) for r in (1, 2, 3)]
    assert all(len(c) == 10 for c in first) and len({tuple(c) for c in first}) == 3
    assert [_cohort(0, r, other_ids, 100, 0.1) for r in (1, 2, 3)] == first
    assert [_cohort(1, r, ids, 100, 0.1) for r in (1, 2, 3)] != first


@pytest.mark.slow
def test_simulation_samples_the_seeded_cohorts(tmp_path):
    """Nodes say their partition ids through a Flower query; each round trains the seeded cohort."""
    cfg = small_federation(tmp_path, users=8, fraction_train=0.5, local_epochs=1, eval_every=2, seed=3)
    history = run_simulation(cfg, num_cpus=2)["history"]
    assert [row["cohort"] for row in history] == [_cohort(3, r, list(range(8)), 8, 0.5) for r in (1, 2)]
    assert all(row["sampled"] == row["valid"] == 4 for row in history)
