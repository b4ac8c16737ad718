"""``tmepsr simulate``: a Flower simulation (the real simulation engine) of TME-PSR on a dataset, ending with
a recommendation with explanations for a sample user, built from that user's own device store and the final
shared arrays. Writes ``<out>/metrics.json``, ``<out>/convergence.png``, ``<out>/server_checkpoint.npz`` and
the encrypted device stores under ``<out>/devices``."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from client_sdk.device import HostedUsers
from shared_model.config import FederatedConfig

HEAD_USAGE_USERS = 200  # users whose top-k lists summarise how the interest heads share the recommendations
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


class _RunSimulationNotice(logging.Filter):
    """Drops Flower's deprecation notice for ``flwr.simulation.run_simulation`` (see :func:`run_simulation`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def run_simulation(
    cfg: FederatedConfig,
    num_cpus: int | None = None,
    verbose: bool = False,
    client_app: Any = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run the federated simulation with Flower's simulation engine (Ray backend); returns the history.
    ``client_app`` replaces the standard ClientApp (tests inject faulty devices this way)."""
    os.environ.update(FLOWER_ENV)
    from flwr.common.logger import update_console_handler
    from flwr.simulation import run_simulation as flwr_run_simulation

    # our own per-round lines are the progress display: Flower's console shows warnings only (unless verbose),
    # without colour codes when stderr is not a terminal, and not the notice that its Python entry point is
    # deprecated in favour of `flwr run` (which runs the same ServerApp/ClientApp: README, "Flower-native")
    update_console_handler(level=logging.INFO if verbose else logging.WARNING, colored=sys.stderr.isatty())
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if _RunSimulationNotice not in map(type, flwr_logger.filters):
        flwr_logger.addFilter(_RunSimulationNotice())

    from client_sdk.device import cached_log
    from client_sdk.flower_client import make_client_app
    from server.app import make_server_app
    from server.checkpoint import resumable_checkpoint

    resumable_checkpoint(cfg)  # a rerun with other settings fails here, before Ray starts
    log = cached_log(cfg.dataset, cfg.data_dir)
    nodes = math.ceil(log.num_users / cfg.users_per_node)
    cpus = num_cpus or os.cpu_count() or 1
    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose}
    # a cluster sizes itself; without one, a new local Ray instance (never one a `ray start` left behind)
    init_args |= {"address": ray_address} if ray_address else {"address": "local", "num_cpus": cpus}
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    flwr_run_simulation(
        server_app=make_server_app(cfg),
        client_app=client_app or make_client_app(),
        num_supernodes=nodes,
        backend_config=backend,
        verbose_logging=verbose,
    )
    import json

    return {"history": json.loads((Path(cfg.out_dir) / "metrics.json").read_text()), "nodes": nodes}


def plot_convergence(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [h["round"] for h in history if "val" in h]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(rounds, [h["val"]["ndcg@10"] for h in history if "val" in h], marker="o", label="val NDCG@10")
    ax[0].plot(
        rounds, [h["val"]["recall@10"] for h in history if "val" in h], marker="o", label="val Recall@10"
    )
    ax[0].set_xlabel("round")
    ax[0].legend()
    loss = [(h["round"], h["train_loss"]) for h in history if "train_loss" in h]
    if loss:
        ax[1].plot(*zip(*loss, strict=True))
    ax[1].set_xlabel("round")
    ax[1].set_ylabel("mean local training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _own_heads(
    model: Any, log: Any, user: int, heads: list[int], adaptation: Any, shared: dict, personal: dict
) -> str:
    """One line: the heads that drove the user's list, each with how many items it drove and the user's own
    history events it follows most (``head_sources``), on the weights the runtime served (its kept adaptation
    or the population's)."""
    from shared_model.partition import load_parts
    from shared_model.top_k import head_sources

    if adaptation.kept:
        load_parts(model, shared, personal | adaptation.weights)
    titles = log.item_meta.titles
    sources = head_sources(model, log, user, heads)  # each head once, in the order of the list
    parts = [
        f"head {h} ({heads.count(h)} of the {len(heads)}) <- "
        + (", ".join(titles[i] if titles else str(log.item_ids[i]) for i in items) or "none of its history")
        for h, items in sources.items()
    ]
    return "Its interest heads and the history events each follows most: " + "; ".join(parts)


def sample_recommendation(
    cfg: FederatedConfig, shared: dict[str, np.ndarray], user: int | None = None, k: int = 10
) -> str:
    """The end of flow 1: publish a signed on-device bundle of the final shared arrays, then recommend for the
    sample user on their device: the torch-free runtime opens the bundle (verifying it) with the user's
    encrypted store (history and personal weights), re-encodes the history and ranks.

    The bundle (``<out>/bundle``) holds the run's initial personal values, never a user's; it is signed with
    a fresh key whose public half is saved as ``<out>/bundle_signing_key.pub.pem`` (a demo key: release
    bundles are signed with ``tmepsr keys`` + ``tmepsr export``). With ``adapt_epochs`` the device first adapts
    its adapted parts to the final population values and keeps the adaptation if its validation gate does.
    ``user`` (dense index): by default the first user whose device trained in the run."""
    import shutil
    from dataclasses import asdict

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from client_sdk.runtime import Recommender
    from server.publish import build_bundle
    from shared_model.partition import load_parts
    from shared_model.top_k import format_recommendations, head_usage, recent_titles

    out = Path(cfg.out_dir)
    device = HostedUsers(cfg, 0, 1, out / "devices")
    if user is None:
        user = next((int(u) for u in device.split.eval_users if device.store(int(u)).exists()), 0)
    trained = device.store(user).exists()
    personal = device.personal_weights(user)
    adaptation = device.adapt(user, shared, cfg.num_rounds, personal=personal)
    if adaptation.kept:  # the device keeps its adaptation (never uploaded) next to its personal weights
        device.save_personal(
            user,
            personal | adaptation.weights,
            cfg.num_rounds,
            adapted_round=cfg.num_rounds,
        )
    load_parts(device.model, shared, device.initial_personal)
    key = Ed25519PrivateKey.generate()
    shutil.rmtree(out / "bundle", ignore_errors=True)
    manifest = build_bundle(
        device.model,
        device.log,
        out / "bundle",
        key,
        model_version=f"{cfg.preset}-round{cfg.num_rounds}",
        check=False,
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (out / "bundle_signing_key.pub.pem").write_bytes(public)
    rec = Recommender.open(out / "bundle", public, device.store(user))
    log = device.log
    recent = recent_titles(log, user)
    size = sum(f["bytes"] for f in manifest.files.values()) / 1e6
    if not trained:
        weights = "the initial personal weights: its device never trained"
    elif adaptation.kept:
        weights = (
            f"its own adaptation of {', '.join(sorted({k.split('.')[0] for k in adaptation.weights}))}, kept"
            f" by its validation gate: held-out loss {adaptation.adapted_loss:.3f} vs population"
            f" {adaptation.population_loss:.3f}, {adaptation.z:.1f} standard errors better"
        )
    elif cfg.adapt_epochs and cfg.split == "population":
        weights = (
            f"the population model: its own adaptation did not beat it clearly on its recent events"
            f" (held-out loss {adaptation.adapted_loss:.3f} vs {adaptation.population_loss:.3f},"
            f" {adaptation.z:.1f} standard errors; the gate needs {cfg.gate_z})"
        )
    else:
        weights = "its own personal weights" if cfg.split != "population" else "the population model"
    head = (
        f"Signed on-device bundle: {out / 'bundle'} ({size:.1f} MB). Sample user {log.user_ids[user]} on the "
        f"on-device runtime (onnxruntime, {weights}; {len(rec.history)} stored events; most recent: {recent})"
    )
    recs = rec.recommend(k)
    lines = [head, format_recommendations([asdict(r) for r in recs])]
    if device.model.cfg.num_heads > 1:
        lines.append(
            _own_heads(device.model, log, user, [r.head for r in recs], adaptation, shared, personal)
        )
        load_parts(device.model, shared, device.initial_personal)  # the population model again
        usage = head_usage(device.model, log, device.split.eval_users[:HEAD_USAGE_USERS], k)
        heads = ", ".join(
            f"head {h} {share:.0%}" + (f" ({', '.join(favours)})" if favours else "")
            for h, (share, favours) in enumerate(
                zip(usage["head_shares"], usage["head_favours"], strict=True)
            )
        )
        lines.append(
            f"Interest heads over the top-{k}s of {usage['users']} users (population model): "
            f"{usage['multi_head_users']:.0%} of the lists draw on 2+ heads; each head's share of the shown items"
            f" and the explanation labels most over-represented among its items (a head's index stands for a"
            f" different taste in each user's state, as above: these are loose averages): {heads}"
        )
    return "\n".join(lines)
