"""Centralized training of one model preset on one dataset: the code behind ``tmepsr train`` and the
benchmarks. Writes ``<out>/results.json`` (config, per-epoch curve, best validation, test metrics) and
``<out>/model.pt``."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from shared_model.baselines import popularity_explanation_metrics, popularity_item_metrics
from shared_model.build import build_model
from shared_model.config import MODEL_PRESETS, TrainConfig
from shared_model.data import load_dataset
from shared_model.data.split import LeaveOneOutSplit
from shared_model.training import fit, model_config_for, require_device, save_checkpoint, write_json

STATE_FILE = "train_state.pt"


def train_and_report(
    dataset: str,
    model: str,
    out: str | Path,
    data_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    resume: bool = False,
    **train_kwargs: Any,
) -> dict[str, Any]:
    """Train ``model`` (a preset name or "popularity") on ``dataset`` and write its results; returns them.

    The training state is saved to ``<out>/train_state.pt`` after every epoch; ``resume=True`` continues
    from it (an error names the file when it exists and ``resume`` is False, so no run is overwritten)."""
    log = load_dataset(dataset, data_dir)
    split = LeaveOneOutSplit(log)
    out = Path(out)
    if model == "popularity":
        start = time.perf_counter()
        test = popularity_item_metrics(log, split, "test")
        if len(log.vocab):
            test |= popularity_explanation_metrics(log, split, "test")
        result = {
            "dataset": log.name,
            "model": model,
            "best_epoch": 0,
            "stopped": "n/a",
            "test": test,
            "val": popularity_item_metrics(log, split, "val"),
            "parameters": 0,
            "seconds": time.perf_counter() - start,
        }
        write_json(out / "results.json", result)
        return result
    if model not in MODEL_PRESETS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODEL_PRESETS)}, popularity")
    cfg = model_config_for(log, **(MODEL_PRESETS[model] | (overrides or {})))
    train_cfg = TrainConfig(**train_kwargs)
    require_device(train_cfg.device)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file: results go into a folder")
    state = out / STATE_FILE
    if state.exists() and not resume:
        raise FileExistsError(f"{state} holds a training run: resume it, or train into another folder")
    torch.manual_seed(train_cfg.seed)
    net = build_model(cfg)
    fitted = fit(net, log, split, train_cfg, progress=progress, state_path=state)
    result = {
        "dataset": log.name,
        "model": model,
        "config": asdict(cfg),
        "train_config": asdict(train_cfg),
        "parameters": sum(p.numel() for p in net.parameters()),
        "best_epoch": fitted.best_epoch,
        "stopped": fitted.stopped,
        "seconds": fitted.seconds,
        "val": fitted.best_val,
        "test": fitted.test,
        "history": fitted.history,
        "torch_threads": torch.get_num_threads(),
    }
    save_checkpoint(out / "model.pt", net.cpu(), {"dataset": log.name, "preset": model})
    write_json(out / "results.json", result)
    return result
