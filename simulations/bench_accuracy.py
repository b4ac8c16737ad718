"""The accuracy benchmarks (backbone and time/explanation suites), one harness, every model trained to early stopping:

* ``--suite time-explanations`` (default): full TME-PSR vs each ablation vs the LRURec-equivalent, SASRec,
  GRU4Rec and popularity on timestamped datasets with explanations, several seeds, same split;
* ``--suite backbone``: the LRURec-equivalent, the multihead LRU, SASRec and GRU4Rec with LRURec's settings
  on the order-only ML-1M split, beside LRURec's published numbers;
* ``--suite tuning``: the baselines' small validation grid on ML-1M (lr, dropout, blocks), so that the
  comparison is against tuned baselines. A model name may carry overrides of any ModelConfig or TrainConfig
  field: ``sasrec[lr=0.002,dropout=0.1]``.

Early stopping on validation NDCG@10 with ``--patience`` evaluations (default 10). ``--max-minutes`` is only a
safety net: a run it cuts, or one that reaches ``--max-epochs``, is marked and does not count in the means.
Every run saves its whole training state after each epoch (under ``--state-dir``) and a rerun resumes it;
every finished run is appended to ``<name>_runs.jsonl.gz`` at once (a rerun skips it) and the summary
(``<name>.json``, ``<name>.md``, ``<name>.png``) is rewritten after each run. Several workers may share a
suite: each run is claimed with a lock file first.
Run: ``python -m simulations.bench_accuracy --suite backbone``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared_model.config import ModelConfig, TrainConfig
from simulations.train import train_and_report

RESULTS = Path(__file__).parent / "results"

SUITES: dict[str, dict[str, Any]] = {
    "time-explanations": {
        "datasets": [
            "movielens-100k",
            "amazon-musical-instruments-5core",
            "movielens-latest-small",
            "amazon-beauty-5core",
        ],
        "models": [
            "popularity",
            "tmepsr",
            "lrurec",
            "sasrec",
            "gru4rec",
            "tmepsr-no-time",
            "tmepsr-one-head",
            "tmepsr-no-explanations",
            "tmepsr-fixed-mi",
        ],
        "seeds": [0, 1, 2],
    },
    "backbone": {
        "datasets": ["movielens-1m-lrurec"],
        "models": ["lrurec", "sasrec", "multihead-lru", "gru4rec"],
        "seeds": [0],
    },
    "tuning": {
        "datasets": ["movielens-1m-lrurec"],
        # first LRURec's own architecture details: 2 complex states per channel, LayerNorm on the embeddings
        "models": [
            "lrurec[lru_state_expansion=2,embed_norm=true]",
            "sasrec[lr=0.002]",
            "lrurec[lr=0.002]",
            "sasrec[dropout=0.1]",
            "lrurec[dropout=0.1]",
            "sasrec[num_blocks=3]",
            "lrurec[num_blocks=3]",
        ],
        "seeds": [0],
    },
}
# Per-dataset settings. ML: LRURec's (max length 200, dropout 0.2); Amazon: max length 50, dropout 0.6.
DATASET_SETTINGS: dict[str, dict[str, Any]] = {
    "movielens-100k": {"model": {"max_len": 200, "dropout": 0.2}, "train": {"batch_size": 64}},
    # latest-small sits on a popularity plateau for about 400 steps before it learns the sequences (measured at
    # max_len 50: batch 128 with patience 10 stopped there at val NDCG@10 0.017; batch 32 with patience 20 took
    # off at epoch ~20 and reached 0.053): small batches and a longer patience
    "movielens-latest-small": {
        "model": {"max_len": 200, "dropout": 0.2},
        "train": {"batch_size": 32, "patience": 20},
    },
    # Musical Instruments also sits on a plateau (validation NDCG@10 about 0.046, popularity's 0.044) for 10-30
    # epochs before the sequences take off (seed 0: 0.061 at epoch 57); patience 10 stopped two of three TME-PSR
    # seeds on it (best epochs 6 and 27) and patience 20 a one-head run (best epoch 1), so the Amazon sets get 30
    "amazon-musical-instruments-5core": {
        "model": {"max_len": 50, "dropout": 0.6},
        "train": {"batch_size": 64, "patience": 30},
    },
    "amazon-beauty-5core": {
        "model": {"max_len": 50, "dropout": 0.6},
        "train": {"batch_size": 128, "patience": 30},
    },
    # LRURec's settings: max_len 200, d 64, 2 blocks, dropout 0.2, AdamW 1e-3, weight decay 1e-2, batch 128;
    # validation every 3 epochs (LRURec: every 500 steps, about 9 of its epochs), so patience 10 = 30 epochs
    "movielens-1m-lrurec": {
        "model": {"max_len": 200, "dropout": 0.2},
        "train": {"batch_size": 128, "eval_every": 3},
    },
    "amazon-beauty-sasrec-lrurec": {"model": {"max_len": 50, "dropout": 0.6}, "train": {"batch_size": 128}},
}
# LRURec Table 3 (full ranking, history masked): NDCG@10 / Recall@10
PUBLISHED = {
    ("movielens-1m-lrurec", "sasrec"): (0.19021, 0.31810),
    ("movielens-1m-lrurec", "lrurec"): (0.19298, 0.32636),
    ("amazon-beauty-sasrec-lrurec", "sasrec"): (0.02917, 0.05043),
    ("amazon-beauty-sasrec-lrurec", "lrurec"): (0.03088, 0.05284),
}
# expl_*: whole vocabulary given the true item (the paper's); expl_attested_*: among the ids attested for the
# item (what is shown); item_expl_*: the item-aware popularity baseline (popularity rows)
METRICS = (
    "ndcg@10",
    "recall@10",
    "ndcg@20",
    "recall@20",
    "mrr",
    "expl_recall@10",
    "expl_ndcg@10",
    "expl_attested_recall@10",
    "expl_attested_ndcg@10",
    "item_expl_ndcg@10",
)


COUNTED_STOPS = ("patience", "n/a")  # early stopping (or nothing to train): the runs a mean may use


def parse_model(spec: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``preset[key=value,...]`` -> (preset, ModelConfig overrides, TrainConfig overrides)."""
    preset, _, rest = spec.partition("[")
    model_keys = {f.name for f in fields(ModelConfig)}
    train_keys = {f.name for f in fields(TrainConfig)}
    model, train = {}, {}
    for item in filter(None, rest.rstrip("]").split(",")):
        key, _, raw = item.partition("=")
        value = json.loads(raw)
        if key in model_keys:
            model[key] = value
        elif key in train_keys:
            train[key] = value
        else:
            raise ValueError(f"{spec}: {key!r} is neither a ModelConfig nor a TrainConfig field")
    return preset, model, train


def _runs_path(name: str) -> Path:
    """Where suite ``name`` keeps its finished runs."""
    return RESULTS / f"{name}_runs.jsonl.gz"


def _load_runs(path: Path) -> list[dict[str, Any]]:
    """Every finished run of a suite's ``<name>_runs.jsonl.gz`` (gzip members, one JSON line each)."""
    if not path.exists():
        return []
    with gzip.open(path, "rt") as fh:
        return [json.loads(line) for line in fh]


def _append_run(path: Path, run: dict[str, Any]) -> None:
    """Append one finished run as a gzip member of its own, in one write (workers may share the file): a run's
    per-epoch history is most of its bytes and compresses about 5x."""
    with path.open("ab") as fh:
        fh.write(gzip.compress((json.dumps(run, default=float) + "\n").encode()))


def _claim(lock: Path) -> bool:
    """Take the lock of one run (a file holding the worker's pid); a lock whose worker died is taken over."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or 0), 0)
                return False  # a live worker has it
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over the converged seeds per (dataset, model), with ratios against the
    tuned SASRec (its variant with the best validation NDCG@10) and popularity. Runs cut by a budget or by
    ``max_epochs`` are listed (``stopped``) but not averaged."""
    rows = []
    keys = sorted({(r["dataset"], r["model"]) for r in runs}, key=lambda k: (k[0], k[1]))
    for dataset, model in keys:
        group = [r for r in runs if (r["dataset"], r["model"]) == (dataset, model)]
        counted = [r for r in group if r["stopped"] in COUNTED_STOPS]
        row: dict[str, Any] = {
            "dataset": dataset,
            "model": model,
            "seeds": len(counted),
            "parameters": group[0]["parameters"],
            "epochs": [r["best_epoch"] for r in group],
            "stopped": [r["stopped"] for r in group],
            "minutes": float(np.mean([r["seconds"] for r in group]) / 60),
        }
        for m in METRICS:
            vals = [r["test"][m] for r in counted if m in r["test"]]
            if vals:
                row[m] = float(np.mean(vals))
                row[m + "_std"] = float(np.std(vals))
        if counted:
            row["val_ndcg@10"] = float(np.mean([r["val"]["ndcg@10"] for r in counted]))
        rows.append(row)
    for r in rows:  # the tuned variant of each preset: the best mean validation NDCG@10
        same = [
            o
            for o in rows
            if o["dataset"] == r["dataset"] and parse_model(o["model"])[0] == parse_model(r["model"])[0]
        ]
        r["tuned"] = "val_ndcg@10" in r and r["val_ndcg@10"] == max(o.get("val_ndcg@10", -1) for o in same)
    by = {(r["dataset"], parse_model(r["model"])[0]): r for r in rows if r["tuned"]}
    for r in rows:
        sas = by.get((r["dataset"], "sasrec"))
        if sas and "ndcg@10" in r:
            r["ndcg@10_vs_sasrec"] = r["ndcg@10"] / sas["ndcg@10"]
        pop = by.get((r["dataset"], "popularity"))
        if pop and "expl_recall@10" in r and "expl_recall@10" in pop:
            r["expl_recall@10_vs_popularity"] = r["expl_recall@10"] / pop["expl_recall@10"]
        if pop and "expl_attested_ndcg@10" in r and "item_expl_ndcg@10" in pop:  # what is shown vs item-aware
            r["expl_ndcg@10_vs_item_popularity"] = r["expl_attested_ndcg@10"] / pop["item_expl_ndcg@10"]
        if (r["dataset"], parse_model(r["model"])[0]) in PUBLISHED and "ndcg@10" in r:
            ndcg, recall = PUBLISHED[(r["dataset"], parse_model(r["model"])[0])]
            r["published_ndcg@10"], r["published_recall@10"] = ndcg, recall
            r["ndcg@10_vs_published"] = r["ndcg@10"] / ndcg
    return rows


def _shown_explanations(r: dict[str, Any]) -> str:
    """The shown-explanation NDCG@10 cell: the model's attested ranking, or the item-aware popularity."""
    for key, note in (("expl_attested_ndcg@10", ""), ("item_expl_ndcg@10", " (item-aware)")):
        if key in r:
            return f"{r[key]:.4f} ± {r[key + '_std']:.4f}{note}"
    return ""


def _markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| dataset | model | converged seeds | NDCG@10 | Recall@10 | x SASRec NDCG@10 | expl R@10 | "
        "expl x popularity | shown expl NDCG@10 | x item popularity | published NDCG@10 (ratio) | params | "
        "best epochs (stop) |",
        "|" + "---|" * 13,
    ]

    def cell(r: dict[str, Any], m: str) -> str:
        return f"{r[m]:.4f} ± {r[m + '_std']:.4f}" if m in r else "not converged"

    for r in rows:
        stops = ",".join(sorted(set(r["stopped"])))
        published = (
            f"{r['published_ndcg@10']} ({r['ndcg@10_vs_published']:.2f})" if "published_ndcg@10" in r else ""
        )
        name = f"{r['model']}{' (tuned)' if r['tuned'] and '[' in r['model'] else ''}"
        lines.append(
            f"| {r['dataset']} | {name} | {r['seeds']}/{len(r['stopped'])} | {cell(r, 'ndcg@10')} | "
            f"{cell(r, 'recall@10')} | {r.get('ndcg@10_vs_sasrec', float('nan')):.2f} | "
            f"{cell(r, 'expl_recall@10') if r['model'].startswith('tmepsr') or r['model'] == 'popularity' else ''} | "
            f"{r.get('expl_recall@10_vs_popularity', float('nan')):.2f} | "
            f"{_shown_explanations(r)} | "
            f"{r.get('expl_ndcg@10_vs_item_popularity', float('nan')):.2f} | {published} | "
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


def _header(suite: str, runs: list[dict[str, Any]]) -> str:
    """The table's caption, from what the runs themselves recorded (a dataset may set its own patience)."""

    def tally(values: list[Any]) -> str:
        counts = Counter(values)
        return ", ".join(
            f"{v} ({n} run{'s' * (n != 1)})" for v, n in sorted(counts.items(), key=lambda kv: str(kv[0]))
        )

    trained = [r for r in runs if "train_config" in r]
    patience: dict[str, set[int]] = {}
    for r in trained:
        patience.setdefault(r["dataset"], set()).add(r["train_config"]["patience"])
    per_dataset = ", ".join(f"{d} {'/'.join(map(str, sorted(p)))}" for d, p in sorted(patience.items()))
    return (
        f"Suite `{suite}`: test metrics, mean ± std over the seeds that early-stopped (a run cut by a safety "
        f"budget or by the epoch cap is listed, not averaged); leave-one-out, full ranking, history masked; early "
        f"stopping on validation NDCG@10, patience in evaluations: {per_dataset}; x SASRec against the SASRec "
        f"variant with the best validation NDCG@10; device: {tally([r['train_config']['device'] for r in trained])}; "
        f"torch threads per run: {tally([r.get('torch_threads', 'not recorded') for r in trained])}."
    )


def _write_summary(name: str, suite: str) -> None:
    runs = _load_runs(_runs_path(name))  # every worker's finished runs
    rows = summarise(runs)
    header = _header(suite, runs)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2, default=float) + "\n")
    (RESULTS / f"{name}.md").write_text(_markdown(rows, header))
    _plot(rows, runs, RESULTS / f"{name}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=list(SUITES), default="time-explanations")
    parser.add_argument("--datasets", nargs="+", help="default: the suite's")
    parser.add_argument("--models", nargs="+", help="default: the suite's (preset or preset[key=value,...])")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: the suite's")
    parser.add_argument("--max-epochs", type=int, default=500, help="a run that reaches it does not count")
    parser.add_argument(
        "--patience",
        type=int,
        default=10,
        help="evaluations without a better val NDCG@10 (a dataset may set more)",
    )
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="safety budget per run (cut runs do not count)"
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (the same script reaches convergence on a GPU)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--name", help="result file prefix (default: the suite name)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=RESULTS / "checkpoints",
        help="where unfinished runs keep their training state and locks (resumed from there)",
    )
    parser.add_argument("--report", action="store_true", help="only rewrite the summary from the runs file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = SUITES[args.suite]
    name = args.name or args.suite
    RESULTS.mkdir(exist_ok=True)
    runs_path = _runs_path(name)
    if args.report:
        _write_summary(name, args.suite)
        return
    stopping = {"max_epochs": args.max_epochs, "patience": args.patience, "max_minutes": args.max_minutes}
    for dataset in args.datasets or suite["datasets"]:
        settings = DATASET_SETTINGS.get(dataset, {"model": {}, "train": {}})
        for model in args.models or suite["models"]:  # in priority order: every seed of a model first
            for seed in args.seeds or suite["seeds"]:
                done = {(r["dataset"], r["model"], r["seed"]) for r in _load_runs(runs_path)}
                folder = args.state_dir / name / f"{dataset}-{model}-{seed}"
                if (dataset, model, seed) in done or not _claim(folder.with_suffix(".lock")):
                    continue
                preset, model_over, train_over = parse_model(model)
                result = train_and_report(
                    dataset,
                    preset,
                    folder,
                    overrides=settings["model"] | model_over,
                    progress=True,
                    seed=seed,
                    device=args.device,
                    resume=True,
                    # a dataset's own stopping rule (e.g. a longer patience) over the command line's defaults
                    **(stopping | settings["train"] | train_over),
                )
                result |= {"model": model, "seed": seed}
                _append_run(runs_path, result)
                folder.with_suffix(".lock").unlink(missing_ok=True)
                _write_summary(name, args.suite)
                print(
                    f"done {dataset} {model} seed {seed}: test ndcg@10 {result['test']['ndcg@10']:.4f} "
                    f"({result['stopped']}, best epoch {result['best_epoch']})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
