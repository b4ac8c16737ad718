"""One implementation of training and evaluation, used by centralized training, the Flower client and the
benchmarks: epochs over user windows, full-ranking evaluation, early stopping,
checkpoints.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .batching import Batch, history_of, input_batch, training_batch, training_windows
from .build import build_model
from .config import (
    MODEL_PRESETS,
    FederatedConfig,
    ModelConfig,
    TrainConfig,
    model_config_from_dict,
)
from .data.log import InteractionLog
from .data.split import LeaveOneOutSplit
from .metrics import multilabel_metrics, ranking_metrics, target_ranks
from .sequence_model import SequenceModel


def train_end_per_user(log: InteractionLog, split: LeaveOneOutSplit) -> np.ndarray:
    """Per user, the end (exclusive event index) of the events training may use."""
    ends = log.user_ptr[1:].copy()
    ends[split.eval_users] = split.target_events("val")
    return ends


def train_epoch(
    model: SequenceModel,
    optimizer: torch.optim.Optimizer,
    log: InteractionLog,
    users: np.ndarray,
    train_end: np.ndarray,
    cfg: TrainConfig,
    rng: np.random.Generator,
    progress: bool = False,
) -> dict[str, float]:
    """One pass over ``users`` (shuffled), one window each; returns the mean loss parts."""
    model.train()
    users = users[(train_end[users] - log.user_ptr[users]) >= 2]  # a window needs an input and a target
    order = rng.permutation(users)
    sums: dict[str, float] = {}
    steps = 0
    batches = range(0, len(order), cfg.batch_size)
    for b in tqdm(batches, desc="train", leave=False, disable=not progress):
        chunk = order[b : b + cfg.batch_size]
        starts, ends = training_windows(log.user_ptr, train_end, chunk, model.cfg.max_len, rng)
        batch = training_batch(log, starts, ends, model.cfg.max_len).to(cfg.device)
        optimizer.zero_grad(set_to_none=True)
        loss, parts = model.loss(batch)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
    return {k: v / max(steps, 1) for k, v in sums.items()}


def stage_batches(
    log: InteractionLog, users: np.ndarray, stage: Literal["val", "test"], max_len: int, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, Batch]]:
    """The model inputs that predict ``users``' ``stage`` event (val: their second-to-last, test: their last),
    ``batch_size`` users at a time: each batch's history starts, target event rows and :class:`Batch`."""
    targets = log.user_ptr[users + 1] - {"val": 2, "test": 1}[stage]
    starts = log.user_ptr[users]
    for b in range(0, len(users), batch_size):
        s, t = starts[b : b + batch_size], targets[b : b + batch_size]
        yield s, t, input_batch(log, s, t, max_len)


@torch.no_grad()
def evaluate(
    model: SequenceModel,
    log: InteractionLog,
    split: LeaveOneOutSplit,
    stage: Literal["val", "test"],
    users: np.ndarray | None = None,
    batch_size: int = 512,
    device: str = "cpu",
) -> dict[str, float]:
    """Full-ranking item metrics (history masked) and, when the model explains, explanation metrics given the
    true target item. ``users`` restricts evaluation to some eval users (a device evaluates only its own)."""
    model.eval()
    eval_users = split.eval_users if users is None else np.intersect1d(users, split.eval_users)
    if len(eval_users) == 0:
        raise ValueError("no user to evaluate (users need at least 3 events)")
    ranks, expl_scores, attested, expl_rows = [], [], [], []
    candidates = torch.as_tensor(split.explanation_candidates) if model.explanation is not None else None
    for s, t, batch in stage_batches(log, eval_users, stage, model.cfg.max_len, batch_size):
        batch = batch.to(device)
        last = model.encode(batch)[:, -1]
        scores = model.item_scores(last)
        ranks.append(target_ranks(scores, log.item[t], history_of(log, s, t)))
        if model.explanation is not None and len(log.vocab):
            items = torch.as_tensor(log.item[t], device=device)
            whole = model.explanation_scores(last, items).cpu()
            expl_scores.append(whole.numpy())
            bonus = model.explanation.input_bonus(candidates, batch.items.cpu(), batch.mask.cpu())
            attested.append(model.explanation.shown_scores(whole, candidates[items.cpu()], bonus).numpy())
            expl_rows.append(t)
    out = ranking_metrics(np.concatenate(ranks))
    out["users"] = float(len(eval_users))
    if expl_scores:
        rows = np.concatenate(expl_rows)
        labels = log.explanations.take(rows)
        if labels.lengths().any():
            em = multilabel_metrics(np.concatenate(expl_scores), labels, ks=(10,))
            out |= {"expl_recall@10": em["recall@10"], "expl_ndcg@10": em["ndcg@10"]}
            # what is shown: ranked among the ids attested for the item (a label never attested is a miss)
            am = multilabel_metrics(np.concatenate(attested), labels, ks=(10,))
            out |= {"expl_attested_recall@10": am["recall@10"], "expl_attested_ndcg@10": am["ndcg@10"]}
    return out


@torch.no_grad()
def next_item_losses(
    model: SequenceModel, log: InteractionLog, start: int, targets: np.ndarray
) -> np.ndarray:
    """Cross-entropy of the full softmax (what training minimises) of each event in ``targets``, predicted from
    the events of ``[start, target)`` before it (one user's held-out recent events)."""
    model.eval()
    batch = input_batch(log, np.full(len(targets), start), targets, model.cfg.max_len)
    scores = model.item_scores(model.encode(batch)[:, -1])
    items = torch.as_tensor(log.item[targets], dtype=torch.long)
    return torch.nn.functional.cross_entropy(scores, items, reduction="none").double().numpy()


def require_device(device: str) -> None:
    """A clear error for a CUDA device that this torch build or machine does not have."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this torch build has no CUDA device; use --device cpu")


@dataclass
class FitResult:
    """What :func:`fit` returns and writes: per-epoch history, the best epoch and its test metrics."""

    best_epoch: int
    best_val: dict[str, float]
    test: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = "patience"  # "patience", "max_epochs" or "budget"
    seconds: float = 0.0


# What a new run may change when it resumes a saved one: the stopping rules, not what is trained.
RESUMABLE_CHANGES = frozenset({"max_epochs", "patience", "max_minutes", "eval_batch_size", "device"})


@dataclass
class _Progress:
    """Everything a training run needs to continue exactly where it stopped (saved after every epoch)."""

    epoch: int = 0
    best: dict[str, torch.Tensor] | None = None
    best_epoch: int = 0
    best_val: dict[str, float] = field(default_factory=lambda: {"ndcg@10": -1.0})
    waited: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # training time before this process


def _save_progress(
    path: Path,
    progress: _Progress,
    model: SequenceModel,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    cfg: TrainConfig,
) -> None:
    payload = {
        "model_config": asdict(model.cfg),
        "train_config": asdict(cfg),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": json.dumps(rng.bit_generator.state),
        "progress": asdict(progress),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _load_progress(
    path: Path,
    model: SequenceModel,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    cfg: TrainConfig,
) -> _Progress:
    payload = torch.load(path, map_location=cfg.device, weights_only=True)
    if model_config_from_dict(payload["model_config"]) != model.cfg:  # fields added since take their defaults
        raise ValueError(f"{path}: saved for another model config; train into another folder")
    saved = payload["train_config"]
    changed = sorted(k for k, v in asdict(cfg).items() if saved.get(k) != v and k not in RESUMABLE_CHANGES)
    if changed:
        raise ValueError(f"{path}: saved with other training settings ({', '.join(changed)}); cannot resume")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["torch_rng"])
    rng.bit_generator.state = json.loads(payload["numpy_rng"])
    return _Progress(**payload["progress"])


def fit(
    model: SequenceModel,
    log: InteractionLog,
    split: LeaveOneOutSplit,
    cfg: TrainConfig,
    progress: bool = True,
    state_path: str | Path | None = None,
) -> FitResult:
    """Train with AdamW, evaluate validation NDCG@10 every ``eval_every`` epochs, keep the best weights
    (early stopping after ``patience`` evaluations without a better one; ``max_minutes`` is a safety budget
    whose runs say ``stopped="budget"``), then score the test split.

    With ``state_path``, the whole training state (weights, optimizer, random generators, early-stopping
    state and history) is saved there after every epoch, and a run that finds the file continues from it:
    an interrupted run resumed this way ends exactly as an uninterrupted one (tested). Only the stopping
    rules (:data:`RESUMABLE_CHANGES`) may differ from the saved run's."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.to(cfg.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state_file = Path(state_path) if state_path is not None else None
    run = _Progress()
    if state_file is not None and state_file.exists():
        run = _load_progress(state_file, model, optimizer, rng, cfg)
    train_end = train_end_per_user(log, split)
    users = np.arange(log.num_users)
    stopped = "patience" if run.waited >= cfg.patience else "max_epochs"  # a finished run stays finished
    start = time.perf_counter() - run.seconds
    bar = tqdm(
        range(run.epoch + 1, cfg.max_epochs + 1) if stopped == "max_epochs" else [],
        desc=f"{model.cfg.kind} on {log.name}",
        disable=not progress,
        initial=run.epoch,
        total=cfg.max_epochs,
    )
    for epoch in bar:
        parts = train_epoch(model, optimizer, log, users, train_end, cfg, rng)
        row: dict[str, Any] = {"epoch": epoch, "seconds": time.perf_counter() - start, **parts}
        if epoch % cfg.eval_every == 0:
            val = evaluate(model, log, split, "val", batch_size=cfg.eval_batch_size, device=cfg.device)
            row["val"] = val
            if val["ndcg@10"] > run.best_val["ndcg@10"]:
                run.best_val, run.best_epoch, run.waited = val, epoch, 0
                run.best = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                run.waited += 1
            bar.set_postfix(
                loss=f"{parts.get('loss', 0):.3f}", val_ndcg10=f"{val['ndcg@10']:.4f}", best=run.best_epoch
            )
        run.history.append(row)
        run.epoch, run.seconds = epoch, time.perf_counter() - start
        if state_file is not None:
            _save_progress(state_file, run, model, optimizer, rng, cfg)
        if run.waited >= cfg.patience:
            stopped = "patience"
            break
        if cfg.max_minutes is not None and time.perf_counter() - start > 60 * cfg.max_minutes:
            stopped = "budget"
            break
    if run.best is not None:
        model.load_state_dict(run.best)
    test = evaluate(model, log, split, "test", batch_size=cfg.eval_batch_size, device=cfg.device)
    return FitResult(run.best_epoch, run.best_val, test, run.history, stopped, time.perf_counter() - start)


def save_checkpoint(path: str | Path, model: SequenceModel, extra: dict[str, Any] | None = None) -> None:
    """Weights and the model config (JSON inside the file), so :func:`load_checkpoint` needs nothing else."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": asdict(model.cfg), "state_dict": model.state_dict(), "extra": extra or {}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> tuple[SequenceModel, dict[str, Any]]:
    """Rebuild the model of a checkpoint (weights load bit-identically) and return it with its extras."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    model = build_model(model_config_from_dict(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model, payload["extra"]


def model_config_for(log: InteractionLog, **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` sized for ``log`` (items, explanation vocabulary, time unit); an override that is
    not a ModelConfig field is an error naming the known ones."""
    base = {"num_items": log.num_items, "num_explanations": len(log.vocab), "time_unit": log.time_unit}
    if not len(log.vocab):
        base["use_explanations"] = False
    return model_config_from_dict(base | overrides)


def write_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")


def model_for_run(fed: FederatedConfig, log: InteractionLog, **model_overrides: Any) -> SequenceModel:
    """The initial model of a federated run. Seeded, so the server and every device build identical initial
    weights (devices take their initial personal weights from it). ``model_overrides``: further
    :class:`ModelConfig` settings (a what-if, e.g. ``simulations.federated_proxy``'s dropout variants)."""
    overrides = {
        "max_len": fed.max_len,
        "d_model": fed.d_model,
        "explanation_history_prior": fed.explanation_history_prior,
    }
    cfg = model_config_for(log, **(MODEL_PRESETS[fed.preset] | overrides | model_overrides))
    torch.manual_seed(fed.seed)
    return build_model(cfg)
