"""A central stand-in of the federated optimizer, for quick what-ifs about federated convergence: per step, one
Adam step (FedAdam's betas 0.9 / 0.99, epsilon ``server_tau``, no weight decay or clipping) on the mean loss of a
cohort-sized batch of random users (``fraction_train`` of them, one window each), with eta from the server's own
schedule (``server.server_adam.server_lr_at``), from the federated run's initial model (``model_for_run``: same
seed, same weights). Validation NDCG@10 every ``--eval-every`` steps, test at the end.

A federated round with one local SGD epoch is such a step (FedAdam over the example-weighted mean of the devices'
changes), so ``--steps 400`` stands for the federated benchmark's 400 rounds at about 2 minutes on one core
instead of about 70. Left out: Flower, the per-update clips, the row quorum and the population's head shares (the
batch's own shares steer the responsibility balance); cohorts drawn by node are a variant. Measured against the
federated runs: docs/RESULTS.md#federated-training.

Each (variant, seed) row is appended to ``simulations/results/<name>_runs.jsonl`` when it finishes (a rerun
skips it); the table (``<name>.md``) gives each variant's mean over seeds, its ratio to the default's (same
seeds) and to the centralized reference (the mean of ``--centralized-from`` rows of ``bench_federated``).

Five variants change the loop itself: ``centralized-adamw`` takes the centralized trainer's AdamW instead of the
FedAdam stand-in; ``per-user-loss`` computes each user's loss on its own (as a device does: the in-batch terms
see one user's window) and averages the gradients by targets, with the population's head shares estimated from
the previous step (about 10x slower); ``node-cohorts`` draws each step's users as the simulation does, every user
of ``fraction_train`` of the nodes, the nodes being fixed seeded groups of ``users_per_node`` users
(``partition_users``), instead of ``fraction_train`` of the users independently; ``windows-2`` and ``windows-4``
give each cohort user that many windows per step (each with its own random end, so users with more than
``max_len + 1`` training events contribute more of their history to one gradient; shorter users repeat theirs).

    python -m simulations.federated_proxy --variants default max-len-100 --seeds 0 1 2 3

Any other setting runs as a custom variant: ``--set JSON`` takes the :class:`FederatedConfig` settings the stand-in
acts on (``STAND_IN_SETTINGS``, e.g. ``server_lr``, ``max_len``) and :class:`ModelConfig` fields (e.g.
``dropout``); its rows are named ``set {...}`` and run beside the default (their paired reference) unless
``--variants`` says otherwise:

    python -m simulations.federated_proxy --set '{"server_lr": 0.006}' --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.server_adam import server_lr_at
from shared_model.batching import training_batch, training_windows
from shared_model.config import FederatedConfig, ModelConfig, TrainConfig
from shared_model.data import load_dataset
from shared_model.data.split import LeaveOneOutSplit, partition_users
from shared_model.protocol.updates import update_weight
from shared_model.training import evaluate, model_for_run, train_end_per_user
from simulations.bench_federated import centralized_mean, centralized_references

RESULTS = Path(__file__).parent / "results"
# name -> FederatedConfig overrides ("federated"), ModelConfig overrides ("model"), "explanation_warm_up":
# steps over which the explanation losses' weights (alpha, beta) rise linearly from 0, and "optimizer": the
# centralized trainer's AdamW (TrainConfig's lr and weight decay, torch's betas and epsilon, constant lr) in
# place of the FedAdam stand-in
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "dropout-0.1": {"model": {"dropout": 0.1}},
    "dropout-0.3": {"model": {"dropout": 0.3}},
    "max-len-100": {"federated": {"max_len": 100}},
    "explanation-warm-up-100": {"explanation_warm_up": 100},
    "centralized-adamw": {"optimizer": "centralized"},
    "per-user-loss": {"per_user_loss": True},
    "node-cohorts": {"node_cohorts": True},
    "windows-2": {"windows_per_user": 2},
    "windows-4": {"windows_per_user": 4},
}


# the FederatedConfig settings the stand-in acts on (the others concern devices, uploads or the server's defences,
# which it leaves out; dataset, seed and rounds come from its own flags)
STAND_IN_SETTINGS = (
    "preset",
    "max_len",
    "d_model",
    "explanation_history_prior",
    "fraction_train",
    "server_lr",
    "server_lr_decay",
    "server_tau",
)


def custom_variant(settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A ``--set`` variant: its row name and its spec, each key sent to the FederatedConfig (one of
    ``STAND_IN_SETTINGS``) or the ModelConfig field of that name; any other key is an error."""
    federated = set(STAND_IN_SETTINGS)
    model = {f.name for f in fields(ModelConfig)} - {f.name for f in fields(FederatedConfig)}
    unknown = sorted(set(settings) - federated - model)
    if unknown:
        raise ValueError(
            f"--set: the stand-in does not act on {unknown}; it takes the FederatedConfig settings "
            f"{', '.join(STAND_IN_SETTINGS)} and any ModelConfig field"
        )
    spec = {
        "federated": {k: v for k, v in settings.items() if k in federated},
        "model": {k: v for k, v in settings.items() if k not in federated},
    }
    return "set " + json.dumps(settings, sort_keys=True), spec


def _optimizer(model: torch.nn.Module, fed: FederatedConfig, central: bool) -> torch.optim.Optimizer:
    """The FedAdam stand-in (betas 0.9 / 0.99, epsilon ``server_tau``), or with ``central`` the centralized
    trainer's AdamW (TrainConfig's lr and weight decay)."""
    if central:
        train = TrainConfig()
        return torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=fed.server_lr, betas=(0.9, 0.99), eps=fed.server_tau)


def _per_user_backward(model: Any, log: Any, starts: np.ndarray, ends: np.ndarray) -> torch.Tensor:
    """Each window's loss on its own, as a device computes it, backpropagated with its share of the targets
    (``update_weight``); returns the windows' target-weighted head shares, the population estimate the server
    would send for the next step."""
    targets = np.array(
        [update_weight(int(e - s), model.cfg.max_len, 1) for s, e in zip(starts, ends, strict=True)]
    )
    weight = targets / targets.sum()
    shares = np.zeros(model.cfg.num_heads)
    for i, w in enumerate(weight):
        loss, parts = model.loss(training_batch(log, starts[i : i + 1], ends[i : i + 1], model.cfg.max_len))
        (loss * float(w)).backward()
        shares += w * np.array([parts.get(f"head_share_{h}", 0.0) for h in range(len(shares))])
    return torch.as_tensor(shares, dtype=torch.float32)


def _cohort(
    rng: np.random.Generator, users: np.ndarray, size: int, nodes: list[np.ndarray] | None
) -> np.ndarray:
    """A step's users: ``size`` random users, or with ``nodes`` every user of ``size`` random nodes."""
    if nodes is None:
        return rng.choice(users, min(size, len(users)), replace=False)
    picked = rng.choice(len(nodes), min(size, len(nodes)), replace=False)
    return np.concatenate([nodes[i] for i in sorted(picked)])


def run(
    dataset: str, variant: str, seed: int, steps: int, eval_every: int, spec: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One stand-in run of a named variant (or of ``spec``, a custom one); returns its row (validation curve,
    final validation and test metrics)."""
    spec = VARIANTS[variant] if spec is None else spec
    fed = FederatedConfig(dataset=dataset, seed=seed, num_rounds=steps, **spec.get("federated", {}))
    log = load_dataset(dataset)
    split = LeaveOneOutSplit(log)
    model = model_for_run(fed, log, **spec.get("model", {}))
    central = spec.get("optimizer") == "centralized"
    optimizer = _optimizer(model, fed, central)
    rng = np.random.default_rng(seed)
    train_end = train_end_per_user(log, split)
    users = np.flatnonzero(train_end - log.user_ptr[:-1] >= 2)
    nodes = None
    if spec.get("node_cohorts"):  # the simulation's nodes: fixed seeded groups of users_per_node users
        groups = partition_users(log.num_users, math.ceil(log.num_users / fed.users_per_node), fed.seed)
        nodes = [np.intersect1d(group, users) for group in groups]
    cohort = max(1, round(fed.fraction_train * (log.num_users if nodes is None else len(nodes))))
    weights = {"alpha": model.cfg.alpha, "beta": model.cfg.beta}
    curve, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        if not central:
            for group in optimizer.param_groups:
                group["lr"] = server_lr_at(step, fed.server_lr, steps, fed.server_lr_decay)
        if warm := spec.get("explanation_warm_up"):
            ramp = min(1.0, (step - 1) / warm)
            model.cfg = replace(model.cfg, **{key: value * ramp for key, value in weights.items()})
        chunk = np.repeat(_cohort(rng, users, cohort, nodes), spec.get("windows_per_user", 1))
        starts, ends = training_windows(log.user_ptr, train_end, chunk, model.cfg.max_len, rng)
        optimizer.zero_grad(set_to_none=True)
        if spec.get("per_user_loss"):
            model.population_share = _per_user_backward(model, log, starts, ends)
        else:
            loss, _ = model.loss(training_batch(log, starts, ends, model.cfg.max_len))
            loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            val = evaluate(model, log, split, "val")  # the last one is the row's
            point = {"step": step, "val_ndcg@10": val["ndcg@10"]}
            curve.append(point | {"seconds": time.perf_counter() - start})
            print(json.dumps({"variant": variant, "seed": seed} | point), flush=True)
    return {
        "dataset": dataset,
        "variant": variant,
        "seed": seed,
        "steps": steps,
        "spec": spec,
        "curve": curve,
        "val": val,
        "test": evaluate(model, log, split, "test"),
        "seconds": time.perf_counter() - start,
    }


def summarise(rows: list[dict[str, Any]], central: dict[str, float] | None) -> str:
    """Per dataset and variant: seeds, mean val / test NDCG@10 (and their spread), the ratio to the default's
    mean over the same seeds, and to the centralized reference."""
    lines = [
        "| dataset | variant | steps | seeds | val NDCG@10 (sd) | test NDCG@10 (sd) | x default val / test (same seeds) "
        "| x centralized val / test |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (dataset, steps), group in _groups(rows, ("dataset", "steps")).items():
        default = {r["seed"]: r for r in group if r["variant"] == "default"}
        for (variant,), runs in _groups(group, ("variant",)).items():
            val = np.array([r["val"]["ndcg@10"] for r in runs])
            test = np.array([r["test"]["ndcg@10"] for r in runs])
            paired = [r for r in runs if r["seed"] in default]
            ratio = "-"
            if paired and variant != "default":
                ratio = " / ".join(
                    f"{np.mean([r[s]['ndcg@10'] for r in paired]) / np.mean([default[r['seed']][s]['ndcg@10'] for r in paired]):.3f}"
                    for s in ("val", "test")
                )
            versus = (
                f"{val.mean() / central['val']:.3f} / {test.mean() / central['test']:.3f}" if central else "-"
            )
            lines.append(
                f"| {dataset} | {variant} | {steps} | {len(runs)} | {val.mean():.4f} ({val.std():.4f}) "
                f"| {test.mean():.4f} ({test.std():.4f}) | {ratio} | {versus} |"
            )
    return "\n".join(lines) + "\n"


def _groups(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="movielens-100k")
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=list(VARIANTS),
        help="named variants (default: all; with --set: default)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="JSON",
        help="a custom variant: STAND_IN_SETTINGS and ModelConfig fields, e.g. '{\"server_lr\": 0.006}' (repeatable)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=400, help="Adam steps (federated rounds)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument(
        "--centralized-from",
        nargs="*",
        default=[
            f"federated-central-100k{suffix}" for suffix in ("", "-seed1", "-seed2", "-seed3", "-seed4")
        ],
        help="bench_federated results whose centralized rows are the reference (their mean)",
    )
    parser.add_argument("--name", default="federated-proxy")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    path = RESULTS / f"{args.name}_runs.jsonl"
    done = {(r["dataset"], r["variant"], r["seed"], r["steps"]) for r in _read(path)}
    named = args.variants if args.variants is not None else ["default"] if args.set else list(VARIANTS)
    variants = [(v, VARIANTS[v]) for v in named] + [custom_variant(json.loads(s)) for s in args.set]
    for seed in args.seeds:
        for variant, spec in variants:
            if (args.dataset, variant, seed, args.steps) in done:
                continue
            row = run(args.dataset, variant, seed, args.steps, args.eval_every, spec)
            with path.open("a") as fh:
                fh.write(json.dumps(row, default=float) + "\n")
    refs = [r for r in centralized_references(args.centralized_from) if r["dataset"] == args.dataset]
    central = centralized_mean(refs)
    rows = _read(path)  # with the rows of any other process working on the same name
    table = summarise(rows, central)
    (RESULTS / f"{args.name}.md").write_text(table)
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"centralized": central, "rows": rows}, indent=1, default=float) + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
