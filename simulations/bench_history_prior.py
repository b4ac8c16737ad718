"""The explanation history prior on trained models: the shown explanations' NDCG@10 (given the true item, among
the ids attested for it) for each weight of ``explanation_history_prior`` (``+ w log(1 + n)``, ``n`` the user's
events whose item has the id attested), the weight chosen on validation, its test value, and the ratio to the
item-aware popularity baseline (``shared_model.baselines``). Checkpoints are ``model.pt`` files of ``tmepsr
train`` or of the accuracy suites (``simulations/results/checkpoints/``).

Run: ``python -m simulations.bench_history_prior CHECKPOINT [CHECKPOINT ...]``; writes
``results/history_prior.{json,md}`` (one row per checkpoint, replaced when measured again).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from shared_model.baselines import popularity_explanation_metrics
from shared_model.data import load_dataset
from shared_model.data.split import LeaveOneOutSplit
from shared_model.model import TMEPSR
from shared_model.training import evaluate, load_checkpoint
from simulations import per_checkpoint

WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
KEY = "expl_attested_ndcg@10"


def set_history_prior(model: TMEPSR, weight: float) -> None:
    """Show the model's explanations with history prior ``weight`` (its config and its branch)."""
    model.cfg = dataclasses.replace(model.cfg, explanation_history_prior=weight)
    model.explanation.history_prior = weight


def measure(path: str, data_dir: str | None = None) -> dict[str, object]:
    """Validation and test shown-explanation NDCG@10 of one checkpoint at every weight of :data:`WEIGHTS`."""
    model, extra = load_checkpoint(path)
    if not isinstance(model, TMEPSR) or model.explanation is None:
        raise SystemExit(f"{path}: not a TME-PSR model with an explanation branch")
    log = load_dataset(extra["dataset"], data_dir)
    split = LeaveOneOutSplit(log)
    scores: dict[str, dict[str, float]] = {"val": {}, "test": {}}
    for weight in WEIGHTS:
        set_history_prior(model, weight)
        for stage in ("val", "test"):
            scores[stage][f"{weight:g}"] = evaluate(model, log, split, stage)[KEY]  # type: ignore[arg-type]
    chosen = max(scores["val"], key=lambda w: scores["val"][w])  # ties: the smaller weight
    popularity = popularity_explanation_metrics(log, split, "test")["item_expl_ndcg@10"]
    return {
        "checkpoint": str(path),
        "dataset": log.name,
        "preset": extra.get("preset"),
        "val": scores["val"],
        "test": scores["test"],
        "chosen": float(chosen),
        "test_without": scores["test"]["0"],
        "test_chosen": scores["test"][chosen],
        "item_popularity": popularity,
        "x_item_popularity_without": scores["test"]["0"] / popularity,
        "x_item_popularity_chosen": scores["test"][chosen] / popularity,
    }


def _markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "Shown explanations (given the true item, among its attested ids), test NDCG@10 without and with the "
        "history prior, its weight chosen on validation; x = ratio to item-aware popularity. "
        "`python -m simulations.bench_history_prior CHECKPOINT ...`.",
        "",
        "| dataset | checkpoint | without | chosen weight | with | x item popularity (without -> with) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | `{Path(str(r['checkpoint'])).parent.name}` | {r['test_without']:.4f} | "
            f"{r['chosen']:g} | {r['test_chosen']:.4f} | {r['x_item_popularity_without']:.3f} -> "
            f"{r['x_item_popularity_chosen']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    per_checkpoint.run(argv, __doc__.splitlines()[0], "history_prior", measure, _markdown)


if __name__ == "__main__":
    main()
