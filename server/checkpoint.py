"""Per-round server checkpoints: the shared arrays, the round reached, the metric history and the server
optimizer's state (FedAdam's moments, so a resumed run steps as an uninterrupted one). Written atomically
(temp file + rename), so a crash mid-write keeps the previous round's checkpoint."""

from __future__ import annotations

import io
import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.config import FederatedConfig

CHECKPOINT = "server_checkpoint.npz"
# Settings a resumed run may change: how long it runs, how often it evaluates, where files live.
RESUMABLE_CHANGES = frozenset({"num_rounds", "eval_every", "round_timeout", "out_dir", "data_dir"})


def save_server_checkpoint(
    out_dir: str | Path,
    shared: dict[str, np.ndarray],
    server_round: int,
    history: list[dict[str, Any]],
    config: dict,
    server_state: dict[str, np.ndarray] | None = None,
) -> Path:
    path = Path(out_dir) / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"round": server_round, "history": history, "config": config}, default=float)
    buf = io.BytesIO()
    np.savez(
        buf,
        __meta__=np.frombuffer(meta.encode(), dtype=np.uint8),
        **{f"shared/{k}": v for k, v in shared.items()},
        **{f"server/{k}": v for k, v in (server_state or {}).items()},
    )
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path


def load_server_checkpoint(
    out_dir: str | Path,
) -> tuple[dict[str, np.ndarray], int, list[dict[str, Any]], dict] | None:
    """``(shared, round, history, config)`` of the last checkpoint, or None when there is none."""
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(data["__meta__"].tobytes().decode())
        shared = {k.removeprefix("shared/"): data[k] for k in data.files if k.startswith("shared/")}
    return shared, int(meta["round"]), meta["history"], meta["config"]


def load_server_state(out_dir: str | Path) -> dict[str, np.ndarray]:
    """The server optimizer's state saved with the last checkpoint ({} when none)."""
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        return {}
    with np.load(path, allow_pickle=False) as data:
        return {k.removeprefix("server/"): data[k] for k in data.files if k.startswith("server/")}


def resumable_checkpoint(
    cfg: FederatedConfig,
) -> tuple[dict[str, np.ndarray], int, list[dict[str, Any]], dict] | None:
    """The checkpoint in ``cfg.out_dir`` if this run continues it, None when there is none.

    A checkpoint saved with other training settings is an error naming them (a rerun must never silently
    restart and overwrite rounds already trained); only :data:`RESUMABLE_CHANGES` may differ. Settings added
    after the checkpoint was written count as their defaults."""
    saved = load_server_checkpoint(cfg.out_dir)
    if saved is None:
        return None
    before = FederatedConfig.from_run_config(saved[3])
    changed = [
        f.name
        for f in fields(cfg)
        if f.name not in RESUMABLE_CHANGES and getattr(before, f.name) != getattr(cfg, f.name)
    ]
    if changed:
        diff = ", ".join(f"{n}: {getattr(before, n)!r} -> {getattr(cfg, n)!r}" for n in changed)
        raise ValueError(
            f"{Path(cfg.out_dir) / CHECKPOINT} holds a run (round {saved[1]}) with other settings ({diff}); "
            "rerun with its settings to continue it, or choose another --out"
        )
    return saved
