"""Benchmark 3 (efficiency): training throughput and activation memory of TME-PSR (and with one interest head:
the cost of per-item routing), the multihead LRU, the LRURec-equivalent and GRU4Rec vs SASRec at equal d and sequence length (full-softmax loss over the ML-1M
catalogue size, every position a target with an explanation label), and single-event inference latency (the
LRU's O(1) step vs re-running SASRec over the history). Everything runs in one process, one thread,
interleaved, so ratios are fair on a noisy machine.

Run: ``python -m simulations.bench_efficiency``; writes ``simulations/results/bench_efficiency.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from shared_model.batching import Batch
from shared_model.build import build_model
from shared_model.config import MODEL_PRESETS, ModelConfig
from shared_model.sequence_model import SequenceModel

RESULTS = Path(__file__).parent / "results"
MODELS = ("tmepsr", "tmepsr-one-head", "multihead-lru", "lrurec", "sasrec", "gru4rec")


def _batch(num_items: int, batch: int, length: int, num_expl: int, rng: np.random.Generator) -> Batch:
    items = torch.from_numpy(rng.integers(1, num_items + 1, size=(batch, length)))
    times = torch.from_numpy(1_500_000_000 + np.cumsum(rng.integers(0, 86_400, size=(batch, length)), axis=1))
    targets = torch.from_numpy(rng.integers(1, num_items + 1, size=(batch, length)))
    pos = torch.arange(batch * length)
    return Batch(
        items,
        times,
        torch.ones(batch, length, dtype=torch.bool),
        targets,
        pos,
        torch.from_numpy(rng.integers(0, num_expl, size=batch * length)),
        torch.ones(batch * length),
    )


def _model(name: str, num_items: int, num_expl: int, d: int, length: int) -> SequenceModel:
    cfg = ModelConfig(num_items=num_items, num_explanations=num_expl, d_model=d, max_len=length)
    return build_model(ModelConfig(**({**cfg.__dict__} | MODEL_PRESETS[name])))


def _activation_bytes(model: SequenceModel, batch: Batch) -> int:
    """Bytes of tensors autograd keeps for the backward pass (each storage counted once), plus parameters,
    gradients and AdamW's two moments: the part of training memory that differs between models."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model.loss(batch)
    loss.backward()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return sum(seen.values()) + 4 * params


def _train_step_seconds(model: SequenceModel, batch: Batch, opt: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss, _ = model.loss(batch)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


@torch.no_grad()
def _latency(models: dict[str, SequenceModel], length: int, num_items: int, events: int) -> dict[str, float]:
    """Median seconds to take one new event and produce item scores, batch 1."""
    rng = np.random.default_rng(0)
    out = {}
    lru = models["tmepsr"].eval()
    lru_state, time_state = lru.initial_state(1)
    t = torch.tensor([1_500_000_000])
    samples = []
    for _ in range(events):
        item = torch.from_numpy(rng.integers(0, num_items, size=1))
        t = t + int(rng.integers(0, 86_400))
        start = time.perf_counter()
        y, lru_state, time_state = lru.step(item, t, lru_state, time_state)
        lru.item_scores(y)
        samples.append(time.perf_counter() - start)
    out["tmepsr_step"] = float(np.median(samples))
    sas = models["sasrec"].eval()
    items = torch.from_numpy(rng.integers(1, num_items + 1, size=(1, length)))
    batch = Batch(items, torch.zeros_like(items), torch.ones_like(items, dtype=torch.bool))
    samples = []
    for _ in range(events):
        start = time.perf_counter()
        sas.item_scores(sas.encode(batch)[:, -1])
        samples.append(time.perf_counter() - start)
    out["sasrec_rerun"] = float(np.median(samples))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=3416, help="catalogue size (ML-1M: 3,416)")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--steps", type=int, default=10, help="timed training steps per model (after 2 warm-up)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the targets are for one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    num_expl = 100
    rows = []
    for length in args.lengths:
        models = {m: _model(m, args.items, num_expl, args.d, length) for m in MODELS}
        opts = {m: torch.optim.AdamW(models[m].parameters(), lr=1e-3) for m in MODELS}
        batch = _batch(args.items, args.batch, length, num_expl, rng)
        times: dict[str, list[float]] = {m: [] for m in MODELS}
        for step in range(args.steps + 2):  # interleaved, so machine noise hits every model alike
            for m in MODELS:
                seconds = _train_step_seconds(models[m], batch, opts[m])
                if step >= 2:
                    times[m].append(seconds)
        latency = _latency(models, length, args.items, events=200)
        for m in MODELS:
            rows.append(
                {
                    "model": m,
                    "length": length,
                    "d": args.d,
                    "batch": args.batch,
                    "items": args.items,
                    "train_seconds_per_step_median": float(np.median(times[m])),
                    "train_sequences_per_second": args.batch / float(np.median(times[m])),
                    "train_memory_bytes": _activation_bytes(models[m], batch),
                    "parameters": sum(p.numel() for p in models[m].parameters()),
                }
            )
        by = {r["model"]: r for r in rows if r["length"] == length}
        for m in MODELS:
            by[m]["throughput_vs_sasrec"] = (
                by[m]["train_sequences_per_second"] / by["sasrec"]["train_sequences_per_second"]
            )
            by[m]["memory_vs_sasrec"] = by[m]["train_memory_bytes"] / by["sasrec"]["train_memory_bytes"]
        by["tmepsr"]["inference_seconds_one_event"] = latency["tmepsr_step"]
        by["sasrec"]["inference_seconds_one_event"] = latency["sasrec_rerun"]
        by["tmepsr"]["inference_speedup_vs_sasrec_rerun"] = latency["sasrec_rerun"] / latency["tmepsr_step"]
        print(json.dumps([by[m] for m in MODELS], indent=1))
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "threads": args.threads,
        "torch": torch.__version__,
        "note": "memory = autograd-saved tensors + 4x parameters (weights, grads, AdamW moments)",
    }
    (RESULTS / "bench_efficiency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "| model | L | train seq/s | x SASRec | train memory MB | x SASRec | params | one-event inference ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        inf = r.get("inference_seconds_one_event")
        lines.append(
            f"| {r['model']} | {r['length']} | {r['train_sequences_per_second']:.0f} | {r['throughput_vs_sasrec']:.2f} | "
            f"{r['train_memory_bytes'] / 2**20:.0f} | {r['memory_vs_sasrec']:.2f} | {r['parameters']:,} | "
            f"{'' if inf is None else f'{1000 * inf:.3f}'} |"
        )
    (RESULTS / "bench_efficiency.md").write_text("\n".join(lines) + "\n")
    _plot(rows, RESULTS / "bench_efficiency.png")
    print("\n".join(lines))


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    width = 0.8 / len(MODELS)
    for k, m in enumerate(MODELS):
        sub = [next(r for r in rows if r["model"] == m and r["length"] == n) for n in lengths]
        xs = [i + k * width for i in range(len(lengths))]
        axes[0].bar(xs, [r["train_sequences_per_second"] for r in sub], width, label=m)
        axes[1].bar(xs, [r["train_memory_bytes"] / 2**20 for r in sub], width, label=m)
    for ax, title in zip(axes, ("training sequences/s", "training memory (MB)"), strict=True):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(lengths))], [f"L={n}" for n in lengths])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
