"""Benchmark: full-ranking evaluation speed at ML-1M scale (6,040 users x 3,416 items, history masked).

Writes ``simulations/results/bench_metrics.json`` and ``.md``. Uses the real ML-1M histories when the shared
data folder has them, otherwise random histories of the same lengths distribution.
Run: ``python -m simulations.bench_metrics``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from shared_model.data import Ragged, load_dataset
from shared_model.data.split import LeaveOneOutSplit
from shared_model.metrics import ranking_metrics, target_ranks

RESULTS = Path(__file__).parent / "results"


def _inputs(seed: int) -> tuple[str, int, Ragged, np.ndarray]:
    try:
        log = load_dataset("movielens-1m-lrurec")
    except FileNotFoundError:
        rng = np.random.default_rng(seed)
        lengths = rng.integers(18, 400, size=6040)
        hist = Ragged.from_lists([rng.choice(3416, size=n, replace=False) for n in lengths])
        return "synthetic 6040 x 3416", 3416, hist, rng.integers(0, 3416, size=6040)
    split = LeaveOneOutSplit(log)
    target = split.target_events("test")
    starts = log.user_ptr[split.eval_users]
    hist = Ragged.from_lists([log.item[s:t] for s, t in zip(starts, target, strict=True)])
    return "movielens-1m-lrurec test inputs", log.num_items, hist, log.item[target]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    source, num_items, hist, targets = _inputs(seed=0)
    scores = np.random.default_rng(1).standard_normal((len(targets), num_items), dtype=np.float32)
    timings = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ranks = np.concatenate(
            [
                target_ranks(
                    scores[b : b + args.batch_size],
                    targets[b : b + args.batch_size],
                    hist.take(np.arange(b, min(b + args.batch_size, len(targets)))),
                )
                for b in range(0, len(targets), args.batch_size)
            ]
        )
        timings.append(time.perf_counter() - start)
    metrics = ranking_metrics(ranks)
    result = {
        "inputs": source,
        "users": len(targets),
        "items": num_items,
        "batch_size": args.batch_size,
        "seconds_median": float(np.median(timings)),
        "seconds_all": timings,
        "users_per_second": len(targets) / float(np.median(timings)),
        "random_scores_recall@10": metrics["recall@10"],
        "expected_random_recall@10": 10 / num_items,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "bench_metrics.md").write_text(
        "| inputs | users x items | batch | median seconds | users/s |\n|---|---|---|---|---|\n"
        f"| {source} | {len(targets):,} x {num_items:,} | {args.batch_size} | {result['seconds_median']:.3f} | "
        f"{result['users_per_second']:,.0f} |\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
