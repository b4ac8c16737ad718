"""Scale benchmark: simulate every user of ``movielens-1m-lrurec`` (6,040 devices), 100 sampled
per round, 50 rounds, through Flower's simulation engine on this machine, with virtual users per node.

Records the wall time of the whole run (Ray start, every round, the final federated evaluation of all users),
seconds per training round, device updates per second and the final metrics in
``simulations/results/<name>.json`` and ``<name>.md``.
Run: ``python -m simulations.bench_scale`` (defaults = the target configuration).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from shared_model.config import FederatedConfig
from simulations.simulate import run_simulation

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="movielens-1m-lrurec")
    parser.add_argument("--users-per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--users-per-node", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="the target wall time")
    parser.add_argument("--name", default="scale")
    parser.add_argument("--out", default="runs/bench_scale")
    args = parser.parse_args(argv)

    from client_sdk.device import cached_log

    num_users = cached_log(args.dataset, "").num_users
    nodes = math.ceil(num_users / args.users_per_node)
    per_round_nodes = args.users_per_round / args.users_per_node
    cfg = FederatedConfig(
        dataset=args.dataset,
        num_rounds=args.rounds,
        fraction_train=(per_round_nodes + 0.5) / nodes,
        users_per_node=args.users_per_node,
        local_epochs=args.local_epochs,
        eval_every=args.rounds,
        out_dir=args.out,
    )
    t0 = time.perf_counter()
    history = run_simulation(cfg)["history"]
    wall = time.perf_counter() - t0
    train_rounds = [h for h in history if "val" not in h]
    last = history[-1]
    result = {
        "dataset": args.dataset,
        "users": num_users,
        "nodes": nodes,
        "users_per_node": args.users_per_node,
        "users_per_round": last["sampled"] * args.users_per_node,
        "rounds": len(history),
        "cpus": os.cpu_count(),
        "wall_seconds": wall,
        "budget_seconds": args.budget_minutes * 60,
        "within_budget": wall <= args.budget_minutes * 60,
        "median_train_round_seconds": statistics.median(h["seconds"] for h in train_rounds)
        if train_rounds
        else None,
        "final_round_seconds_with_evaluation": last["seconds"],
        "device_updates_per_second": sum(h["valid"] * args.users_per_node for h in history) / wall,
        "upload_bytes_per_node": last["upload_bytes_per_device"],
        "val": last.get("val", {}),
        "test": last.get("test", {}),
        "peak_rss_mb_driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "config": asdict(cfg),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    table = (
        "| dataset | users | per round | rounds | users/node | wall (min) | budget (min) | train round (s) "
        "| updates/s | test NDCG@10 | test Recall@10 |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {args.dataset} | {num_users} | {result['users_per_round']} | {result['rounds']} | {args.users_per_node} "
        f"| {wall / 60:.1f} | {args.budget_minutes:g} | {result['median_train_round_seconds']:.1f} "
        f"| {result['device_updates_per_second']:.1f} | {result['test'].get('ndcg@10', float('nan')):.4f} "
        f"| {result['test'].get('recall@10', float('nan')):.4f} |\n"
    )
    (RESULTS / f"{args.name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
