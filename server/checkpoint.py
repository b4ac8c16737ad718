"""Per-round server checkpoints: the shared arrays, the round reached, the metric history and the server
optimizer's state (FedAdam's moments, so a resumed run steps as an uninterrupted one). Written atomically
(temp file + rename), so a crash mid-write keeps the previous round's checkpoint."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

CHECKPOINT = "server_checkpoint.npz"


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
