"""The ``tmepsr`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from client_sdk.store import StoreError
from shared_model.data import (
    DATASETS,
    DataFormatError,
    load_dataset,
)
from shared_model.data.locate import data_root
from shared_model.data.stats import log_stats
from shared_model.protocol.bundle import BundleError

if TYPE_CHECKING:
    from client_sdk.runtime import Recommender
    from shared_model.data import InteractionLog


def _cmd_data_list(args: argparse.Namespace) -> int:
    root = data_root(args.data_dir)
    print(f"shared data folder: {root or 'not found (set TMEPSR_DATA_DIR or --data-dir)'}")
    print(f"{'dataset':36} {'present':8} {'time':8} {'explanations':30} location")
    for spec in DATASETS.values():
        folder = spec.locate(args.data_dir)
        where = "embedded in the package" if folder and spec.embedded and root is None else (folder or "-")
        print(f"{spec.name:36} {'yes' if folder else 'no':8} {spec.time:8} {spec.explanations:30} {where}")
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    stats = log_stats(load_dataset(args.name, args.data_dir))
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    seq = stats["sequence_length"]
    span = " .. ".join(stats["time_span"]) if stats["time_span"] else "order only (no timestamps)"
    rows = [
        ("dataset", stats["name"]),
        ("users / items / events", f"{stats['users']:,} / {stats['items']:,} / {stats['events']:,}"),
        ("time", f"{stats['time']}: {span}"),
        (
            "sequence length",
            f"min {seq['min']}, mean {seq['mean']}, median {seq['median']:g}, "
            f"p90 {seq['p90']:g}, max {seq['max']}",
        ),
        ("users with val+test events", f"{stats['eval_users']:,}"),
        (
            "explanation vocabulary",
            f"{stats['explanation_vocab']:,} ids, {stats['explanation_coverage']:.1%} of events labelled",
        ),
        ("explanation rule", stats["explanation_rule"]),
    ]
    if "eval_users_last_two_tied" in stats:
        rows.append(
            ("last two events tied", f"{stats['eval_users_last_two_tied']:,} users (broken by item id)")
        )
    for key, value in rows:
        print(f"{key:28} {value}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from simulations.train import train_and_report

    overrides = json.loads(args.set) if args.set else {}
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


def _passphrase(args: argparse.Namespace, confirm: bool) -> str:
    """The signing key's passphrase: from the environment variable named by --passphrase-env, else a prompt."""
    import getpass
    import os

    if args.passphrase_env:
        if args.passphrase_env not in os.environ:
            raise ValueError(f"environment variable {args.passphrase_env} is not set")
        return os.environ[args.passphrase_env]
    phrase = getpass.getpass("signing key passphrase: ")
    if confirm and getpass.getpass("again: ") != phrase:
        raise ValueError("the passphrases differ")
    return phrase


def _cmd_keys(args: argparse.Namespace) -> int:
    from server.release import generate_keys

    private, public = generate_keys(args.out, _passphrase(args, confirm=True), overwrite=args.overwrite)
    print(f"private signing key (passphrase-encrypted, keep it on the server): {private}")
    print(f"public key (pin it in the app): {public}")
    return 0


def _cmd_credentials(args: argparse.Namespace) -> int:
    from server.credentials import (
        CA_CERT,
        add_node_keys,
        generate_credentials,
        superlink_args,
        supernode_args,
    )

    if args.credentials_command == "init":
        if args.nodes < 0:
            raise ValueError(f"--nodes must be >= 0, got {args.nodes}")
        names = args.node or [f"node-{k}" for k in range(args.nodes)]
        tls, nodes = generate_credentials(args.out, args.host, names, days=args.days)
        print(f"CA certificate (give it to every SuperNode and to the `flwr` CLI): {tls.ca_cert}")
        print(f"CA private key (keep it offline): {tls.ca_key}")
        print(f"SuperLink: flower-superlink {' '.join(superlink_args(tls))} --host HOST --port 9093")
        ca = tls.ca_cert
    else:
        nodes = add_node_keys(args.dir, args.names)
        ca = Path(args.dir) / CA_CERT
    for node in nodes:
        print(
            f"{node.name}: register with `flwr supernode register {node.public_key} CONNECTION`; run "
            f"flower-supernode {' '.join(supernode_args(ca, node))} --superlink HOST:9093 ..."
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from server.publish import build_bundle, model_from_checkpoint
    from server.release import load_private_key

    model, log, version = model_from_checkpoint(args.checkpoint, args.dataset, args.data_dir)
    key = load_private_key(args.key, _passphrase(args, confirm=False))
    manifest = build_bundle(model, log, args.out, key, model_version=args.version or version, int8=args.int8)
    size = sum(f["bytes"] for f in manifest.files.values())
    print(
        f"signed bundle {manifest.model_version} ({len(manifest.files)} files, {size / 1e3:.0f} KB) -> {args.out}"
    )
    return 0


def _check_same_catalogue(log: InteractionLog, rec: Recommender) -> None:
    """Refuse to replay a dataset whose item ids name other items than the bundle's catalogue (ids that merely
    collide, e.g. MovieLens 100k's "1" vs latest-small's "1"): compared by title where both have titles."""
    if log.name == rec.manifest.data.get("dataset") or not log.item_meta.titles:
        return
    mine = dict(zip(map(str, log.item_ids), log.item_meta.titles, strict=True))
    theirs = dict(zip(rec.catalogue_ids, rec.catalogue_titles, strict=True))
    differ = [(i, title, theirs[i]) for i, title in mine.items() if i in theirs and title != theirs[i]]
    if differ:
        i, a, b = differ[0]
        raise ValueError(
            f"{log.name} is not the catalogue of this bundle ({rec.manifest.data.get('dataset')}): "
            f"{len(differ)} shared item ids name other items (e.g. {i}: {a!r} here, {b!r} in the "
            "bundle)"
        )


def _cmd_recommend(args: argparse.Namespace) -> int:
    import os
    import tempfile
    from dataclasses import asdict

    from client_sdk.runtime import Recommender
    from client_sdk.store import EncryptedStore
    from shared_model.top_k import format_recommendations, recent_titles

    with tempfile.TemporaryDirectory() as tmp:
        store = EncryptedStore(Path(tmp) / "device.store", key=os.urandom(32))
        rec = Recommender.open(args.bundle, args.public_key, store, on_unknown="ignore")
        log = load_dataset(args.dataset or rec.manifest.data["dataset"], args.data_dir)
        _check_same_catalogue(log, rec)
        users = {str(u): n for n, u in enumerate(log.user_ids)}
        if args.user not in users:
            raise ValueError(
                f"user {args.user!r} is not in {log.name} (ids like {', '.join(map(str, log.user_ids[:3]))})"
            )
        user = users[args.user]
        lo, hi = log.user_ptr[user], log.user_ptr[user + 1]
        known = sum(
            rec.record(log.item_ids[i], int(t), save=False)
            for i, t in zip(log.item[lo:hi], log.time[lo:hi], strict=True)
        )
        print(
            f"user {args.user}: {known} of {hi - lo} events replayed through the on-device runtime "
            f"(bundle {rec.manifest.model_version}, its initial personal weights); "
            f"most recent: {recent_titles(log, user)}"
        )
        print(format_recommendations([asdict(r) for r in rec.recommend(args.k)]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tmepsr", description="Federated, on-device sequential recommendation."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="datasets: list them, print statistics")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p_list = data_sub.add_parser("list", help="known datasets, where they are found, whether present")
    p_list.add_argument("--data-dir", help="shared data folder (default: $TMEPSR_DATA_DIR or ../shared/data)")
    p_list.set_defaults(func=_cmd_data_list)
    p_stats = data_sub.add_parser("stats", help="statistics of a dataset (a known name or a file path)")
    p_stats.add_argument("name", help="dataset name from 'tmepsr data list', or a .inter/.csv/.parquet file")
    p_stats.add_argument(
        "--data-dir", help="shared data folder (default: $TMEPSR_DATA_DIR or ../shared/data)"
    )
    p_stats.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p_stats.set_defaults(func=_cmd_data_stats)

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
    p_train.add_argument(
        "--data-dir", help="shared data folder (default: $TMEPSR_DATA_DIR or ../shared/data)"
    )
    p_train.set_defaults(func=_cmd_train)

    p_keys = sub.add_parser("keys", help="create the Ed25519 key pair that signs on-device bundles")
    p_keys.add_argument("--out", default="keys", help="folder for the key files (default: keys)")
    p_keys.add_argument("--passphrase-env", help="read the passphrase from this environment variable")
    p_keys.add_argument("--overwrite", action="store_true", help="replace existing key files")
    p_keys.set_defaults(func=_cmd_keys)

    p_cred = sub.add_parser("credentials", help="TLS certificates and SuperNode keys for a deployment")
    cred_sub = p_cred.add_subparsers(dest="credentials_command", required=True)
    p_init = cred_sub.add_parser("init", help="a private CA, the SuperLink's TLS certificate, SuperNode keys")
    p_init.add_argument("--out", required=True, help="new folder for the files (nothing is overwritten)")
    p_init.add_argument(
        "--host", action="append", default=[], help="SuperLink DNS name or IP (repeatable; loopback is added)"
    )
    nodes = p_init.add_mutually_exclusive_group()
    nodes.add_argument(
        "--nodes", type=int, default=0, help="number of SuperNode key pairs (node-0, node-1, ...)"
    )
    nodes.add_argument("--node", action="append", help="a SuperNode key pair with this name (repeatable)")
    p_init.add_argument("--days", type=int, default=365, help="certificate validity in days (default 365)")
    p_init.set_defaults(func=_cmd_credentials)
    p_add = cred_sub.add_parser("add-node", help="more SuperNode key pairs in an existing credentials folder")
    p_add.add_argument("--dir", required=True, help="the credentials folder (tmepsr credentials init)")
    p_add.add_argument("names", nargs="+", help="node names")
    p_add.set_defaults(func=_cmd_credentials)

    p_export = sub.add_parser(
        "export", help="build a signed on-device bundle (ONNX graphs) from a checkpoint"
    )
    p_export.add_argument(
        "--checkpoint", required=True, help="model.pt (tmepsr train) or a simulate --out-dir"
    )
    p_export.add_argument(
        "--key", default="keys/bundle_signing_key.pem", help="private signing key (tmepsr keys)"
    )
    p_export.add_argument("--passphrase-env", help="read the key's passphrase from this environment variable")
    p_export.add_argument("--out", required=True, help="new bundle folder")
    p_export.add_argument(
        "--int8",
        action="store_true",
        help="int8 weights (item table, explanation branch, initial personal weights; per-row scales)",
    )
    p_export.add_argument("--version", help="model version label (default: preset and round)")
    p_export.add_argument("--dataset", help="dataset of the catalogue (default: the checkpoint's)")
    p_export.add_argument(
        "--data-dir", help="shared data folder (default: $TMEPSR_DATA_DIR or ../shared/data)"
    )
    p_export.set_defaults(func=_cmd_export)

    p_rec = sub.add_parser("recommend", help="replay a dataset user's history through the on-device runtime")
    p_rec.add_argument("--bundle", required=True, help="signed bundle folder (tmepsr export)")
    p_rec.add_argument(
        "--public-key", default="keys/bundle_signing_key.pub.pem", help="the pinned public key"
    )
    p_rec.add_argument("--user", required=True, help="the user's id in the dataset")
    p_rec.add_argument("--k", type=int, default=10)
    p_rec.add_argument("--dataset", help="dataset to replay from (default: the bundle's)")
    p_rec.add_argument("--data-dir", help="shared data folder (default: $TMEPSR_DATA_DIR or ../shared/data)")
    p_rec.set_defaults(func=_cmd_recommend)

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
