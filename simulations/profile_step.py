"""Where a training step's time goes, on a CPU or a GPU: milliseconds per step for building the batch, moving it
to the device, the forward pass (with the fused losses' gradients), the backward pass and the optimizer, then
one validation pass, and with ``--ops`` torch.profiler's busiest operators.

    python -m simulations.profile_step --dataset amazon-beauty-5core --model tmepsr --device cuda

The model and batch size are the accuracy suites' for the dataset (``bench_accuracy.DATASET_SETTINGS``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from shared_model.batching import training_batch, training_windows
from shared_model.build import build_model
from shared_model.config import MODEL_PRESETS, TrainConfig
from shared_model.data import load_dataset
from shared_model.data.split import LeaveOneOutSplit
from shared_model.training import evaluate, model_config_for, require_device, train_end_per_user
from simulations.bench_accuracy import DATASET_SETTINGS

PHASES = ("batch", "to_device", "forward", "backward", "optimizer")


def profile(dataset: str, model: str, device: str, steps: int, ops: bool, data_dir: str | None) -> dict:
    """Mean milliseconds per phase over ``steps`` steps (after 3 warm-up steps) and one validation pass's
    seconds; with ``ops`` also prints the profiler's table over 5 more steps."""
    settings = DATASET_SETTINGS.get(dataset, {"model": {}, "train": {}})
    log = load_dataset(dataset, data_dir)
    split = LeaveOneOutSplit(log)
    cfg = model_config_for(log, **(MODEL_PRESETS[model] | settings["model"]))
    batch_size = settings["train"].get("batch_size", TrainConfig().batch_size)
    torch.manual_seed(0)
    net = build_model(cfg).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    train_end = train_end_per_user(log, split)
    users = np.flatnonzero(train_end - log.user_ptr[:-1] >= 2)

    def sync() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    def step() -> list[float]:
        marks = [time.perf_counter()]
        chunk = rng.choice(users, min(batch_size, len(users)), replace=False)
        starts, ends = training_windows(log.user_ptr, train_end, chunk, cfg.max_len, rng)
        batch = training_batch(log, starts, ends, cfg.max_len)
        marks.append(time.perf_counter())
        batch = batch.to(device)
        marks.append(sync())
        optimizer.zero_grad(set_to_none=True)
        loss, _ = net.loss(batch)
        marks.append(sync())
        loss.backward()
        marks.append(sync())
        optimizer.step()
        marks.append(sync())
        return list(np.diff(marks))

    for _ in range(3):
        step()
    times = np.array([step() for _ in range(steps)])
    result = {
        "dataset": dataset,
        "model": model,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch_threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "steps": steps,
        "ms_per_step": dict(zip(PHASES, np.round(1000 * times.mean(0), 2).tolist(), strict=True)),
    }
    result["ms_per_step"]["total"] = round(1000 * float(times.sum(1).mean()), 2)
    if ops:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        gpu = device.startswith("cuda")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(5):
                step()
        key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=45))
    start = sync()
    evaluate(net, log, split, "val", batch_size=512, device=device)
    result["validation_seconds"] = round(sync() - start, 2)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="amazon-beauty-5core")
    parser.add_argument("--model", default="tmepsr", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--ops", action="store_true", help="also print torch.profiler's busiest operators")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    require_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = profile(args.dataset, args.model, args.device, args.steps, args.ops, args.data_dir)
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
