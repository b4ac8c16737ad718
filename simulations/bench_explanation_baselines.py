"""How far can an explanation ranking get past item-aware popularity? Non-learned estimators of the explanation
ids of a user's next event given the true item, each relative to the item-aware popularity baseline
(``shared_model.baselines.popularity_explanation_metrics``: the labels most used on that item in training):

* ``item-aware, attested``: the same counts, ranked among the ids attested for the item (what may be shown);
* ``user-aware``: the labels the user used most in training;
* ``item + user``: ``log(1 + item count) + w log(1 + user count)``;
* ``item + similar items``: the item's label shares plus ``b`` times those of its 50 nearest items (cosine of
  their label-count profiles), plus a pinch of global popularity;
* ``combined``: ``log(1 + item count) + u log(1 + user count) + a affinity + r log(1 + recent count)``, where
  ``affinity`` is the labels' co-occurrence PMI (within one event's labels) with the user's earlier labels and
  ``recent`` counts the labels of the item's 5 latest training events;
* ``history``: the ids attested for the user's earlier items, counted over every event before the target (what a
  device knows from its own history alone, without labels); ``item + history``: ``log(1 + item count) + h
  log(1 + history count)``;
* ``ceiling``: the true ids first among the attested ones (no estimator can do better on what may be shown);
  ``test_labels_attested`` is the share of the test events' labels that are attested for their item.

Every estimator but the first ranks among the attested ids; ``w`` and ``b`` are chosen on validation and the test
value is reported. Labels come from each dataset's rule (``tmepsr data stats NAME``): review phrases on Musical
Instruments, tags or history-matched genres on MovieLens, history-matched attributes on Beauty (a rule of the
user's history, which ``item + user`` approximates).
Run: ``python -m simulations.bench_explanation_baselines``; writes ``results/explanation_baselines.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Literal

import numpy as np

from shared_model.data import load_dataset
from shared_model.data.log import InteractionLog
from shared_model.data.split import LeaveOneOutSplit
from shared_model.metrics import multilabel_metrics

RESULTS = Path(__file__).parent / "results"
DATASETS = [
    "amazon-musical-instruments-5core",
    "movielens-latest-small",
    "movielens-100k",
    "amazon-beauty-5core",
]
USER_WEIGHTS = (0.5, 1.0, 2.0, 4.0)
NEIGHBOUR_WEIGHTS = (0.3, 1.0)
NEIGHBOURS = 50
COMBINED_WEIGHTS = tuple(
    (u, a, r) for u in (0.0, 0.5, 1.0) for a in (0.0, 0.3, 1.0) for r in (0.0, 0.5, 1.0)
)  # user, affinity, recent
RECENT_EVENTS = 5
HISTORY_WEIGHTS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def _counts(log: InteractionLog, split: LeaveOneOutSplit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training label counts: global (V,), per item (I, V), per user (U, V)."""
    train = np.flatnonzero(split.train_mask)
    labels = log.explanations.take(train)
    rows = np.repeat(train, labels.lengths())
    user_of = np.repeat(np.arange(log.num_users), np.diff(log.user_ptr))
    vocab = len(log.vocab)
    per_item = np.zeros((log.num_items, vocab))
    np.add.at(per_item, (log.item[rows], labels.ids), 1.0)
    per_user = np.zeros((log.num_users, vocab))
    np.add.at(per_user, (user_of[rows], labels.ids), 1.0)
    return np.bincount(labels.ids, minlength=vocab).astype(float), per_item, per_user


def _neighbour_shares(per_item: np.ndarray) -> np.ndarray:
    """Each item's label shares averaged over its nearest items by label-profile cosine (I, V)."""
    profile = per_item / np.maximum(np.linalg.norm(per_item, axis=1, keepdims=True), 1e-9)
    shares = per_item / np.maximum(per_item.sum(1, keepdims=True), 1)
    out = np.zeros_like(per_item)
    k = min(NEIGHBOURS, len(per_item) - 1)
    for lo in range(0, len(per_item), 1024):
        sim = profile[lo : lo + 1024] @ profile.T
        sim[np.arange(len(sim)), np.arange(lo, lo + len(sim))] = 0
        cut = -np.partition(-sim, k - 1, axis=1)[:, k - 1 : k]
        sim[sim < cut] = 0
        mixed = sim @ shares
        out[lo : lo + 1024] = mixed / np.maximum(mixed.sum(1, keepdims=True), 1e-9)
    return out


def _pmi(log: InteractionLog, split: LeaveOneOutSplit, glob: np.ndarray) -> np.ndarray:
    """Pointwise mutual information of two labels on the same training event (V, V); 0 for pairs seen
    together fewer than 3 times and on the diagonal."""
    train = np.flatnonzero(split.train_mask)
    labels = log.explanations.take(train)
    vocab = len(log.vocab)
    together = np.zeros((vocab, vocab))
    starts = np.concatenate(([0], np.cumsum(labels.lengths())))
    for lo, hi in zip(starts[:-1], starts[1:], strict=True):
        ids = labels.ids[lo:hi]
        together[np.ix_(ids, ids)] += 1
    np.fill_diagonal(together, 0)
    p = glob / max(glob.sum(), 1)
    pmi = np.log((together / max(together.sum(), 1) + 1e-12) / (np.outer(p, p) + 1e-12))
    pmi[together < 3] = 0
    return pmi


def _recent_counts(log: InteractionLog, split: LeaveOneOutSplit) -> np.ndarray:
    """Label counts of each item's ``RECENT_EVENTS`` latest training events (I, V)."""
    train = np.flatnonzero(split.train_mask)
    train = train[np.lexsort((log.time[train], log.item[train]))]  # by item, then time
    items = log.item[train]
    from_end = np.searchsorted(items, items, side="right") - np.arange(len(items))  # 1 = the item's latest
    recent = train[from_end <= RECENT_EVENTS]
    labels = log.explanations.take(recent)
    out = np.zeros((log.num_items, len(log.vocab)))
    np.add.at(out, (np.repeat(log.item[recent], labels.lengths()), labels.ids), 1.0)
    return out


def _history_counts(log: InteractionLog, candidates: np.ndarray, target: np.ndarray) -> np.ndarray:
    """For each target event, how often each id is attested for the items of the user's earlier events (N, V)."""
    first = log.user_ptr[np.searchsorted(log.user_ptr, target, side="right") - 1]
    lengths = target - first
    earlier = np.repeat(first - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    ids = candidates[log.item[earlier]]
    rows = np.broadcast_to(np.repeat(np.arange(len(target)), lengths)[:, None], ids.shape)
    out = np.zeros((len(target), len(log.vocab)))
    np.add.at(out, (rows[ids >= 0], ids[ids >= 0]), 1.0)
    return out


def evaluate(name: str, data_dir: str | None = None) -> dict[str, object]:
    """Validation and test NDCG@10 of every estimator, and the test ratios to item-aware popularity."""
    log = load_dataset(name, data_dir)
    split = LeaveOneOutSplit(log)
    glob, per_item, per_user = _counts(log, split)
    neighbours = _neighbour_shares(per_item)
    pmi, recent = _pmi(log, split, glob), np.log1p(_recent_counts(log, split))
    shares = per_item / np.maximum(per_item.sum(1, keepdims=True), 1)
    user_of = np.repeat(np.arange(log.num_users), np.diff(log.user_ptr))
    tie = glob / (glob.sum() + 1)  # ties among unseen labels: global popularity
    candidates = split.explanation_candidates
    vocab = len(log.vocab)
    scores: dict[str, dict[str, float]] = {}
    attested_share: dict[str, float] = {}
    stages: tuple[Literal["val", "test"], ...] = ("val", "test")
    for stage in stages:
        target = split.target_events(stage)
        truth = log.explanations.take(target)
        item, user = log.item[target], user_of[target]
        attested = np.zeros((len(target), vocab + 1), bool)
        rows = np.arange(len(target))[:, None]
        attested[rows, np.where(candidates[item] >= 0, candidates[item], vocab)] = True
        attested = attested[:, :vocab]

        def ndcg(s: np.ndarray, only_attested: bool = True, truth=truth, attested=attested) -> float:
            return multilabel_metrics(np.where(attested, s, -np.inf) if only_attested else s, truth)[
                "ndcg@10"
            ]

        got = {
            "item-aware popularity": ndcg(per_item[item] + tie, only_attested=False),
            "item-aware, attested": ndcg(per_item[item] + tie),
            "user-aware": ndcg(per_user[user] + tie),
        }
        for w in USER_WEIGHTS:
            got[f"item + user (w={w:g})"] = ndcg(
                np.log1p(per_item[item]) + w * np.log1p(per_user[user]) + tie
            )
        for b in NEIGHBOUR_WEIGHTS:
            got[f"item + similar items (b={b:g})"] = ndcg(shares[item] + b * neighbours[item] + 0.1 * tie)
        history = np.log1p(_history_counts(log, candidates, target))
        got["history"] = ndcg(history + tie)
        for h in HISTORY_WEIGHTS:
            got[f"item + history (h={h:g})"] = ndcg(np.log1p(per_item[item]) + h * history + tie)
        is_truth = np.zeros((len(target), vocab), bool)
        is_truth[np.repeat(np.arange(len(target)), truth.lengths()), truth.ids] = True
        got["ceiling: the true ids first among the attested"] = ndcg(is_truth + tie)
        attested_share[stage] = float((is_truth & attested).sum() / max(is_truth.sum(), 1))
        user_counts = per_user[user]
        affinity = (user_counts / np.maximum(user_counts.sum(1, keepdims=True), 1)) @ pmi
        for u, a, r in COMBINED_WEIGHTS:
            got[f"combined (u={u:g}, a={a:g}, r={r:g})"] = ndcg(
                np.log1p(per_item[item]) + u * np.log1p(user_counts) + a * affinity + r * recent[item] + tie
            )
        scores[stage] = got
    rows_out = {}
    for family in (
        "item-aware popularity",
        "item-aware, attested",
        "user-aware",
        "item + user",
        "item + similar items",
        "combined",
        "history",
        "item + history",
        "ceiling: the true ids first among the attested",
    ):
        keys = [k for k in scores["val"] if k == family or k.startswith(family + " (")]
        best = max(keys, key=lambda k: scores["val"][k])
        rows_out[family] = {
            "chosen": best,
            "val_ndcg@10": scores["val"][best],
            "test_ndcg@10": scores["test"][best],
            "x_item_popularity": scores["test"][best] / scores["test"]["item-aware popularity"],
        }
    return {
        "dataset": name,
        "rule": log.vocab.rule,
        "vocabulary": vocab,
        "test_labels_attested": attested_share["test"],
        "estimators": rows_out,
    }


def _markdown(results: list[dict[str, object]]) -> str:
    lines = [
        "Explanation estimators given the true item, test NDCG@10 and its ratio to item-aware popularity "
        "(weights chosen on validation; every row but the first ranks among the ids attested for the item). "
        "`python -m simulations.bench_explanation_baselines`.",
        "",
        "| dataset | estimator (chosen) | test NDCG@10 | x item-aware popularity |",
        "|---|---|---|---|",
    ]
    for r in results:
        for row in r["estimators"].values():  # type: ignore[union-attr]
            lines.append(
                f"| {r['dataset']} | {row['chosen']} | {row['test_ndcg@10']:.4f} | {row['x_item_popularity']:.3f} |"
            )
    lines += ["", "| dataset | share of the test events' labels attested for their item |", "|---|---|"]
    lines += [f"| {r['dataset']} | {r['test_labels_attested']:.3f} |" for r in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=DATASETS)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    results = []
    for name in args.datasets:
        results.append(evaluate(name, args.data_dir))
        print(json.dumps(results[-1]["estimators"], indent=1), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "explanation_baselines.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "explanation_baselines.md").write_text(_markdown(results))


if __name__ == "__main__":
    main()
