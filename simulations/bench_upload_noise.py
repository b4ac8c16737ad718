"""How much noise a sparse or compressed upload adds to a cohort's mean update, in seconds instead of 400-round
runs: the same one-user devices train one round from the same arrays, once dense and once per upload variant;
the server decodes each reply (``server.validation.validate_update``: densified, dequantized, completed from
output states) and averages them by example weight, as the strategy does. Reported per variant: the median
upload bytes and, per top-level module (item tables, explanation branch, time encoder, LRU blocks, interest
heads), the relative squared error of the cohort's mean change against the dense mean change
(``|mean_sparse - mean_dense|^2 / |mean_dense|^2``), plus its mean over all arrays (FedAdam normalises every
coordinate, so a small array's noise counts as much as a large one's).

A 400-round latest-small run's final NDCG@10 moves by several percent between seeds; this measure moves far
less, so it can rank upload variants of equal bytes before any of them is trained to the end
(``docs/RESULTS.md`` compares its order with the trained runs'). Run::

    python -m simulations.bench_upload_noise [--checkpoint RUN_DIR] [--variants ...] [--devices 60]

``--checkpoint``: a federated run's output folder (its server checkpoint's arrays: a trained model's updates
differ from the first round's); default the initial arrays. Writes ``simulations/results/upload_noise.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from client_sdk.device import HostedUsers, cached_log
from server.app import initial_shared
from server.checkpoint import load_server_checkpoint
from server.validation import validate_update
from shared_model.config import FederatedConfig

from .bench_federated import VARIANTS

RESULTS = Path(__file__).parent / "results"
SPARSE = [name for name, v in VARIANTS.items() if v.get("upload") == "sparse"]


def module_of(key: str) -> str:
    """The top-level module of a shared array's name (``encoder.blocks.0.ffn.0.weight`` -> ``encoder``)."""
    return key.split(".", 1)[0]


def cohort_mean(
    cfg: FederatedConfig, shared: dict[str, np.ndarray], devices: np.ndarray, server_round: int, store: Path
) -> tuple[dict[str, np.ndarray], float]:
    """The example-weighted mean change of ``devices`` (one user each) as the server decodes their replies,
    and their median upload bytes."""
    num_users = cached_log(cfg.dataset, cfg.data_dir).num_users
    total: dict[str, np.ndarray] = {k: np.zeros(v.shape) for k, v in shared.items()}
    weight, sizes = 0.0, []
    for p in devices:
        result = HostedUsers(cfg, int(p), num_users, store / str(p)).train(shared, server_round)
        sizes.append(sum(v.nbytes for v in result.update.values()))
        dense = validate_update(
            result.update,
            shared,
            result.num_examples,
            math.inf,
            states_lr=cfg.states_lr,
            row_clip=cfg.row_clip,
        )
        for k in total:
            total[k] += result.num_examples * (dense[k].astype(np.float64) - shared[k])
        weight += result.num_examples
    return {k: v / weight for k, v in total.items()}, float(np.median(sizes))


def relative_errors(estimate: dict[str, np.ndarray], exact: dict[str, np.ndarray]) -> dict[str, float]:
    """Per module and over arrays (``mean over arrays``): squared error of ``estimate`` relative to ``exact``."""
    err = {k: float(np.sum((estimate[k] - exact[k]) ** 2)) for k in exact}
    size = {k: float(np.sum(exact[k] ** 2)) for k in exact}
    out = {}
    for module in sorted({module_of(k) for k in exact}):
        keys = [k for k in exact if module_of(k) == module]
        out[module] = sum(err[k] for k in keys) / max(sum(size[k] for k in keys), 1e-30)
    out["mean over arrays"] = float(np.mean([err[k] / size[k] for k in exact if size[k] > 0]))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = FederatedConfig(dataset=args.dataset, users_per_node=1, seed=args.seed)
    loaded = load_server_checkpoint(args.checkpoint) if args.checkpoint else None
    if args.checkpoint and loaded is None:
        raise SystemExit(f"{args.checkpoint}: no server checkpoint")
    shared = loaded[0] if loaded else initial_shared(base)
    num_users = cached_log(base.dataset, base.data_dir).num_users
    devices = np.random.default_rng(args.seed).choice(num_users, min(args.devices, num_users), replace=False)
    store = Path(args.out)
    exact, dense_bytes = cohort_mean(base, shared, devices, args.round, store / "dense")
    rows = [{"variant": "dense", "upload_bytes": dense_bytes}]
    for i, name in enumerate(args.variants):
        cfg = replace(base, **VARIANTS[name])
        estimate, size = cohort_mean(cfg, shared, devices, args.round, store / str(i))
        rows.append(
            {"variant": name, "upload_bytes": size, "relative_error": relative_errors(estimate, exact)}
        )
        print(f"{name}: {size / 1000:.1f} KB, {rows[-1]['relative_error']}", flush=True)
    return {
        "dataset": args.dataset,
        "checkpoint": args.checkpoint,
        "devices": len(devices),
        "round": args.round,
        "seed": args.seed,
        "rows": rows,
    }


def to_markdown(result: dict[str, Any]) -> str:
    """One row per variant: bytes and relative errors."""
    rows = [r for r in result["rows"] if "relative_error" in r]
    columns = list(rows[0]["relative_error"]) if rows else []
    source = f"the arrays of `{result['checkpoint']}`" if result["checkpoint"] else "the initial arrays"
    lines = [
        f"Noise of sparse uploads on {result['dataset']}: {result['devices']} one-user devices, one round from"
        f" {source}; relative squared error of the cohort's mean change against dense"
        " (`python -m simulations.bench_upload_noise`).",
        "",
        "| upload | KB per device | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for r in rows:
        errors = " | ".join(f"{r['relative_error'][c]:.3f}" for c in columns)
        lines.append(f"| {r['variant']} | {r['upload_bytes'] / 1000:.1f} | {errors} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="movielens-latest-small")
    parser.add_argument("--checkpoint", help="a federated run's output folder (default: the initial arrays)")
    parser.add_argument("--variants", nargs="+", default=SPARSE, help="bench_federated's sparse variants")
    parser.add_argument("--devices", type=int, default=60, help="one-user devices in the cohort")
    parser.add_argument(
        "--round", type=int, default=7, help="the server round the devices train (their seeds)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="upload_noise")
    parser.add_argument("--out", default="runs/bench_upload_noise", help="the devices' stores")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known sparse ones: {SPARSE}")
    result = run(args)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
