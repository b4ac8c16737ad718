"""Benchmarks 1 and 2 of the model issue, one harness:

* ``--suite time-explanations`` (default): full TME-PSR vs each ablation vs SASRec vs popularity on
  timestamped datasets with explanations, several seeds, same split, one run;
* ``--suite backbone``: the LRURec-equivalent, the multihead LRU and SASRec with LRURec's settings on the
  order-only ML-1M and Beauty, beside LRURec's published numbers, within a stated compute budget.

Every finished run is appended to ``<name>_runs.jsonl`` at once (a rerun skips finished runs), and the
summary (``<name>.json``, ``<name>.md``, ``<name>.png``) is rewritten after each run.
Run: ``python -m simulations.bench_accuracy --suite backbone --max-minutes 8``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simulations.train import train_and_report

RESULTS = Path(__file__).parent / "results"

SUITES: dict[str, dict[str, Any]] = {
    "time-explanations": {
        "datasets": ["movielens-100k", "amazon-musical-instruments-5core", "amazon-beauty-5core"],
        "models": ["tmepsr", "tmepsr-no-time", "tmepsr-one-head", "tmepsr-no-explanations", "tmepsr-fixed-mi",
                   "sasrec", "popularity"],
        "seeds": [0, 1, 2],
    },
    "backbone": {
        "datasets": ["movielens-1m-lrurec", "amazon-beauty-sasrec-lrurec"],
        "models": ["lrurec", "multihead-lru", "sasrec"],
        "seeds": [0],
    },
}  # fmt: skip
# Per-dataset settings. ML: LRURec's (max length 200, dropout 0.2); Amazon: max length 50, dropout 0.6.
DATASET_SETTINGS: dict[str, dict[str, Any]] = {
    "movielens-100k": {"model": {"max_len": 200, "dropout": 0.2}, "train": {"batch_size": 64}},
    "amazon-musical-instruments-5core": {
        "model": {"max_len": 50, "dropout": 0.6},
        "train": {"batch_size": 64},
    },
    "amazon-beauty-5core": {"model": {"max_len": 50, "dropout": 0.6}, "train": {"batch_size": 128}},
    "movielens-1m-lrurec": {"model": {"max_len": 200, "dropout": 0.2}, "train": {"batch_size": 128}},
    "amazon-beauty-sasrec-lrurec": {"model": {"max_len": 50, "dropout": 0.6}, "train": {"batch_size": 128}},
}
# LRURec Table 3 (full ranking, history masked): NDCG@10 / Recall@10
PUBLISHED = {
    ("movielens-1m-lrurec", "sasrec"): (0.19021, 0.31810),
    ("movielens-1m-lrurec", "lrurec"): (0.19298, 0.32636),
    ("amazon-beauty-sasrec-lrurec", "sasrec"): (0.02917, 0.05043),
    ("amazon-beauty-sasrec-lrurec", "lrurec"): (0.03088, 0.05284),
}
METRICS = ("ndcg@10", "recall@10", "ndcg@20", "recall@20", "mrr", "expl_recall@10", "expl_ndcg@10")


def _load_runs(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per (dataset, model), with ratios against SASRec/popularity."""
    rows = []
    keys = sorted({(r["dataset"], r["model"]) for r in runs}, key=lambda k: (k[0], k[1]))
    for dataset, model in keys:
        group = [r for r in runs if (r["dataset"], r["model"]) == (dataset, model)]
        row: dict[str, Any] = {"dataset": dataset, "model": model, "seeds": len(group),
                               "parameters": group[0]["parameters"],
                               "epochs": [r["best_epoch"] for r in group], "stopped": [r["stopped"] for r in group],
                               "minutes": float(np.mean([r["seconds"] for r in group]) / 60)}  # fmt: skip
        for m in METRICS:
            vals = [r["test"][m] for r in group if m in r["test"]]
            if vals:
                row[m] = float(np.mean(vals))
                row[m + "_std"] = float(np.std(vals))
        rows.append(row)
    by = {(r["dataset"], r["model"]): r for r in rows}
    for r in rows:
        sas = by.get((r["dataset"], "sasrec"))
        if sas and "ndcg@10" in r:
            r["ndcg@10_vs_sasrec"] = r["ndcg@10"] / sas["ndcg@10"]
        pop = by.get((r["dataset"], "popularity"))
        if pop and "expl_recall@10" in r and "expl_recall@10" in pop:
            r["expl_recall@10_vs_popularity"] = r["expl_recall@10"] / pop["expl_recall@10"]
        if (r["dataset"], r["model"]) in PUBLISHED:
            ndcg, recall = PUBLISHED[(r["dataset"], r["model"])]
            r["published_ndcg@10"], r["published_recall@10"] = ndcg, recall
            r["ndcg@10_vs_published"] = r["ndcg@10"] / ndcg
    return rows


def _markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| dataset | model | seeds | NDCG@10 | Recall@10 | x SASRec NDCG@10 | expl R@10 | "
             "expl x popularity | published NDCG@10 | params | epochs (stop) |", "|" + "---|" * 11]  # fmt: skip

    def cell(r: dict[str, Any], m: str) -> str:
        return f"{r[m]:.4f} ± {r[m + '_std']:.4f}" if m in r else ""

    for r in rows:
        stops = ",".join(sorted(set(r["stopped"])))
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['seeds']} | {cell(r, 'ndcg@10')} | {cell(r, 'recall@10')} | "
            f"{r.get('ndcg@10_vs_sasrec', float('nan')):.2f} | {cell(r, 'expl_recall@10')} | "
            f"{r.get('expl_recall@10_vs_popularity', float('nan')):.2f} | {r.get('published_ndcg@10', '')} | "
            f"{r['parameters']:,} | {r['epochs']} ({stops}) |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(2, len(datasets), figsize=(5 * len(datasets), 8), squeeze=False)
    for col, ds in enumerate(datasets):
        sub = [r for r in rows if r["dataset"] == ds and "ndcg@10" in r]
        ax = axes[0][col]
        ax.bar([r["model"] for r in sub], [r["ndcg@10"] for r in sub], yerr=[r["ndcg@10_std"] for r in sub])
        ax.set_title(f"{ds}: test NDCG@10")
        ax.tick_params(axis="x", rotation=60)
        ax = axes[1][col]
        for run in runs:
            if run["dataset"] == ds and run.get("history") and run["seed"] == min(r["seed"] for r in runs):
                curve = [(h["seconds"] / 60, h["val"]["ndcg@10"]) for h in run["history"] if "val" in h]
                ax.plot(*zip(*curve, strict=True), label=run["model"])
        ax.set_xlabel("minutes")
        ax.set_ylabel("validation NDCG@10")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _header(args: argparse.Namespace) -> str:
    return (
        f"Suite `{args.suite}`: test metrics, mean ± std over seeds; leave-one-out, full ranking, history masked; "
        f"early stopping on validation NDCG@10 (patience {args.patience}); budget {args.max_minutes or 'none'} "
        f"min/run (see the README for per-dataset budgets) on {args.device} with {torch.get_num_threads()} threads."
    )


def _write_summary(runs: list[dict[str, Any]], name: str, header: str) -> None:
    rows = summarise(runs)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2, default=float) + "\n")
    (RESULTS / f"{name}.md").write_text(_markdown(rows, header))
    _plot(rows, runs, RESULTS / f"{name}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=list(SUITES), default="time-explanations")
    parser.add_argument("--datasets", nargs="+", help="default: the suite's")
    parser.add_argument("--models", nargs="+", help="default: the suite's")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: the suite's")
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--max-minutes", type=float, default=None, help="compute budget per training run")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (the same script reaches convergence on a GPU)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--name", help="result file prefix (default: the suite name)")
    parser.add_argument("--report", action="store_true", help="only rewrite the summary from the runs file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = SUITES[args.suite]
    name = args.name or args.suite
    RESULTS.mkdir(exist_ok=True)
    runs_path = RESULTS / f"{name}_runs.jsonl"
    runs = _load_runs(runs_path)
    done = {(r["dataset"], r["model"], r["seed"]) for r in runs}
    if args.report:
        _write_summary(runs, name, _header(args))
        return
    for dataset in args.datasets or suite["datasets"]:
        settings = DATASET_SETTINGS.get(dataset, {"model": {}, "train": {}})
        for seed in args.seeds or suite["seeds"]:
            for model in args.models or suite["models"]:
                if (dataset, model, seed) in done:
                    continue
                result = train_and_report(
                    dataset, model, RESULTS / "checkpoints" / name / f"{dataset}-{model}-{seed}",
                    overrides=settings["model"], progress=True, seed=seed, device=args.device,
                    max_epochs=args.max_epochs, patience=args.patience, max_minutes=args.max_minutes,
                    **settings["train"],
                )  # fmt: skip
                result["seed"] = seed
                with runs_path.open("a") as fh:
                    fh.write(json.dumps(result, default=float) + "\n")
                runs.append(result)
                _write_summary(runs, name, _header(args))
                print(
                    f"done {dataset} {model} seed {seed}: test ndcg@10 {result['test']['ndcg@10']:.4f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
