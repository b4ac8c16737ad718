"""Attack evaluations (THREAT_MODEL.md): model poisoning (devices promoting a cold item) and hostile updates.

**Poisoning** (real Flower simulations): ``ATTACK_SHARE`` of the nodes (simulated devices; with virtual
users, a node and the users it hosts) run an item-promotion attack. Each round an attacking node trains a copy of the model on fabricated profiles whose sequences keep returning to a
cold target item (popular items in between, the target at the end), keeps the change this made to the target
item's rows (its embedding and bias), and boosts it to ``BOOST`` times the server's norm bound: the largest
update validation lets through, all of it on the target (explicit boosting, Bhagoji et al. 2019, aimed at one
item as in federated-recommender poisoning). Its reply reports the example weight of the users it hosts. After
the last round, for every honest user, the device's serving weights (final shared arrays + its gated
adaptation) give the top-10 (``shared_model.top_k``, history masked) and the test NDCG@10.
Reported per run: the target's exposure (share of honest users with it in their top-10), test NDCG@10 with its
standard error and the paired change against the run without attack under the same defence, and how many
attackers each round sampled (cohorts are seeded: the runs sample the same nodes).

**Continuation** (in-process, through the product's strategy): an already trained run (``--trained``, its
arrays and FedAdam moments) continues ``--continue-rounds`` rounds with seeded cohorts of nodes, honest nodes
replying with ``HostedUsers.train`` and attacking nodes with the same promotion update: what happens when attackers
join a deployed federation, the case FedAdam's per-coordinate normalization makes hardest. Reported: the
population model's exposure of the target every 10 rounds and the honest users' test NDCG@10 at the end.

**Quorum reach** (``--parts quorum --trained RUN``): what the row quorum leaves unlearned (:func:`quorum_reach`).

**Hostile updates** (through the strategy, in-process): real device updates plus every hostile update of
:func:`simulations.hostile_updates.hostile_updates` in one round, for each aggregation: every hostile update must be rejected with a
reason, the aggregate must equal the aggregate of the good updates alone, and the round must complete.

Results go to ``simulations/results/poisoning.json`` (rewritten after every run) and ``poisoning.md``.
Run: ``python -m simulations.bench_poisoning [--parts poisoning continuation hostile] [--variants ...]``; the
default variants are the default defence and no defence, each with and without attack; every defence in
``DEFENCES`` can be named (``--variants "attack, row_clip 0.05"``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.clientapp import ClientApp

from shared_model.config import FederatedConfig, TrainConfig
from shared_model.data.log import InteractionLog, Ragged
from shared_model.data.split import partition_users
from shared_model.protocol.updates import ITEM_TABLES

from .hostile_updates import hostile_round, strategy_round

RESULTS = Path(__file__).parent / "results"
NAME = "poisoning"
ATTACK_SHARE = 0.03  # share of the devices that attack
BOOST = 0.9  # an attacker's update uses this share of the norm bound
FAKE_PROFILES = 8  # fabricated profiles an attacker trains on
TARGET_EVERY = 4  # the target item comes back every this many events of a fabricated profile
DEFENCE_KEYS = (
    "row_clip",
    "row_quorum",
    "clip_norm",
    "aggregation",
    "trim_fraction",
    "robust_scope",
    "server_tau_items",
)
NO_DEFENCE = {"row_clip": 0.0, "row_quorum": 0, "clip_norm": 0.0, "aggregation": "mean"}
DEFENCES: dict[str, dict[str, Any]] = {
    "none": {},
    "default": {k: getattr(FederatedConfig(), k) for k in DEFENCE_KEYS},  # the product's defence settings
    "row_clip 0.5": {"row_clip": 0.5},  # the default before the row quorum
    "row quorum 4": {"row_quorum": 4},
    "row_clip 0.05": {"row_clip": 0.05},
    "median": {"aggregation": "median"},
    "item-table trimmed-mean 0.2": {
        "aggregation": "trimmed-mean",
        "trim_fraction": 0.2,
        "robust_scope": "item-tables",
    },
    "row_clip 0.5 + item-table trimmed-mean 0.2": {
        "row_clip": 0.5,
        "aggregation": "trimmed-mean",
        "trim_fraction": 0.2,
        "robust_scope": "item-tables",
    },
    **{
        f"item-table trimmed-mean 0.2, item epsilon {tau:g}": {
            "aggregation": "trimmed-mean",
            "trim_fraction": 0.2,
            "robust_scope": "item-tables",
            "server_tau_items": tau,
        }
        for tau in (1e-5, 1e-4)
    },
}
# run name -> (attacked, defence); the default defence and its cost come first
PROPOSED = "default"
VARIANTS: dict[str, tuple[bool, str]] = {
    f"no attack, {PROPOSED}": (False, PROPOSED),
    f"attack, {PROPOSED}": (True, PROPOSED),
    "attack": (True, "none"),
    "no attack": (False, "none"),
    **{
        f"{a}, {d}": (a == "attack", d)
        for d in DEFENCES
        if d not in ("none", PROPOSED)
        for a in ("attack", "no attack")
    },
}
ESSENTIAL = list(VARIANTS)[:4]  # the default defence with and without attack, and the same without defence
PARTS = ("poisoning", "continuation", "hostile", "quorum")


# ---------------------------------------------------------------------------------------------- poisoning
def cold_target(log: InteractionLog, seed: int) -> int:
    """A cold item (1 to 3 events in the whole log), drawn with ``seed``: the item the attackers promote."""
    counts = np.bincount(log.item, minlength=log.num_items)
    return int(np.random.default_rng(seed).choice(np.flatnonzero((counts >= 1) & (counts <= 3))))


def attackers(num_nodes: int, seed: int) -> np.ndarray:
    """The attacking partitions (nodes): ``ATTACK_SHARE`` of them, drawn with ``seed``."""
    count = max(1, round(ATTACK_SHARE * num_nodes))
    return np.sort(np.random.default_rng([seed, 7]).choice(num_nodes, size=count, replace=False))


def fabricated_log(log: InteractionLog, target: int, length: int, seed: int) -> InteractionLog:
    """``FAKE_PROFILES`` fabricated users of ``length`` events: random popular items with the target item every
    ``TARGET_EVERY`` events and last; one event a day, no explanation labels."""
    rng = np.random.default_rng([seed, 11])
    popular = np.argsort(-np.bincount(log.item, minlength=log.num_items), kind="stable")[:100]
    items = rng.choice(popular, size=(FAKE_PROFILES, length))
    items[:, TARGET_EVERY - 1 :: TARGET_EVERY] = target
    items[:, -1] = target
    n = items.size
    start = int(np.median(log.time))
    times = start + 86_400 * np.tile(np.arange(length, dtype=np.int64), FAKE_PROFILES)
    return replace(
        log,
        user=np.repeat(np.arange(FAKE_PROFILES, dtype=np.int64), length),
        item=items.ravel(),
        time=times,
        user_ids=np.array([f"fake-{i}" for i in range(FAKE_PROFILES)]),
        explanations=Ragged.empty(n),
    )


@lru_cache(maxsize=2)
def _fabricated(cfg: FederatedConfig) -> tuple[InteractionLog, int]:
    """The attacker's fabricated log and its target item, per process."""
    from client_sdk.device import cached_log

    log = cached_log(cfg.dataset, cfg.data_dir)
    target = cold_target(log, cfg.seed)
    return fabricated_log(log, target, cfg.max_len + 1, cfg.seed), target


def promotion_update(cfg: FederatedConfig, shared: dict[str, np.ndarray], server_round: int) -> dict:
    """The attack's update: the target rows' change from local training on the fabricated profiles, boosted to
    ``BOOST`` times the norm bound; every other array is sent back unchanged."""
    import torch

    from client_sdk.device import _cached_model
    from shared_model.partition import load_parts, split_state
    from shared_model.training import train_epoch

    model, personal = _cached_model(cfg)  # the device's model of this process, its initial personal weights
    fake, target = _fabricated(cfg)
    load_parts(model, shared, personal)
    tcfg = TrainConfig(lr=cfg.local_lr, batch_size=FAKE_PROFILES, grad_clip=None, seed=cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.local_lr, weight_decay=tcfg.weight_decay)
    rng = np.random.default_rng([cfg.seed, server_round, 13])
    users = np.arange(FAKE_PROFILES)
    for _ in range(cfg.local_epochs):
        train_epoch(model, optimizer, fake, users, fake.user_ptr[1:], tcfg, rng)
    trained = split_state(model, cfg.split)[0]
    row = target + 1  # item ids are shifted by one inside the model (0 is padding)
    delta = {k: trained[k][row].astype(np.float64) - shared[k][row] for k in ITEM_TABLES}
    scale = BOOST * cfg.norm_bound / math.sqrt(sum(float(np.sum(d**2)) for d in delta.values()))
    update = {k: v.copy() for k, v in shared.items()}
    for k in ITEM_TABLES:
        update[k][row] = (shared[k][row] + scale * delta[k]).astype(update[k].dtype)
    return update


def attacking_client_app(attacking: np.ndarray) -> ClientApp:
    """The real ClientApp, except that the ``attacking`` partitions reply with :func:`promotion_update` (and
    log each attack to ``<out_dir>/attacks.jsonl``)."""
    from client_sdk.flower_client import ROUND_KEYS, _config, _shared, make_client_app
    from server.records import numpy_to_record

    bad = {int(p) for p in attacking}

    def attack(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)  # an honest round first: its metrics make the reply look ordinary
        pid = int(context.node_config["partition-id"])
        if msg.metadata.message_type != MessageType.TRAIN or pid not in bad:
            return reply
        config = dict(_config(msg))
        rnd = int(config.get("server-round", 0))
        cfg = FederatedConfig.from_run_config({k: v for k, v in config.items() if k not in ROUND_KEYS})
        update = promotion_update(cfg, _shared(msg), rnd)
        metrics = reply.content.metric_records["metrics"]
        reply.content = RecordDict({"arrays": numpy_to_record(update), "metrics": metrics})
        with (Path(cfg.out_dir) / "attacks.jsonl").open("a") as fh:
            fh.write(json.dumps({"round": rnd, "partition": pid}) + "\n")
        return reply

    return make_client_app([attack])


def exposure_and_ndcg(
    cfg: FederatedConfig, shared: dict[str, np.ndarray], honest: np.ndarray, target: int
) -> dict:
    """For every honest evaluation user, with the serving weights of their device: is the target in the top-10
    (history masked), and the test NDCG@10. Returns the exposure and the per-user NDCG@10 values."""
    from client_sdk.device import HostedUsers
    from shared_model.top_k import recommend
    from shared_model.training import evaluate

    device = HostedUsers(cfg, 0, 1, Path(cfg.out_dir) / "devices")
    target_id = str(device.log.item_ids[target])
    users = np.intersect1d(honest, device.split.eval_users)
    hits, ndcg = [], []
    for user in users:
        device.adapt(int(user), shared, cfg.num_rounds)
        top = recommend(device.model, device.log, int(user), k=10, explanations=0)
        hits.append(any(r["item"] == target_id for r in top))
        ndcg.append(
            evaluate(device.model, device.log, device.split, "test", users=np.array([user]))["ndcg@10"]
        )
    return {"exposure": float(np.mean(hits)), "users": len(users), "ndcg": np.array(ndcg), "user_ids": users}


def run_dir(root: Path, variant: str) -> Path:
    return root / variant.replace(", ", "-").replace(" + ", "-and-").replace(" ", "-")


def run_poisoning(variant: str, base: FederatedConfig, root: Path, num_cpus: int) -> dict[str, Any]:
    """One simulation (attacked or not, with a defence) and its exposure / NDCG@10 evaluation."""
    import shutil

    from client_sdk.device import cached_log
    from server.checkpoint import load_server_checkpoint
    from simulations.simulate import run_simulation

    attacked, defence = VARIANTS[variant]
    out = run_dir(root, variant)
    shutil.rmtree(out, ignore_errors=True)
    cfg = replace(base, **DEFENCES[defence], out_dir=str(out))
    log = cached_log(cfg.dataset, cfg.data_dir)
    num_nodes = math.ceil(log.num_users / cfg.users_per_node)  # a partition is one simulated node
    drawn = attackers(num_nodes, cfg.seed)
    bad = drawn if attacked else np.array([], dtype=np.int64)
    t0 = time.perf_counter()
    result = run_simulation(
        cfg, num_cpus=num_cpus, client_app=attacking_client_app(bad) if attacked else None
    )
    shared = load_server_checkpoint(out)[0]
    parts = partition_users(log.num_users, num_nodes, cfg.seed)
    attack_users = np.concatenate([parts[p] for p in drawn])  # left out of every run's evaluation (pairing)
    target = cold_target(log, cfg.seed)
    ev = exposure_and_ndcg(cfg, shared, np.setdiff1d(np.arange(log.num_users), attack_users), target)
    attacks = (
        [json.loads(line) for line in (out / "attacks.jsonl").read_text().splitlines()] if attacked else []
    )
    per_round = [sum(a["round"] == r for a in attacks) for r in range(1, cfg.num_rounds + 1)]
    history = result["history"]
    np.save(out / "ndcg_per_user.npy", np.stack([ev["user_ids"], ev["ndcg"]]))
    return {
        "attacked": attacked,
        "defence": defence,
        "overrides": DEFENCES[defence],
        "target_item": str(log.item_ids[target]),
        "attackers": len(bad),
        "attackers_per_round": per_round,
        "exposure": ev["exposure"],
        "users": ev["users"],
        "test_ndcg@10": float(ev["ndcg"].mean()),
        "test_ndcg@10_se": float(ev["ndcg"].std(ddof=1) / math.sqrt(len(ev["ndcg"]))),
        "rejected": sum(h.get("rejected", 0) for h in history),
        "norm_clipped": sum(h.get("norm_clipped", 0) for h in history),
        "rows_clipped": sum(h.get("rows_clipped", 0) for h in history),
        "minutes": (time.perf_counter() - t0) / 60,
    }


def reference_run(name: str, run: dict[str, Any], runs: dict[str, Any]) -> str | None:
    """The run an attacked run is compared with: no attack under the same defence (else without defence);
    a run without attack is compared with the one without attack and without defence."""
    same = "no attack" if run["defence"] == "none" else f"no attack, {run['defence']}"
    ref = same if run["attacked"] else "no attack"
    return ref if ref in runs and ref != name else None


def paired_change(root: Path, variant: str, reference: str = "no attack") -> tuple[float, float] | None:
    """Mean and standard error of the per-user test NDCG@10 change of ``variant`` against ``reference``."""
    paths = [run_dir(root, v) / "ndcg_per_user.npy" for v in (variant, reference)]
    if not all(p.exists() for p in paths):
        return None
    (users, a), (ref_users, b) = (np.load(p) for p in paths)
    if not np.array_equal(users, ref_users):
        return None
    diff = a - b
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))


# ---------------------------------------------------------------------------------------------- attacking a trained federation
def population_scores(cfg: FederatedConfig, shared: dict[str, np.ndarray], users: np.ndarray) -> tuple:
    """The population model's item scores for ``users``' test events (their whole history as input), the
    histories (to mask) and the test events' positions in the log."""
    import torch

    from client_sdk.device import _cached_model, cached_log
    from shared_model.batching import history_of, input_batch
    from shared_model.partition import load_parts

    log = cached_log(cfg.dataset, cfg.data_dir)
    model, _ = _cached_model(cfg)
    load_parts(model, shared)
    model.eval()
    starts, ends = log.user_ptr[users], log.user_ptr[users + 1] - 1
    with torch.no_grad():
        scores = model.item_scores(model.encode(input_batch(log, starts, ends, cfg.max_len))[:, -1])
    return scores, history_of(log, starts, ends), ends


def population_exposure(
    cfg: FederatedConfig, shared: dict[str, np.ndarray], users: np.ndarray, target: int
) -> float:
    """Share of ``users`` with ``target`` in the population model's top-10 for their test event (history
    masked)."""
    from shared_model.metrics import target_ranks

    scores, history, _ = population_scores(cfg, shared, users)
    return float(np.mean(target_ranks(scores, np.full(len(users), target), history) < 10))


def quorum_reach(cfg: FederatedConfig, trained: Path, quorum: int) -> dict[str, Any]:
    """What a row quorum of ``quorum`` devices leaves unlearned: the items fewer than ``quorum`` nodes (of the
    simulation's partition) have in their users' training events, their share of the items, of the training
    events and of the test targets; and on the population model of the run in ``trained`` (with or without the
    quorum), the share of the honest users' top-10 slots (history masked) on those items and of its test
    NDCG@10 that comes from targets among them."""
    import torch

    from client_sdk.device import cached_log
    from server.checkpoint import load_server_checkpoint, load_server_state
    from shared_model.data.split import LeaveOneOutSplit
    from shared_model.metrics import target_ranks

    log = cached_log(cfg.dataset, cfg.data_dir)
    split = LeaveOneOutSplit(log)
    num_nodes = math.ceil(log.num_users / cfg.users_per_node)
    node_of = np.empty(log.num_users, np.int64)
    for node, users in enumerate(partition_users(log.num_users, num_nodes, cfg.seed)):
        node_of[users] = node
    train = np.flatnonzero(split.train_mask)
    user_of = np.repeat(np.arange(log.num_users), np.diff(log.user_ptr))
    pairs = np.unique(np.stack([log.item[train], node_of[user_of[train]]]), axis=1)
    below = np.bincount(pairs[0], minlength=log.num_items) < quorum
    loaded = load_server_checkpoint(trained)
    if loaded is None:
        raise SystemExit(f"{trained}: no server checkpoint")
    users = split.eval_users
    scores, history, ends = population_scores(cfg, loaded[0], users)
    ranks = target_ranks(scores, log.item[ends], history)
    gain = np.where(ranks < 10, 1 / np.log2(ranks + 2), 0.0)
    rows = np.repeat(np.arange(len(users)), np.diff(history.ptr))
    scores[torch.as_tensor(rows), torch.as_tensor(history.ids)] = -torch.inf
    top = scores.topk(10, dim=1).indices.numpy()
    state = load_server_state(trained)
    return {
        "quorum": quorum,
        "round": loaded[1],
        "trained_with_quorum": "row-quorum/count" in state,
        "items_below": float(below.mean()),
        "train_events_below": float(below[log.item[train]].mean()),
        "test_targets_below": float(below[log.item[ends]].mean()),
        "top10_slots_below": float(below[top].mean()),
        "ndcg_share_below": float(gain[below[log.item[ends]]].sum() / max(gain.sum(), 1e-12)),
        "test_ndcg@10": float(gain.mean()),
    }


def run_continuation(
    variant: str, base: FederatedConfig, trained: Path, rounds: int, root: Path
) -> dict[str, Any]:
    """Attack a trained federation: continue the run in ``trained`` (its arrays and FedAdam moments) for
    ``rounds`` rounds through the product's strategy, in-process: each round a seeded cohort of nodes, honest
    ones replying with ``HostedUsers.train``, attacking ones with :func:`promotion_update`; the population
    model's exposure of the target every 10 rounds, test NDCG@10 of the honest users at the end. The server
    learning rate stays at its peak (a federation that keeps training; under the default schedule it is 0 after
    the trained run's last round, and then no update, honest or not, moves anything)."""
    import shutil

    from client_sdk.device import HostedUsers, cached_log
    from server.checkpoint import load_server_checkpoint, load_server_state
    from server.strategies import make_strategy
    from shared_model.partition import load_parts
    from shared_model.training import evaluate

    attacked, defence = VARIANTS[variant]
    out = run_dir(root, "continued " + variant)
    shutil.rmtree(out, ignore_errors=True)
    cfg = replace(base, **DEFENCES[defence], server_lr_decay=0.0, out_dir=str(out))
    log = cached_log(cfg.dataset, cfg.data_dir)
    num_nodes = math.ceil(log.num_users / cfg.users_per_node)
    bad = set(attackers(num_nodes, cfg.seed).tolist()) if attacked else set()
    loaded = load_server_checkpoint(trained)
    if loaded is None:
        raise SystemExit(f"{trained}: no server checkpoint (run `tmepsr simulate --out-dir {trained}` first)")
    shared, start_round = loaded[0], loaded[1]
    strategy = make_strategy(cfg, num_nodes, log.num_users)
    strategy.restore_server_state(load_server_state(trained))
    devices = [HostedUsers(cfg, p, num_nodes, out / "devices") for p in range(num_nodes)]
    parts = partition_users(log.num_users, num_nodes, cfg.seed)
    honest = np.setdiff1d(
        devices[0].split.eval_users, np.concatenate([parts[p] for p in sorted(bad)] or [[]])
    )
    target = cold_target(log, cfg.seed)
    cohort_size = max(1, round(cfg.fraction_train * num_nodes))
    curve, attacks, t0 = [], 0, time.perf_counter()
    for r in range(1, rounds + 1):
        rnd = start_round + r
        cohort = np.random.default_rng([cfg.seed, rnd, 5]).choice(num_nodes, size=cohort_size, replace=False)
        replies, nodes = [], sorted(cohort.tolist())
        for p in nodes:
            result = devices[p].train(shared, rnd)
            if p in bad:  # the attack replaces the reply, keeping its plausible example weight
                replies.append((promotion_update(cfg, shared, rnd), result.num_examples))
                attacks += 1
            else:
                replies.append((result.update, result.num_examples))
        new, _ = strategy_round(strategy, rnd, shared, replies, nodes)  # partitions: stable device ids
        shared = shared if new is None else new
        if r % 10 == 0 or r == rounds:
            curve.append({"round": r, "exposure": population_exposure(cfg, shared, honest, target)})
            print(f"  {variant}: round {r}/{rounds}, exposure {curve[-1]['exposure']:.4f}", flush=True)
    load_parts(devices[0].model, shared)
    ndcg = evaluate(devices[0].model, log, devices[0].split, "test", users=honest)["ndcg@10"]
    return {
        "attacked": attacked,
        "defence": defence,
        "overrides": DEFENCES[defence],
        "from_round": start_round,
        "rounds": rounds,
        "attacks": attacks,
        "exposure": curve[-1]["exposure"],
        "max_exposure": max(c["exposure"] for c in curve),
        "curve": curve,
        "users": len(honest),
        "test_ndcg@10": ndcg,
        "minutes": (time.perf_counter() - t0) / 60,
    }


def run_hostile(base: FederatedConfig) -> list[dict[str, Any]]:
    """:func:`hostile_round` on real device updates (3 dense, 1 sparse, 1 sparse int8), for each aggregation."""
    from client_sdk.device import HostedUsers, cached_log
    from server.app import initial_shared

    sent = initial_shared(base)
    store = Path(base.out_dir) / "hostile-devices"
    users = cached_log(base.dataset, base.data_dir).num_users
    goods = []
    for pid, (upload, compress) in enumerate(
        [("dense", "none")] * 3 + [("sparse", "none"), ("sparse", "int8")]
    ):
        result = HostedUsers(replace(base, upload=upload, compress=compress), pid, users, store).train(
            sent, 1
        )
        goods.append((result.update, result.num_examples))
    cfg = replace(base, min_reply_fraction=0.1)  # 5 good replies of 36 are enough to aggregate
    return [
        hostile_round(replace(cfg, aggregation=a), sent, goods) for a in ("mean", "trimmed-mean", "median")
    ]


# ---------------------------------------------------------------------------------------------- report


def _exposure_ratio(exposure: float, base: float | None) -> str:
    """Exposure as a multiple of the run without attack (``base``; None: this is that run)."""
    if base is None:
        return "-"
    return f"{exposure / base:.2f}" if base else "n/a (0 without attack)"


def write_report(results: dict[str, Any], root: Path) -> None:
    (RESULTS / f"{NAME}.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    runs = results.get("poisoning", {})
    lines = ["# Poisoning (item promotion) and hostile updates", "", f"Setup: {results['setup']}.", ""]
    if runs:
        lines += [
            "Exposure: share of the honest users (those hosted by attacking nodes left out of every run) with the"
            " target item in their top-10 from their device's serving weights; NDCG@10 on the same users' test"
            " events. Each round samples the same nodes in every run (seeded cohorts); an attacked run differs"
            " only in the attacking nodes' replies. Each attacked run is compared with the run without attack"
            " under the same defence.",
            "",
            "| run | exposure of the target (top-10) | x no attack | test NDCG@10 (+-SE) | NDCG@10 change vs no"
            " attack (paired, +-SE) | attackers sampled per round | norm-clipped / rows clipped | minutes |",
            "|---|---|---|---|---|---|---|---|",
        ]
    else:
        lines.append(
            "Attacks on a federation trained from scratch (`--parts poisoning`, one full Flower simulation per"
            " run): not run under the current defaults; the defaults are measured by the attack on a trained"
            " federation below."
        )
    for name, r in runs.items():
        ref = reference_run(name, r, runs)
        base = runs[ref]["exposure"] if ref else None
        ratio = _exposure_ratio(r["exposure"], base)
        change = paired_change(root, name, ref) if ref else None
        delta = (
            ""
            if change is None
            else f"{change[0]:+.4f} +- {change[1]:.4f} ({100 * change[0] / runs[ref]['test_ndcg@10']:+.1f}%)"
        )
        lines.append(
            f"| {name} | {r['exposure']:.4f} ({round(r['exposure'] * r['users'])}/{r['users']}) | {ratio} | "
            f"{r['test_ndcg@10']:.4f} +- {r['test_ndcg@10_se']:.4f} | {delta} | "
            f"{r['attackers_per_round'] if r['attacked'] else '-'} | {r['norm_clipped']} / {r['rows_clipped']} | "
            f"{r['minutes']:.1f} |"
        )
    cont = {k: v for k, v in results.get("continuation", {}).items() if not k.startswith("_")}
    if cont:
        trained, rounds = results["continuation"]["_from"]
        lines += [
            "",
            f"## Attacking a trained federation ({trained}, {rounds} more rounds, in-process)",
            "",
            "The trained run's arrays and FedAdam moments continue through the product's strategy at the peak"
            " server learning rate (constant); exposure of the target in the population model's top-10 (honest"
            " users' test events, history masked).",
            "",
            "| run | exposure at the end | highest exposure (every 10 rounds) | x no attack | attacks | test NDCG@10 |"
            " minutes |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in cont.items():
            ref = reference_run(name, r, cont)
            base = cont[ref]["exposure"] if ref else None
            ratio = _exposure_ratio(r["exposure"], base)
            lines.append(
                f"| {name} | {r['exposure']:.4f} | {r['max_exposure']:.4f} | {ratio} | {r['attacks']} | "
                f"{r['test_ndcg@10']:.4f} | {r['minutes']:.1f} |"
            )
    reach = results.get("quorum", {})
    if reach:
        lines += [
            "",
            "## What the row quorum leaves unlearned (`--parts quorum --trained RUN`)",
            "",
            "Items that fewer than `row_quorum` nodes have in their users' training events (the partition of the"
            " runs above) never move up under the quorum; the share of the items, of the training events and of"
            " the test targets that are such items; on a trained run's population model, the share of the honest"
            " users' top-10 slots (history masked) on them and of its test NDCG@10 that comes from targets among"
            " them.",
            "",
            "| trained run | round | trained with the quorum | quorum | items below | training events | test targets"
            " | top-10 slots | share of test NDCG@10 | test NDCG@10 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for run, q in reach.items():
            lines.append(
                f"| {run} | {q['round']} | {'yes' if q['trained_with_quorum'] else 'no'} | {q['quorum']} | "
                f"{q['items_below']:.3f} | {q['train_events_below']:.3f} | {q['test_targets_below']:.3f} | "
                f"{q['top10_slots_below']:.3f} | {q['ndcg_share_below']:.3f} | {q['test_ndcg@10']:.4f} |"
            )
    hostile = results.get("hostile", [])
    if hostile:
        lines += [
            "",
            "## Hostile updates in one round with good ones (through the strategy)",
            "",
            "| aggregation | good | hostile | rejected | valid | round completed | aggregate == good only | float32 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for h in hostile:
            lines.append(
                f"| {h['aggregation']} | {h['good']} | {h['hostile']} | {h['rejected']} | {h['valid']} | "
                f"{h['round_completed']} | {h['aggregate_equals_good_only']} | {h['float32']} |"
            )
        lines += ["", "| hostile update | rejection reason |", "|---|---|"]
        reasons = hostile[0]["reasons"]
        for name, reason in reasons.items() if isinstance(reasons, dict) else ():
            lines.append(f"| {name} | {reason.replace('|', '/')} |")
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines) + "\n")


def setup_line(base: FederatedConfig) -> str:
    from client_sdk.device import cached_log

    log = cached_log(base.dataset, base.data_dir)
    target = cold_target(log, base.seed)
    nodes = math.ceil(log.num_users / base.users_per_node)
    return (
        f"{base.dataset}, {base.num_rounds} rounds, fraction_train {base.fraction_train}, "
        f"{len(attackers(nodes, base.seed))} of {nodes} nodes ({100 * ATTACK_SHARE:.0f}%; {base.users_per_node} users each) "
        f"attack, boosting to {BOOST} x norm_bound {base.norm_bound}; target item {log.item_ids[target]} "
        f"(events in the log: {int(np.sum(log.item == target))}); seed {base.seed}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=FederatedConfig().dataset)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--variants", nargs="+", default=ESSENTIAL, choices=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=FederatedConfig().num_rounds, help="attacked from round 1")
    p.add_argument("--fraction", type=float, default=0.1, help="fraction_train")
    p.add_argument("--trained", default="runs/simulate", help="continuation: the trained run to attack")
    p.add_argument("--continue-rounds", type=int, default=100, help="continuation: attacked rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--out", default="runs/bench_poisoning")
    args = p.parse_args(argv)
    root = Path(args.out)
    base = FederatedConfig(
        dataset=args.dataset,
        num_rounds=args.rounds,
        fraction_train=args.fraction,
        eval_every=args.rounds,
        fraction_evaluate=0.05,
        seed=args.seed,
        out_dir=str(root),
        **NO_DEFENCE,
    )  # no defence unless a variant adds one
    path = RESULTS / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    saved = results.get("config")  # fields added since take today's defaults
    if saved is None or {**asdict(base), **saved} != asdict(base):  # another setup's runs: start afresh
        results = {}
    results["setup"] = setup_line(base)
    results["config"] = asdict(base)
    for variant in args.variants if "continuation" in args.parts else ():
        cont = results.setdefault("continuation", {})
        if cont.get("_from") != [str(args.trained), args.continue_rounds]:
            cont.clear()
            cont["_from"] = [str(args.trained), args.continue_rounds]
        cont[variant] = run_continuation(variant, base, Path(args.trained), args.continue_rounds, root)
        write_report(results, root)
    if "quorum" in args.parts:
        quorum = FederatedConfig().row_quorum
        results.setdefault("quorum", {})[str(args.trained)] = quorum_reach(base, Path(args.trained), quorum)
        write_report(results, root)
    if "hostile" in args.parts:
        results["hostile"] = run_hostile(base)
        write_report(results, root)
    for variant in args.variants if "poisoning" in args.parts else ():
        results.setdefault("poisoning", {})[variant] = run_poisoning(variant, base, root, args.num_cpus)
        write_report(results, root)
        r = results["poisoning"][variant]
        print(
            f"{variant}: exposure {r['exposure']:.4f}, test NDCG@10 {r['test_ndcg@10']:.4f}, "
            f"{r['minutes']:.1f} min",
            flush=True,
        )


if (
    __name__ == "__main__"
):  # run from the importable module, so Ray workers can unpickle the attack's ClientApp
    from simulations.bench_poisoning import main as module_main

    module_main()
