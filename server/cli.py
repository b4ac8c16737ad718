"""The server operator's commands: ``tmepsr keys`` (the bundle signing key pair), ``tmepsr credentials`` (TLS
and SuperNode keys for a deployment) and ``tmepsr export`` (a signed on-device bundle from a checkpoint). The
handlers import what they drive only when they run, so building the parser stays light."""

from __future__ import annotations

import argparse
import getpass
import os
from pathlib import Path

from shared_model.data.locate import DATA_DIR_HELP


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``keys``, ``credentials`` and ``export`` on the ``tmepsr`` subparsers."""
    p_keys = sub.add_parser("keys", help="create the Ed25519 key pair that signs on-device bundles")
    p_keys.add_argument("--out", default="keys", help="folder for the key files (default: keys)")
    p_keys.add_argument("--passphrase-env", help="read the passphrase from this environment variable")
    p_keys.add_argument("--overwrite", action="store_true", help="replace existing key files")
    p_keys.set_defaults(func=_keys)

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
    p_init.set_defaults(func=_credentials)
    p_add = cred_sub.add_parser("add-node", help="more SuperNode key pairs in an existing credentials folder")
    p_add.add_argument("--dir", required=True, help="the credentials folder (tmepsr credentials init)")
    p_add.add_argument("names", nargs="+", help="node names")
    p_add.set_defaults(func=_credentials)

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
    p_export.add_argument("--data-dir", help=DATA_DIR_HELP)
    p_export.set_defaults(func=_export)


def _passphrase(args: argparse.Namespace, confirm: bool) -> str:
    """The signing key's passphrase: from the environment variable named by --passphrase-env, else a prompt."""
    if args.passphrase_env:
        if args.passphrase_env not in os.environ:
            raise ValueError(f"environment variable {args.passphrase_env} is not set")
        return os.environ[args.passphrase_env]
    try:
        phrase = getpass.getpass("signing key passphrase: ")
        if confirm and getpass.getpass("again: ") != phrase:
            raise ValueError("the passphrases differ")
    except EOFError:
        raise ValueError(
            "no terminal to ask for the signing key's passphrase: put it in an environment variable and pass "
            "--passphrase-env NAME"
        ) from None
    return phrase


def _keys(args: argparse.Namespace) -> int:
    from .release import generate_keys

    private, public = generate_keys(args.out, _passphrase(args, confirm=True), overwrite=args.overwrite)
    print(f"private signing key (passphrase-encrypted, keep it on the server): {private}")
    print(f"public key (pin it in the app): {public}")
    return 0


def _credentials(args: argparse.Namespace) -> int:
    from .credentials import CA_CERT, add_node_keys, generate_credentials, superlink_args, supernode_args

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


def _export(args: argparse.Namespace) -> int:
    from .publish import build_bundle, model_from_checkpoint
    from .release import load_private_key

    model, log, version = model_from_checkpoint(args.checkpoint, args.dataset, args.data_dir)
    key = load_private_key(args.key, _passphrase(args, confirm=False))
    manifest = build_bundle(model, log, args.out, key, model_version=args.version or version, int8=args.int8)
    size = sum(f["bytes"] for f in manifest.files.values())
    print(
        f"signed bundle {manifest.model_version} ({len(manifest.files)} files, {size / 1e3:.0f} KB) -> {args.out}"
    )
    return 0
