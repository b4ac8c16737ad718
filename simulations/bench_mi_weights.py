"""What the dynamic MI weighting does per user, on trained models: how much the weigher's log-variances vary
between users, how much the per-user recommendation-side InfoNCE loss (what ``exp(-s_1)`` weighs) varies, and
whether a per-user weight on the branch's score in the shown ranking, from an uncertainty signal, beats the best
single fixed weight (both chosen on validation, reported on test).

Per-user weight of the branch's score ``w_n = c exp(beta z_n)``, ``z_n`` one standardised signal: the weigher's
certainty ``-s_1`` (the model's own), the entropy of the item distribution at the state, the entropy of the
branch's scores over the item's attested ids, log history length; ``beta = 0`` is a fixed weight. The shown
scores are ``w_n x branch + rank prior + history prior`` (the model's own priors), ranked among the attested ids
as in evaluation (``expl_attested_ndcg@10``).

Run: ``python -m simulations.bench_mi_weights CHECKPOINT [CHECKPOINT ...]``; writes
``results/mi_weights.{json,md}`` (one row per checkpoint, replaced when measured again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from shared_model.data import InteractionLog, load_dataset
from shared_model.data.log import Ragged
from shared_model.data.split import LeaveOneOutSplit
from shared_model.explanation import attested_only
from shared_model.metrics import multilabel_metrics
from shared_model.model import TMEPSR
from shared_model.training import load_checkpoint, stage_batches
from simulations import per_checkpoint

SIGNALS = ("certainty", "item_entropy", "branch_entropy", "log_history")
SCALES = (0.25, 0.5, 1.0, 2.0)
BETAS = (-1.0, -0.5, 0.0, 0.5, 1.0)


def _entropy(scores: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(scores)`` per row; ``-inf`` scores take no part (0 where a row has none)."""
    logp = scores.log_softmax(-1)
    return torch.nan_to_num(-(logp.exp() * torch.nan_to_num(logp, neginf=0.0)).sum(-1))


@dataclass
class Stage:
    """Per evaluated user of one stage: the branch's scores and the priors (N, V), the uncertainty signals
    (N, len(SIGNALS)), the weigher's log-variances (N, 2), the recommendation-side InfoNCE loss of the target's
    labels (N,; NaN without labels) and the labels."""

    branch: torch.Tensor
    prior: torch.Tensor
    signals: torch.Tensor
    s: torch.Tensor
    nce: torch.Tensor
    labels: Ragged

    def ndcg(self, weight: torch.Tensor) -> float:
        """Shown-explanation NDCG@10 with the branch's score times ``weight`` (N,)."""
        scores = weight[:, None] * self.branch + self.prior
        return float(multilabel_metrics(scores.numpy(), self.labels, ks=(10,))["ndcg@10"])


@torch.no_grad()
def _stage(
    model: TMEPSR, log: InteractionLog, split: LeaveOneOutSplit, stage: Literal["val", "test"]
) -> Stage:
    """The :class:`Stage` of ``stage`` ("val" or "test")."""
    branch = model.explanation
    candidates = torch.as_tensor(split.explanation_candidates)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("branch", "prior", "signals", "s", "nce")}
    targets = []
    for _, t, batch in stage_batches(log, split.eval_users, stage, model.cfg.max_len, 512):
        state = model.encode(batch)[:, -1]
        items = torch.as_tensor(log.item[t])
        scores = model.explanation_scores(state, items)
        bonus = branch.input_bonus(candidates, batch.items, batch.mask)
        s = branch.mi_weights(state)
        z_rec, z_vocab = branch.rec_embeddings(state)
        logp = (z_rec @ z_vocab.T).log_softmax(-1)
        rows = log.explanations.take(t)
        nce = torch.tensor([-logp[i, torch.as_tensor(rows.row(i))].mean() for i in range(len(items))])
        targets.append(t)
        parts["branch"].append(scores)
        parts["prior"].append(branch.shown_scores(torch.zeros_like(scores), candidates[items], bonus))
        parts["signals"].append(
            torch.stack(
                (
                    -s[:, 0],
                    _entropy(model.item_scores(state)),
                    _entropy(attested_only(scores, candidates[items])),
                    batch.mask.sum(1).float().log(),
                ),
                1,
            )
        )
        parts["s"].append(s)
        parts["nce"].append(nce)
    labels = log.explanations.take(np.concatenate(targets))
    return Stage(**{k: torch.cat(v) for k, v in parts.items()}, labels=labels)


def measure(path: str, data_dir: str | None = None) -> dict[str, Any]:
    """The weigher's spread and the per-user weights' validation/test NDCG@10 for one checkpoint."""
    model, extra = load_checkpoint(path)
    if not isinstance(model, TMEPSR) or model.explanation is None or model.explanation.weigher is None:
        raise SystemExit(f"{path}: not a TME-PSR model with dynamic MI weights")
    model.eval()
    log = load_dataset(extra["dataset"], data_dir)
    split = LeaveOneOutSplit(log)
    data = {stage: _stage(model, log, split, stage) for stage in ("val", "test")}
    s, nce = data["val"].s.numpy(), data["val"].nce.numpy()
    mask = np.isfinite(nce)
    mean, std = data["val"].signals.mean(0), data["val"].signals.std(0)
    std = torch.where(std > 1e-6, std, torch.inf)  # a signal that does not vary standardises to 0
    row: dict[str, Any] = {
        "checkpoint": str(path),
        "dataset": log.name,
        "s_rec_mean": float(s[:, 0].mean()),
        "s_rec_std": float(s[:, 0].std()),
        "s_exp_std": float(s[:, 1].std()),
        "nce_rec_mean": float(nce[mask].mean()),
        "log_nce_rec_std": float(np.log(nce[mask]).std()),
        "corr_s_rec_log_nce": float(np.corrcoef(s[mask, 0], np.log(nce[mask]))[0, 1]),
        "model_as_trained": {stage: d.ndcg(torch.ones(len(d.branch))) for stage, d in data.items()},
    }
    for j, signal in enumerate(SIGNALS):
        grid = {}
        for c in SCALES:
            for beta in BETAS:
                grid[c, beta] = {
                    stage: d.ndcg(c * torch.exp(beta * (d.signals[:, j] - mean[j]) / std[j]))
                    for stage, d in data.items()
                }
        best = max(grid, key=lambda k: grid[k]["val"])
        fixed = max((k for k in grid if k[1] == 0.0), key=lambda k: grid[k]["val"])
        row[signal] = {
            "chosen": {"scale": best[0], "beta": best[1], **grid[best]},
            "fixed": {"scale": fixed[0], **grid[fixed]},
        }
    return row


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "Dynamic MI weights on trained TME-PSR models. `s_rec`: the weigher's log-variance of the "
        "recommendation-side InfoNCE term over validation users (its weight is exp(-s_rec)); `nce_rec`: that term "
        "per user. Shown explanations (test NDCG@10, attested ids): the best fixed weight on the branch's score vs "
        "a per-user weight from each signal, both chosen on validation. "
        "`python -m simulations.bench_mi_weights CHECKPOINT ...`.",
        "",
        "| dataset | s_rec mean ± std | nce_rec mean, std of its log | corr(s_rec, log nce_rec) | as trained | "
        "fixed weight (val / test) | " + " | ".join(f"per-user: {s} (val / test)" for s in SIGNALS) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(SIGNALS),
    ]
    for r in rows:
        fixed = r[SIGNALS[0]]["fixed"]
        cells = [
            f"{r[s]['chosen']['val']:.4f} / {r[s]['chosen']['test']:.4f} (beta {r[s]['chosen']['beta']:g})"
            for s in SIGNALS
        ]
        trained = r["model_as_trained"]
        lines.append(
            f"| {r['dataset']} | {r['s_rec_mean']:.3f} ± {r['s_rec_std']:.3f} | {r['nce_rec_mean']:.2f}, "
            f"{r['log_nce_rec_std']:.3f} | {r['corr_s_rec_log_nce']:.2f} | "
            f"{trained['val']:.4f} / {trained['test']:.4f} | "
            f"{fixed['val']:.4f} / {fixed['test']:.4f} (x{fixed['scale']:g}) | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    per_checkpoint.run(argv, __doc__.splitlines()[0], "mi_weights", measure, _markdown)


if __name__ == "__main__":
    main()
