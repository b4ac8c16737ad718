"""Federated benchmark, side by side in one run per dataset:

* centralized TME-PSR (same model size, compute budget) vs federated TME-PSR with the card's split, with the
  interest heads also averaged (``heads-prior``) and with everything shared, through Flower's simulation
  engine: NDCG@10 / Recall@10 and explanation metrics per evaluation round;
* upload bytes per device per round for dense, sparse and sparse-with-decoys updates, with and without int8
  compression (and the accuracy of a card run with sparse int8 uploads);
* simulation throughput (device updates per second) for one user per node vs virtual users per node.

Results are appended to ``simulations/results/<name>_runs.jsonl`` as they finish and summarised in
``<name>.json``, ``<name>.md`` and ``<name>.png``.
Run: ``python -m simulations.bench_federated --datasets movielens-latest-small movielens-100k``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from shared_model.config import FederatedConfig
from simulations.simulate import run_simulation
from simulations.train import train_and_report

RESULTS = Path(__file__).parent / "results"
# federated runs compared with the centralized one: name -> FederatedConfig overrides
VARIANTS: dict[str, dict[str, Any]] = {
    "card": {"split": "card"},
    "heads-prior": {"split": "heads-prior"},
    "all-shared": {"split": "all-shared"},
    "card, sparse int8 upload": {"split": "card", "upload": "sparse", "compress": "int8"},
    "card + adaptation": {"split": "card", "adapt_epochs": 5},
    "card, FedAdam": {"split": "card", "server_optimizer": "fedadam", "server_lr": 0.01},
    "card, 20 local epochs": {"split": "card", "local_epochs": 20},
    "heads-prior + adaptation": {"split": "heads-prior", "adapt_epochs": 5},
}
PARTS = ("centralized", "federated", "bytes", "throughput")
UPLOADS = (("dense", 0, "none"), ("sparse", 0, "none"), ("sparse", 50, "none"), ("sparse", 0, "int8"),
           ("sparse", 50, "int8"))  # fmt: skip


def _final(history: list[dict[str, Any]], stage: str) -> dict[str, float]:
    return next((h[stage] for h in reversed(history) if stage in h), {})


def _train_rounds_per_second(history: list[dict[str, Any]], users_per_node: int) -> float:
    rows = [h for h in history if "val" not in h]  # rounds without evaluation
    seconds = sum(h["seconds"] for h in rows)
    return sum(h["valid"] * users_per_node for h in rows) / seconds if seconds else float("nan")


def run_dataset(dataset: str, args: argparse.Namespace, out: Path, done: set[str]) -> list[dict[str, Any]]:
    """All comparisons for one dataset; skips those already in ``done``."""
    base = FederatedConfig(dataset=dataset, num_rounds=args.rounds, fraction_train=args.fraction,
                           eval_every=args.eval_every, seed=args.seed)  # fmt: skip
    rows = []
    out = out / Path(dataset).name.replace(".", "_")  # a dataset name or an event file path

    def record(kind: str, **row: Any) -> None:
        row = {"dataset": dataset, "kind": kind, **row}
        rows.append(row)
        with (RESULTS / f"{args.name}_runs.jsonl").open("a") as fh:
            fh.write(json.dumps(row, default=float) + "\n")

    if f"{dataset}/centralized" not in done and "centralized" in args.parts:
        central = train_and_report(
            dataset, "tmepsr", out / "centralized", overrides={"max_len": base.max_len, "d_model": base.d_model},
            progress=False, seed=args.seed, max_minutes=args.central_minutes, batch_size=64,
        )  # fmt: skip
        record("centralized", key=f"{dataset}/centralized", test=central["test"], val=central["val"],
               epochs=central["best_epoch"], stopped=central["stopped"])  # fmt: skip
    for variant in args.variants if "federated" in args.parts else ():
        key = f"{dataset}/federated/{variant}"
        if key in done:
            continue
        cfg = replace(
            base, **VARIANTS[variant], out_dir=str(out / variant.replace(", ", "-").replace(" ", "-"))
        )
        history = run_simulation(cfg, num_cpus=args.cpus)["history"]
        record("federated", key=key, split=variant, config=asdict(cfg), test=_final(history, "test"),
               val=_final(history, "val"), curve=[{"round": h["round"], **h["val"]} for h in history if "val" in h],
               upload_bytes_per_device=history[0]["upload_bytes_per_device"],
               updates_per_second=_train_rounds_per_second(history, 1))  # fmt: skip
    for upload, decoys, compress in UPLOADS if "bytes" in args.parts else ():
        key = f"{dataset}/bytes/{upload}/{decoys}" + ("" if compress == "none" else f"/{compress}")
        if key in done:
            continue
        cfg = replace(base, upload=upload, decoy_rows=decoys, compress=compress, num_rounds=1,
                      eval_every=10**6, out_dir=str(out / f"bytes-{upload}-{decoys}-{compress}"))  # fmt: skip
        history = run_simulation(cfg, num_cpus=args.cpus)["history"]
        record("bytes", key=key, upload=upload, decoy_rows=decoys, compress=compress,
               upload_bytes_per_device=history[0]["upload_bytes_per_device"])  # fmt: skip
    for per_node in (1, args.users_per_node) if "throughput" in args.parts else ():
        key = f"{dataset}/throughput/{per_node}"
        if key in done:
            continue
        cfg = replace(base, users_per_node=per_node, num_rounds=3, eval_every=10**6,
                      out_dir=str(out / f"throughput-{per_node}"))  # fmt: skip
        history = run_simulation(cfg, num_cpus=args.cpus)["history"]
        record("throughput", key=key, users_per_node=per_node,
               updates_per_second=_train_rounds_per_second(history[1:], per_node))  # fmt: skip
    return rows


def _cell(value: float | None) -> str:
    return "" if value is None or value != value else f"{value:.4g}"


def summarise(runs: list[dict[str, Any]]) -> str:
    lines = ["| dataset | run | NDCG@10 | Recall@10 | x centralized NDCG@10 | expl R@10 | upload KB/device | updates/s |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for dataset in sorted({r["dataset"] for r in runs}):
        sub = [r for r in runs if r["dataset"] == dataset]
        central = next((r for r in sub if r["kind"] == "centralized"), None)
        for r in sub:
            test = r.get("test", {})
            ratio = (
                test["ndcg@10"] / central["test"]["ndcg@10"]
                if central and "ndcg@10" in test
                else float("nan")
            )
            name = {"centralized": "centralized", "federated": f"federated, split {r.get('split')}",
                    "bytes": f"upload {r.get('upload')} + {r.get('decoy_rows')} decoys"
                             + (f", {r['compress']}" if r.get("compress", "none") != "none" else ""),
                    "throughput": f"{r.get('users_per_node')} user(s) per node"}[r["kind"]]  # fmt: skip
            kb = r.get("upload_bytes_per_device")
            cells = (test.get("ndcg@10"), test.get("recall@10"), ratio, test.get("expl_recall@10"),
                     None if kb is None else kb / 1000, r.get("updates_per_second"))  # fmt: skip
            lines.append(f"| {dataset} | {name} | " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in runs})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for r in runs:
            if r["dataset"] == dataset and r["kind"] == "federated" and r["curve"]:
                ax.plot(
                    [c["round"] for c in r["curve"]],
                    [c["ndcg@10"] for c in r["curve"]],
                    marker="o",
                    label=r["split"],
                )
            if r["dataset"] == dataset and r["kind"] == "centralized":
                ax.axhline(r["val"]["ndcg@10"], color="k", linestyle="--", label="centralized (val)")
        ax.set_title(f"{dataset}: validation NDCG@10")
        ax.set_xlabel("round")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["movielens-latest-small", "movielens-100k"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.1, help="devices sampled per round")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--central-minutes", type=float, default=3.0, help="budget of the centralized run")
    parser.add_argument("--users-per-node", type=int, default=10, help="for the throughput comparison")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="comparisons to run")
    parser.add_argument("--cpus", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="federated")
    parser.add_argument(
        "--out", default="runs/bench_federated", help="simulation outputs (checkpoints, stores)"
    )
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    runs_path = RESULTS / f"{args.name}_runs.jsonl"
    runs = [json.loads(line) for line in runs_path.read_text().splitlines()] if runs_path.exists() else []
    done = {r["key"] for r in runs}
    for dataset in args.datasets:
        runs += run_dataset(dataset, args, Path(args.out), done)
        (RESULTS / f"{args.name}.json").write_text(json.dumps(runs, indent=2, default=float) + "\n")
        (RESULTS / f"{args.name}.md").write_text(summarise(runs))
        _plot(runs, RESULTS / f"{args.name}.png")
    print(summarise(runs))


if __name__ == "__main__":
    main()
