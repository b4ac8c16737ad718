"""The ``tmepsr`` command line: one entry point over each layer's commands (``data`` in
:mod:`shared_model.data.cli`, ``keys``/``credentials``/``export`` in :mod:`server.cli`, ``recommend`` in
:mod:`client_sdk.cli`) and the simulation layer's own ``train`` and ``simulate``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from client_sdk import cli as client_cli
from client_sdk.store import StoreError
from server import cli as server_cli
from shared_model.data import DataFormatError
from shared_model.data import cli as data_cli
from shared_model.data.locate import DATA_DIR_HELP
from shared_model.protocol.bundle import BundleError


def _json_object(text: str, option: str) -> dict[str, object]:
    """``text`` parsed as a JSON object, or a ValueError naming ``option`` and what is wrong."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{option} is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{option} needs a JSON object like '{{\"d_model\": 64}}', got {text!r}")
    return value


def _cmd_train(args: argparse.Namespace) -> int:
    from simulations.train import train_and_report

    overrides = _json_object(args.set, "--set") if args.set else {}
    result = train_and_report(
        args.dataset,
        args.model,
        args.out,
        args.data_dir,
        seed=args.seed,
        device=args.device,
        max_epochs=args.epochs,
        patience=args.patience,
        max_minutes=args.max_minutes,
        overrides=overrides,
        resume=args.resume,
    )
    print(
        json.dumps(
            {"best_epoch": result["best_epoch"], "stopped": result["stopped"], "test": result["test"]},
            indent=2,
        )
    )
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from server.checkpoint import load_server_checkpoint
    from shared_model.config import FederatedConfig
    from simulations.simulate import plot_convergence, run_simulation, sample_recommendation

    values = {
        f.name: getattr(args, f.name)
        for f in fields(FederatedConfig)
        if getattr(args, f.name, None) is not None
    }
    cfg = FederatedConfig(**values)
    print(
        f"Federated simulation of {cfg.preset} on {cfg.dataset}: {cfg.num_rounds} rounds, "
        f"{cfg.fraction_train:.0%} of devices per round, split '{cfg.split}', {cfg.upload} upload -> {cfg.out_dir}"
    )
    result = run_simulation(cfg, num_cpus=args.cpus, verbose=args.verbose, ray_address=args.ray_address)
    out = Path(cfg.out_dir)
    if not any(row.get("aggregated") for row in result["history"]):
        failed = sum(row.get("failed", 0) for row in result["history"])
        rejected = sum(row.get("rejected", 0) for row in result["history"])
        print(
            f"error: no round aggregated an update ({failed} device replies failed, {rejected} were rejected; "
            f"see the warnings above and {out / 'metrics.json'}): nothing was published",
            file=sys.stderr,
        )
        return 1
    plot_convergence(result["history"], out / "convergence.png")
    checkpoint = load_server_checkpoint(out)
    assert checkpoint is not None
    print(
        f"\nmetrics: {out / 'metrics.json'}, plot: {out / 'convergence.png'}, checkpoint: {out / 'server_checkpoint.npz'}\n"
    )
    print(sample_recommendation(cfg, checkpoint[0], user=args.sample_user))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tmepsr", description="Federated, on-device sequential recommendation."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data_cli.add_commands(sub)
    server_cli.add_commands(sub)
    client_cli.add_commands(sub)

    from shared_model.config import MODEL_PRESETS

    p_train = sub.add_parser("train", help="train a model centrally with early stopping; writes results JSON")
    p_train.add_argument("--dataset", default="movielens-latest-small", help="dataset name or event file")
    p_train.add_argument("--model", default="tmepsr", choices=[*MODEL_PRESETS, "popularity"])
    p_train.add_argument("--epochs", type=int, default=200, help="maximum epochs (default 200)")
    p_train.add_argument("--patience", type=int, default=10, help="epochs without better validation NDCG@10")
    p_train.add_argument(
        "--resume", action="store_true", help="continue the run saved in --out (train_state.pt, every epoch)"
    )
    p_train.add_argument("--max-minutes", type=float, default=None, help="compute budget in minutes")
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--device", default="cpu", help="cpu or cuda")
    p_train.add_argument("--set", help="model config overrides as JSON, e.g. '{\"d_model\": 128}'")
    p_train.add_argument("--out", default="runs/train", help="output folder (results JSON + checkpoint)")
    p_train.add_argument("--data-dir", help=DATA_DIR_HELP)
    p_train.set_defaults(func=_cmd_train)

    from shared_model.config import FederatedConfig, choices

    p_sim = sub.add_parser("simulate", help="federated simulation with Flower, then a sample recommendation")
    defaults = FederatedConfig()
    for f in fields(FederatedConfig):
        default = getattr(defaults, f.name)
        p_sim.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(default),
            choices=choices(FederatedConfig).get(f.name),
            default=None,
            help=f"{f.metadata['help']} (default: {default!r})",
        )
    p_sim.add_argument("--cpus", type=int, default=None, help="CPUs for the simulation engine (default: all)")
    p_sim.add_argument(
        "--ray-address", help="join a running Ray cluster (e.g. 'auto'); see docs/DEPLOYMENT.md"
    )
    p_sim.add_argument(
        "--sample-user",
        type=int,
        default=None,
        help="dense index of the user to recommend for (default: the first user whose device trained)",
    )
    p_sim.add_argument("--verbose", action="store_true", help="Flower's and Ray's full logs")
    p_sim.set_defaults(func=_cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        BundleError,
        StoreError,
        DataFormatError,
        FileNotFoundError,
        FileExistsError,
        KeyError,
        ValueError,
    ) as exc:
        print(f"tmepsr: error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
