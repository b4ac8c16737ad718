"""Helpers shared by the test modules (and the JavaScript client's fixture builder): a small event log, a tiny
random model, and Flower messages as a server sends and a device returns them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from shared_model.config import FederatedConfig
from shared_model.data import InteractionLog
from shared_model.model import TMEPSR


def make_events(path: Path, users: int = 9, events: int = 14, items: int = 40, seed: int = 0) -> Path:
    """A small CSV event log (users x events) with explanation texts, for fast federated tests."""
    rng = np.random.default_rng(seed)
    rows = ["user,item,timestamp,explanation"]
    for u in range(users):
        t = 1_600_000_000 + int(rng.integers(0, 10_000))
        for _ in range(events):
            t += int(rng.integers(60, 86_400))
            item = int(rng.integers(0, items))
            rows.append(f"u{u},i{item},{t},{'cheap' if item % 2 else 'fast'}|{'red' if item % 3 else 'blue'}")
    path.write_text("\n".join(rows) + "\n")
    return path


def tiny_model(log: InteractionLog, seed: int) -> TMEPSR:
    """A tiny random TME-PSR for ``log`` (d 16, 2 heads, explanations shown with the history prior) whose item
    biases leave no score ties."""
    import torch

    from shared_model.build import build_model
    from shared_model.training import model_config_for

    torch.manual_seed(seed)
    model = build_model(
        model_config_for(log, d_model=16, max_len=16, num_heads=2, explanation_history_prior=1.0)
    ).eval()
    with torch.no_grad():
        model.item_bias.normal_(0, 0.5)  # no score ties
    return model  # type: ignore[return-value]


def tiny_checkpoint(tmp_path: Path) -> tuple[InteractionLog, TMEPSR, Path]:
    """A :func:`make_events` log of 30 users x 20 events, :func:`tiny_model` on it, and the model saved as a
    checkpoint (``tmp_path / "model.pt"``) that names the log as its dataset."""
    from shared_model.data import load_dataset
    from shared_model.training import save_checkpoint

    events = make_events(tmp_path / "events.csv", users=30, events=20)
    log = load_dataset(str(events))
    model = tiny_model(log, 0)
    save_checkpoint(tmp_path / "model.pt", model, {"dataset": str(events), "preset": "tmepsr"})
    return log, model, tmp_path / "model.pt"


def small_federation(tmp_path: Path, users: int = 9, **overrides: Any) -> FederatedConfig:
    """A run on a fresh :func:`make_events` log of ``users`` users, small enough for a test: d 16, windows of
    16 events, two rounds, every node each round, one user per node, writing under ``tmp_path / "run"``."""
    data = make_events(tmp_path / "events.csv", users=users)
    base: dict[str, Any] = dict(
        dataset=str(data),
        max_len=16,
        d_model=16,
        num_rounds=2,
        fraction_train=1.0,
        users_per_node=1,
        out_dir=str(tmp_path / "run"),
    )
    return FederatedConfig(**(base | overrides))


def request_message(cfg: FederatedConfig, shared: dict, kind: str, **extra) -> Message:
    """A server request (train or evaluate) carrying ``shared`` and the run config of ``cfg``."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in shared.items()}),
            "config": ConfigRecord(cfg.to_run_config() | {"server-round": 1, **extra}),
        }
    )
    return Message(content, dst_node_id=1, message_type=kind)
