"""Federated benchmark, side by side in one run per dataset:

* the centralized TME-PSR of the same size (max_len, d_model) trained to early stopping (batch 32, patience
  20: on latest-small a larger batch or a shorter patience stops on the popularity plateau, before the model
  learns the sequences), the reference every federated number is divided by;
* federated runs through Flower's simulation engine (seeded cohorts, so a run repeats): the shipped defaults
  (``<dataset>/federated/default``) and the variants compared with them, each evaluated (validation and test)
  every ``--eval-every`` rounds up to ``--rounds``: the curve, the rounds at which validation and test first
  reach 80/90/95% of centralized, seconds per round; with local adaptation, the paired per-user comparison of
  serving with the device's gated adaptation vs the population values (all users, and the users whose gate
  kept their adaptation);
* personalization with the current gate (``--parts personalization``): the default run's final population
  model re-evaluated in-process with ``HostedUsers.evaluate`` (what each node runs in the final round), served
  with the gated adaptations vs the population values, paired per user; so a changed gate is measured
  without retraining the population model;
* upload bytes of one-user devices (a deployment's) in their first round, for dense, sparse, sparse with
  weighted decoys and sparse with sampled rows, with and without int8 compression (the median of 12 users);
* simulation throughput (device updates per second) for one user per node vs virtual users per node.

Results are appended to ``simulations/results/<name>_runs.jsonl`` as they finish and summarised in
``<name>.json``, ``<name>.md`` and ``<name>.png``; an interrupted federated run resumes from its checkpoint.
``--centralized-from NAME...`` adds the centralized rows recorded by other runs (e.g. its seeds, run with
``--parts centralized --seed S``): every ratio and rounds-to-reach then divides by the mean of them all.
Run: ``python -m simulations.bench_federated --datasets movielens-latest-small movielens-100k``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from client_sdk.device import HostedUsers, cached_log
from server.app import initial_shared
from server.checkpoint import load_server_checkpoint
from shared_model.config import FederatedConfig
from simulations.compare_seeds import recorded_rows
from simulations.simulate import run_simulation
from simulations.train import train_and_report

RESULTS = Path(__file__).parent / "results"
# federated runs compared with the centralized one: name -> FederatedConfig overrides of the defaults
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "card": {"split": "card", "adapt_epochs": 0},
    "default, sparse int8 upload": {
        "upload": "sparse",
        "sparse_sampling": "uniform",
        "compress": "int8",
        "decoy_rows": 0,
    },
    "default, sparse int8 upload, 300 weighted decoys": {
        "upload": "sparse",
        "sparse_sampling": "uniform",
        "compress": "int8",
        "decoy_rows": 300,
    },
    "default, sparse int8 upload, 100 weighted decoys, 20% of other rows": {
        "upload": "sparse",
        "sparse_sampling": "uniform",
        "compress": "int8",
        "decoy_rows": 100,
        "row_fraction": 0.2,
    },
    "default, sparse int8 upload, 100 weighted decoys": {
        "upload": "sparse",
        "sparse_sampling": "uniform",
        "compress": "int8",
        "decoy_rows": 100,
    },
    "default, sparse int8 upload, 300 weighted decoys, 20% of other rows": {
        "upload": "sparse",
        "sparse_sampling": "uniform",
        "compress": "int8",
        "decoy_rows": 300,
        "row_fraction": 0.2,
    },
    "default, sparse int4 upload, 300 weighted decoys, 40% of other rows": {
        "upload": "sparse",
        "sparse_sampling": "uniform",
        "compress": "int4",
        "decoy_rows": 300,
        "row_fraction": 0.4,
    },
    "default, sparse int4 upload, 300 weighted decoys, 40% of other rows, server lr 6e-3": {
        "upload": "sparse",
        "sparse_sampling": "uniform",
        "compress": "int4",
        "decoy_rows": 300,
        "row_fraction": 0.4,
        "server_lr": 6e-3,
    },
    "default, sparse int4 upload, 300 weighted decoys, 30% of other rows": {
        "upload": "sparse",
        "sparse_sampling": "uniform",
        "compress": "int4",
        "decoy_rows": 300,
        "row_fraction": 0.3,
    },
    "default, sparse int4 upload, 300 importance-sampled decoys, 30% of other rows": {
        "upload": "sparse",
        "compress": "int4",
        "decoy_rows": 300,
        "row_fraction": 0.3,
        "sparse_sampling": "importance",
    },
    "default, sparse int4 upload, output states, 40% of other rows": {
        "upload": "sparse",
        "compress": "int4",
        "row_fraction": 0.4,
        "sparse_sampling": "states",
    },
    # the same bytes as int4 at 40%: half the rows, each with 16x finer levels
    "default, sparse int8 upload, output states, 20% of other rows": {
        "upload": "sparse",
        "compress": "int8",
        "row_fraction": 0.2,
        "sparse_sampling": "states",
    },
    # the same bytes shared among the other matrices by the balanced row budget
    "default, sparse int4 upload, output states, 40% of other rows, balanced": {
        "upload": "sparse",
        "compress": "int4",
        "row_fraction": 0.4,
        "sparse_sampling": "states",
        "row_budget": "balanced",
    },
    # what the 40% setting's cost is made of: the other matrices whole (int4), or sampled but not quantized
    "default, sparse int4 upload, output states, every other row": {
        "upload": "sparse",
        "compress": "int4",
        "sparse_sampling": "states",
    },
    "default, sparse upload, output states, 40% of other rows": {
        "upload": "sparse",
        "row_fraction": 0.4,
        "sparse_sampling": "states",
    },
    "default, sparse int4 upload, 300 importance-sampled decoys, 30% of other rows, 20% of devices per round": {
        "upload": "sparse",
        "compress": "int4",
        "decoy_rows": 300,
        "row_fraction": 0.3,
        "sparse_sampling": "importance",
        "fraction_train": 0.2,
    },
    "default, 20% of devices per round": {"fraction_train": 0.2},
    "default, sparse int4 upload, 300 error-feedback decoys, 30% of other rows": {
        "upload": "sparse",
        "compress": "int4",
        "decoy_rows": 300,
        "row_fraction": 0.3,
        "sparse_sampling": "error-feedback",
    },
    "default, sparse int4 upload, 300 error-feedback decoys, 40% of other rows": {
        "upload": "sparse",
        "compress": "int4",
        "decoy_rows": 300,
        "row_fraction": 0.4,
        "sparse_sampling": "error-feedback",
    },
    "default, sparse int4 upload, 300 importance-sampled decoys, 40% of other rows": {
        "upload": "sparse",
        "compress": "int4",
        "decoy_rows": 300,
        "row_fraction": 0.4,
        "sparse_sampling": "importance",
    },
    "default, sparse int4 upload, 300 weighted decoys": {
        "upload": "sparse",
        "sparse_sampling": "uniform",
        "compress": "int4",
        "decoy_rows": 300,
    },
    # central DP's utility (THREAT_MODEL.md), with one user per node as in a deployment (the privacy unit is a
    # node; ten users per node would add the noise of a cohort of ten to their mean): C = 0.4, the median
    # first-round update norm of one ML-100k user (10-90%: 0.34-0.46), so about half the updates are clipped
    # and the noise (z C / cohort) is no larger than needed; epsilon at delta 1e-5 after 400 rounds of 10% of
    # ML-100k's 943 devices: 16.9 (z 1) and 5.3 (z 2)
    "default, one user per node, central DP z=1, C=0.4": {
        "privacy": "dp",
        "dp_noise": 1.0,
        "dp_clip": 0.4,
        "users_per_node": 1,
    },
    "default, one user per node, central DP z=2, C=0.4": {
        "privacy": "dp",
        "dp_noise": 2.0,
        "dp_clip": 0.4,
        "users_per_node": 1,
    },
    "default, one user per node": {"users_per_node": 1},
    "default without the row quorum": {"row_quorum": 0},
    "default, 3 local epochs": {"local_epochs": 3},
    "server lr 2e-3": {"server_lr": 2e-3},
    "constant server lr": {"server_lr_decay": 0.0},
    "constant server lr, 3 local epochs": {"server_lr_decay": 0.0, "local_epochs": 3},
    "cosine server lr over the whole run": {"server_lr_decay": 1.0},
    "previous default (card, fresh AdamW, FedAvg)": {
        "split": "card",
        "adapt_epochs": 0,
        "local_optimizer": "adamw",
        "local_lr": 1e-2,
        "local_epochs": 5,
        "server_optimizer": "fedavg",
        "server_lr_decay": 0.0,
    },
}
SAMPLING_LABELS = {
    "uniform": "",
    "importance": ", importance-sampled",
    "error-feedback": ", error feedback",
    "states": ", output states",
}
REACH = (0.8, 0.9, 0.95)
PARTS = ("centralized", "federated", "personalization", "bytes", "throughput")
# upload modes whose bytes are measured on one-user devices: (upload, decoy rows, compression, row fraction[,
# sparse sampling when not uniform[, row budget when not per-matrix]])
UPLOADS = (
    ("dense", 0, "none", 1.0),
    ("dense", 0, "int8", 1.0),
    ("sparse", 0, "none", 1.0),
    ("sparse", 0, "int8", 1.0),
    ("sparse", 300, "int8", 1.0),
    ("sparse", 100, "int8", 1.0),
    ("sparse", 100, "int8", 0.2),
    ("sparse", 300, "int4", 0.4),
    ("sparse", 300, "int4", 0.3),
    ("sparse", 300, "int4", 0.3, "importance"),
    ("sparse", 300, "int4", 0.4, "importance"),
    ("sparse", 300, "int4", 0.3, "error-feedback"),
    ("sparse", 300, "int4", 0.4, "error-feedback"),
    ("sparse", 300, "int4", 1.0),
    ("sparse", 0, "int4", 0.3, "states"),
    ("sparse", 0, "int4", 0.4, "states"),
    ("sparse", 0, "int8", 0.2, "states"),
    ("sparse", 0, "int4", 0.4, "states", "balanced"),
    ("sparse", 0, "int4", 0.5, "states"),
    ("sparse", 0, "int4", 1.0, "states"),
)
BYTES_USERS = 12  # one-user devices measured per upload mode (their median)


def _folder(variant: str) -> str:
    return variant.split(" (")[0].replace(", ", "-").replace(" ", "-")


def _point(row: dict[str, Any]) -> dict[str, Any]:
    """One evaluation round of a curve: validation and test NDCG@10 / Recall@10 as served."""
    return {
        "round": row["round"],
        **{
            f"{stage}/{m}": row[stage][m]
            for stage in ("val", "test")
            for m in ("ndcg@10", "recall@10")
            if m in row.get(stage, {})
        },
    }


def _seconds_per_round(history: list[dict[str, Any]]) -> float:
    """Mean seconds of a training round (evaluation excluded)."""
    return sum(h["seconds"] - h.get("eval_seconds", 0.0) for h in history) / len(history)


def _personalization(row: dict[str, Any]) -> dict[str, float]:
    """Paired per-user comparison at an evaluation round: serving with the gated adaptation vs the population
    values, over all users and over the users whose gate kept their adaptation ({} without adaptation)."""
    if "gate" not in row:
        return {}
    kept = row["gate"]["kept"]
    out = {"kept": kept}
    for stage in ("val", "test"):
        served, population = row.get(stage, {}), row.get(f"{stage}-population", {})
        if "ndcg@10" in served and "ndcg@10" in population:
            out[f"{stage}/served"] = served["ndcg@10"]
            out[f"{stage}/population"] = population["ndcg@10"]
            if kept:
                out[f"{stage}/kept-served"] = row[f"{stage}-kept"]["ndcg@10"] / kept  # means over kept users
                out[f"{stage}/kept-population"] = row[f"{stage}-kept-population"]["ndcg@10"] / kept
    return out


def rounds_to_reach(curve: list[dict[str, Any]], reference: float, stage: str) -> dict[str, int | None]:
    """The first evaluated round whose ``stage`` NDCG@10 reaches each share of ``reference`` (None: never)."""
    return {
        f"{share:.0%}": next(
            (c["round"] for c in curve if c.get(f"{stage}/ndcg@10", -1) >= share * reference), None
        )
        for share in REACH
    }


def _train_rounds_per_second(history: list[dict[str, Any]], users_per_node: int) -> float:
    rows = [h for h in history if "val" not in h]  # rounds without evaluation
    seconds = sum(h["seconds"] for h in rows)
    return sum(h["valid"] * users_per_node for h in rows) / seconds if seconds else float("nan")


def _short_run(
    base: FederatedConfig, out: Path, cpus: int | None, rounds: int, **overrides: Any
) -> list[dict[str, Any]]:
    """The round history of a few rounds of ``base`` with ``overrides``, without evaluation."""
    cfg = replace(base, num_rounds=rounds, eval_every=10**6, out_dir=str(out), **overrides)
    return run_simulation(cfg, num_cpus=cpus)["history"]


def _device_bytes(cfg: FederatedConfig, store: Path) -> float:
    """Median upload bytes of ``BYTES_USERS`` one-user devices (a deployment's devices) in their first round:
    the device code of every run, without the Flower transport."""
    one = replace(cfg, users_per_node=1)
    shared = initial_shared(one)
    users = cached_log(one.dataset, one.data_dir).num_users
    sizes = [
        sum(v.nbytes for v in HostedUsers(one, p, users, store / str(p)).train(shared, 1).update.values())
        for p in range(0, users, max(users // BYTES_USERS, 1))[:BYTES_USERS]
    ]
    return float(sorted(sizes)[len(sizes) // 2])


def run_dataset(dataset: str, args: argparse.Namespace, out: Path, done: set[str]) -> list[dict[str, Any]]:
    """All comparisons for one dataset; skips those already in ``done``."""
    base = FederatedConfig(
        dataset=dataset,
        num_rounds=args.rounds,
        eval_every=args.eval_every,
        seed=args.seed,
        max_len=args.max_len,
    )
    rows = []
    out = out / Path(dataset).name.replace(".", "_")  # a dataset name or an event file path

    def record(kind: str, **row: Any) -> None:
        row = {"dataset": dataset, "kind": kind, **row}
        rows.append(row)
        with (RESULTS / f"{args.name}_runs.jsonl").open("a") as fh:
            fh.write(json.dumps(row, default=float) + "\n")

    if f"{dataset}/centralized" not in done and "centralized" in args.parts:
        same_model = {"max_len": base.max_len, "d_model": base.d_model}
        central = train_and_report(
            dataset,
            "tmepsr",
            out / "centralized",
            overrides=same_model,
            progress=False,
            seed=args.seed,
            batch_size=32,
            patience=20,  # past the popularity plateau (README)
            resume=(out / "centralized" / "train_state.pt").exists(),
        )
        record(
            "centralized",
            key=f"{dataset}/centralized",
            test=central["test"],
            val=central["val"],
            epochs=central["best_epoch"],
            stopped=central["stopped"],
        )
    for variant in args.variants if "federated" in args.parts else ():
        key = f"{dataset}/federated/{variant.split(' (')[0]}"
        if key in done:
            continue
        cfg = replace(base, **VARIANTS[variant], out_dir=str(out / _folder(variant)))
        history = run_simulation(cfg, num_cpus=args.cpus)["history"]
        evaluated = [h for h in history if "val" in h]
        record(
            "federated",
            key=key,
            variant=variant,
            config=asdict(cfg),
            test=evaluated[-1].get("test", {}),
            val=evaluated[-1]["val"],
            curve=[_point(h) for h in evaluated],
            seconds_per_round=_seconds_per_round(history),
            upload_bytes_per_device=history[0]["upload_bytes_per_device"],
            personalization=_personalization(evaluated[-1]),
            epsilon=history[-1].get("epsilon"),  # central DP: the accountant's epsilon after the last round
        )
    if "personalization" in args.parts:
        cfg = replace(base, out_dir=str(out / _folder("default")))
        key = f"{dataset}/personalization/default/gate_z={cfg.gate_z},gate_events={cfg.gate_events}"
        loaded = load_server_checkpoint(cfg.out_dir)
        if key not in done and loaded is not None:
            shared, last_round = loaded[0], loaded[1]
            device = HostedUsers(
                cfg, 0, 1, Path(cfg.out_dir) / "personalization-devices"
            )  # every user, one node
            row: dict[str, dict[str, float]] = {}
            for name, value in device.evaluate(shared, "val,test", last_round).metrics.items():
                if "/" in name:  # "<stage>/<metric>" (not the count of users with unreadable stores)
                    prefix, metric = name.split("/", 1)
                    row.setdefault(prefix, {})[metric] = value
            record(
                "personalization",
                key=key,
                round=last_round,
                gate_z=cfg.gate_z,
                gate_events=cfg.gate_events,
                adapt_epochs=cfg.adapt_epochs,
                personalization=_personalization(row),
                of="default",
            )
    for upload, decoys, compress, fraction, *how in UPLOADS if "bytes" in args.parts else ():
        sampling = how[0] if how else "uniform"  # the rows measured before importance sampling existed
        budget = how[1] if len(how) > 1 else "per-matrix"
        key = f"{dataset}/bytes/{upload}/{decoys}/{compress}/{fraction:g}" + "".join(f"/{h}" for h in how)
        if key in done:
            continue
        fields = {
            "upload": upload,
            "decoy_rows": decoys,
            "compress": compress,
            "row_fraction": fraction,
            "sparse_sampling": sampling,
            "row_budget": budget,
        }
        cfg = replace(base, **fields)
        record("bytes", key=key, **fields, upload_bytes_per_device=_device_bytes(cfg, out / "bytes"))
    for per_node in (1, args.users_per_node) if "throughput" in args.parts else ():
        key = f"{dataset}/throughput/{per_node}"
        if key in done:
            continue
        history = _short_run(base, out / f"throughput-{per_node}", args.cpus, 3, users_per_node=per_node)
        record(
            "throughput",
            key=key,
            users_per_node=per_node,
            updates_per_second=_train_rounds_per_second(history[1:], per_node),
        )
    return rows


def centralized_references(names: list[str], results: Path = RESULTS) -> list[dict[str, Any]]:
    """The centralized rows of other runs of this benchmark (``<results>/<name>_runs.jsonl``), each marked with
    the run it came from (``"from"``): a federated run's reference when its centralized seeds ran separately."""
    return [r | {"from": name} for name in names for r in recorded_rows(name, "centralized", results)]


def centralized_mean(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Mean validation and test NDCG@10 of the centralized rows among ``rows`` (None: there are none)."""
    central = [r for r in rows if r["kind"] == "centralized"]
    if not central:
        return None
    return {stage: sum(r[stage]["ndcg@10"] for r in central) / len(central) for stage in ("val", "test")}


def summarise(runs: list[dict[str, Any]]) -> str:
    """The markdown table: test NDCG@10 as a share of centralized (the mean of the dataset's centralized rows
    when there are several, e.g. seeds), rounds to 80/90/95% of it (validation and test), the paired
    personalization result, upload size and speed."""
    lines = [
        "| dataset | run | rounds | val NDCG@10 | test NDCG@10 | x centralized (test) | rounds to 80/90/95% val | rounds to 80/90/95% test "
        "| adaptation kept | served / population NDCG@10 (test; kept users) | upload KB/device | s/round |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset in sorted({r["dataset"] for r in runs}):
        sub = [r for r in runs if r["dataset"] == dataset]
        central = centralized_mean(sub)
        for r in sub:
            val, test = r.get("val", {}), r.get("test", {})
            cells: list[Any] = [None] * 10
            if r["kind"] == "centralized":
                origin = f", from {r['from']}" if "from" in r else ""
                name = f"centralized ({r['stopped']}, best epoch {r['epochs']}{origin})"
                cells[1:4] = [val.get("ndcg@10"), test.get("ndcg@10"), test["ndcg@10"] / central["test"]]
            elif r["kind"] == "federated":
                name = f"federated: {r['variant']}" + (
                    f" (epsilon {r['epsilon']:.3g})" if r.get("epsilon") is not None else ""
                )
                cells[0] = r["curve"][-1]["round"] if r["curve"] else None
                cells[1:3] = [val.get("ndcg@10"), test.get("ndcg@10")]
                if central:
                    cells[3] = test.get("ndcg@10", float("nan")) / central["test"]
                    for i, stage in ((4, "val"), (5, "test")):
                        reach = rounds_to_reach(r["curve"], central[stage], stage)
                        cells[i] = "/".join("-" if v is None else str(v) for v in reach.values())
                cells[6:8] = _personalization_cells(r.get("personalization") or {})
                kb = r.get("upload_bytes_per_device")
                cells[8:10] = [None if kb is None else kb / 1000, r.get("seconds_per_round")]
            elif r["kind"] == "personalization":
                name = (
                    f"{r.get('of', 'default')}'s final model, gate z {r['gate_z']} on {r['gate_events']} events"
                    f" (round {r['round']}, re-evaluated)"
                )
                cells[6:8] = _personalization_cells(r["personalization"])
            elif r["kind"] == "bytes":
                name = (
                    f"one-user device: upload {r['upload']} + {r['decoy_rows']} decoys"
                    + (f", {r['compress']}" if r.get("compress", "none") != "none" else "")
                    + (f", {r['row_fraction']:.0%} of other rows" if r.get("row_fraction", 1.0) < 1 else "")
                    + SAMPLING_LABELS[r.get("sparse_sampling", "uniform")]
                    + (", balanced" if r.get("row_budget", "per-matrix") == "balanced" else "")
                )
                cells[8] = r["upload_bytes_per_device"] / 1000
            else:
                name = f"{r['users_per_node']} user(s) per node: {r['updates_per_second']:.3g} updates/s"
            lines.append(f"| {dataset} | {name} | " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _personalization_cells(pers: dict[str, float]) -> list[Any]:
    """Share of users whose gate kept their adaptation; served / population test NDCG@10 (all; kept users)."""
    if not pers:
        return [None, None]
    ratio = pers["test/served"] / pers["test/population"]
    kept = (
        f"{pers['test/kept-served'] / pers['test/kept-population']:.3f}x"
        if pers.get("test/kept-population")
        else f"{pers.get('test/kept-served', 0):.3f} vs 0"
    )
    return [f"{pers['kept']:.0%}", f"{ratio:.3f}x; {kept}"]


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "" if value is None or value != value else f"{value:.4g}"


def _plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in runs})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for r in runs:
            if r["dataset"] == dataset and r["kind"] == "federated" and r["curve"]:
                rounds = [c["round"] for c in r["curve"]]
                ax.plot(rounds, [c.get("val/ndcg@10") for c in r["curve"]], marker=".", label=r["variant"])
        central = centralized_mean([r for r in runs if r["dataset"] == dataset])
        if central:
            ax.axhline(central["val"], color="k", linestyle="--", label="centralized (val)")
        ax.set_title(f"{dataset}: validation NDCG@10")
        ax.set_xlabel("round")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["movielens-latest-small", "movielens-100k"])
    parser.add_argument("--rounds", type=int, default=400, help="federated rounds per run")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--users-per-node", type=int, default=10, help="for the throughput comparison")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="comparisons to run")
    parser.add_argument("--cpus", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-len",
        type=int,
        default=FederatedConfig.max_len,
        help="events per training window and per input, for the centralized model and every federated run",
    )
    parser.add_argument("--name", default="federated")
    parser.add_argument(
        "--out",
        help="simulation outputs: checkpoints and the devices' stores, whose keys depend on the seed, so two"
        " runs must not share it (default: runs/bench_federated/<name>)",
    )
    parser.add_argument(
        "--centralized-from",
        nargs="+",
        default=[],
        metavar="NAME",
        help="also use the centralized rows of these runs (their --name) as the reference: ratios and rounds to"
        " 80/90/95%% then divide by the mean of every centralized row of the dataset (e.g. several seeds)",
    )
    args = parser.parse_args(argv)
    references = centralized_references(args.centralized_from)
    RESULTS.mkdir(exist_ok=True)
    runs_path = RESULTS / f"{args.name}_runs.jsonl"
    runs = [json.loads(line) for line in runs_path.read_text().splitlines()] if runs_path.exists() else []
    done = {r["key"] for r in runs}
    for dataset in args.datasets:
        runs += run_dataset(dataset, args, Path(args.out or f"runs/bench_federated/{args.name}"), done)
        shown = runs + references  # the references stay out of this run's JSONL (they are recorded in theirs)
        (RESULTS / f"{args.name}.json").write_text(json.dumps(shown, indent=2, default=float) + "\n")
        (RESULTS / f"{args.name}.md").write_text(summarise(shown))
        _plot(shown, RESULTS / f"{args.name}.png")
    print(summarise(runs + references))


if __name__ == "__main__":
    main()
