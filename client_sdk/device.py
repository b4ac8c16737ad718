"""One device's work in a federated round, independent of Flower: load personal weights from the encrypted
store (or the initial values), take the server's shared arrays, train locally with the same training step as
centralized training, save personal weights atomically, and return only the shared arrays.

A device normally hosts one user. For large simulations it may host several virtual users and return their
example-weighted mean update, which is exactly what FedAvg would compute from them one by one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from shared_model.config import FederatedConfig, TrainConfig
from shared_model.data import InteractionLog, load_dataset
from shared_model.data.split import LeaveOneOutSplit, partition_users, user_data
from shared_model.partition import load_parts, parameter_groups, split_state
from shared_model.recommender import SequenceRecommender
from shared_model.training import evaluate, model_for_run, train_end_per_user, train_epoch
from shared_model.updates import ITEM_TABLES, compress_int8, encode_sparse, upload_rows

from .store import DeviceRecord, EncryptedStore


@lru_cache(maxsize=4)
def cached_log(dataset: str, data_dir: str) -> InteractionLog:
    """Each process loads a dataset once (simulated devices share the process-wide copy)."""
    return load_dataset(dataset, data_dir or None)


@lru_cache(maxsize=4)
def _cached_model(cfg: FederatedConfig) -> tuple[SequenceRecommender, dict[str, np.ndarray]]:
    """One model (and its initial personal weights) per process and run config: a simulation process serves
    many nodes and rounds one message at a time, and every use loads its shared and personal weights afresh."""
    model = model_for_run(cfg, cached_log(cfg.dataset, cfg.data_dir))
    return model, split_state(model, cfg.split)[1]


@lru_cache(maxsize=4)
def _cached_split(dataset: str, data_dir: str) -> tuple[LeaveOneOutSplit, np.ndarray]:
    """The split and each user's end of training events, once per process and dataset."""
    log = cached_log(dataset, data_dir)
    split = LeaveOneOutSplit(log)
    return split, train_end_per_user(log, split)


def simulation_key(seed: int, user_id: object) -> bytes:
    """A per-device 256-bit store key for simulations (reproducible). Real devices use their own key."""
    return hashlib.sha256(f"tmepsr-simulation-key:{seed}:{user_id}".encode()).digest()


@dataclass
class RoundResult:
    update: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


class Device:
    """The users hosted by one node (partition ``partition_id`` of ``num_partitions``) and their stores."""

    def __init__(
        self, cfg: FederatedConfig, partition_id: int, num_partitions: int, store_dir: str | Path
    ) -> None:
        self.cfg = cfg
        self.log = cached_log(cfg.dataset, cfg.data_dir)
        self.split, self.train_end = _cached_split(cfg.dataset, cfg.data_dir)
        self.users = partition_users(self.log.num_users, num_partitions, cfg.seed)[partition_id]
        self.store_dir = Path(store_dir)
        self.model, self.initial_personal = _cached_model(cfg)

    def store(self, user: int) -> EncryptedStore:
        uid = self.log.user_ids[user]
        return EncryptedStore(self.store_dir / f"user-{uid}.store", key=simulation_key(self.cfg.seed, uid))

    def personal_weights(self, user: int) -> dict[str, np.ndarray]:
        store = self.store(user)
        if store.exists():
            weights = store.load().weights
            if set(weights) == set(self.initial_personal):
                return weights
        return self.initial_personal

    def save_personal(self, user: int, personal: dict[str, np.ndarray], server_round: int) -> None:
        """Write the user's history and personal weights to its encrypted store (atomically)."""
        own = user_data(self.log, user)
        record = DeviceRecord(
            items=own.items, times=own.times, state={}, weights=personal,
            meta={"user": str(self.log.user_ids[user]), "round": server_round, "split": self.cfg.split},
        )  # fmt: skip
        self.store(user).save(record)

    def _fit(
        self,
        user: int,
        shared: dict[str, np.ndarray],
        personal: dict[str, np.ndarray],
        server_round: int,
        personal_only: bool,
        item_rows: np.ndarray | None = None,
    ) -> list[float]:
        """Local epochs on ``user``'s training events from the given weights (left in ``self.model``): all
        parameters (a training round), or for local adaptation only the card's personal parts (time encoder,
        LRU blocks, interest heads; under other splits these start from the population's averaged values)
        with everything else frozen. ``item_rows``: only these rows of the item tables train (sparse upload)."""
        load_parts(self.model, shared, personal)
        adapted = set(parameter_groups(self.model, "card")["personal"]) if personal_only else None
        params = [p for name, p in self.model.named_parameters() if adapted is None or name in adapted]
        trainable = {id(p) for p in params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trainable)
        epochs = self.cfg.adapt_epochs if personal_only else self.cfg.local_epochs
        tcfg = TrainConfig(lr=self.cfg.local_lr, batch_size=1, grad_clip=None, seed=self.cfg.seed)
        optimizer = (
            torch.optim.SGD(params, lr=tcfg.lr)
            if self.cfg.local_optimizer == "sgd"
            else torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        )
        rng = np.random.default_rng([self.cfg.seed, server_round, int(user), int(personal_only)])
        # dropout draws depend only on (seed, round, user), whichever node hosts the user
        torch.manual_seed(int(rng.integers(2**31)))
        users = np.array([user])
        hooks = []
        if item_rows is not None:
            named = dict(self.model.named_parameters())
            keep = torch.zeros(len(named[ITEM_TABLES[0]]), dtype=torch.bool)
            keep[torch.as_tensor(item_rows)] = True
            for name in ITEM_TABLES:
                mask = keep.view((-1,) + (1,) * (named[name].dim() - 1))
                hooks.append(named[name].register_hook(lambda g, m=mask: g * m))
        try:
            return [train_epoch(self.model, optimizer, self.log, users, self.train_end, tcfg, rng)["loss"]
                    for _ in range(epochs)]  # fmt: skip
        finally:
            for hook in hooks:
                hook.remove()
            for p in self.model.parameters():
                p.requires_grad_(True)

    def serving_weights(self, user: int, shared: dict[str, np.ndarray], server_round: int) -> None:
        """Load what ``user``'s device serves with into ``self.model``: the shared arrays and its personal
        weights, adapted to these shared arrays when ``adapt_epochs`` > 0. Adaptation is deterministic in
        (seed, round, user) and not saved, so validation and test see the same weights and evaluation never
        changes the training run."""
        personal = self.personal_weights(user)
        if self.cfg.adapt_epochs and self.train_end[user] - self.log.user_ptr[user] >= 2:
            self._fit(user, shared, personal, server_round, personal_only=True)
        else:
            load_parts(self.model, shared, personal)

    def train(self, shared: dict[str, np.ndarray], server_round: int) -> RoundResult:
        """Local training of every hosted user; the example-weighted mean of their shared arrays."""
        torch.set_num_threads(1)
        train_end = self.train_end
        total: dict[str, np.ndarray] = {}
        users = [u for u in self.users if train_end[u] - self.log.user_ptr[u] >= 2]
        if not users:
            raise ValueError(f"device hosts no user with training events ({len(self.users)} users)")
        rng = np.random.default_rng([self.cfg.seed, server_round, int(self.users[0]), 1])
        rows = None
        if self.cfg.upload == "sparse":
            touched = np.concatenate([self.log.item[self.log.user_ptr[u] : train_end[u]] + 1 for u in users])
            rows = upload_rows(touched, self.cfg.decoy_rows, len(shared[ITEM_TABLES[0]]), rng)
        examples, losses = 0, []
        for user in users:
            n = int(train_end[user] - self.log.user_ptr[user])
            losses += self._fit(
                user, shared, self.personal_weights(user), server_round, personal_only=False, item_rows=rows,
            )  # fmt: skip
            new_shared, personal = split_state(self.model, self.cfg.split)
            self.save_personal(user, personal, server_round)
            for k, v in new_shared.items():
                total[k] = total.get(k, 0) + n * v.astype(np.float64)
            examples += n
        update = {k: (v / examples).astype(np.float32) for k, v in total.items()}
        if rows is not None:
            update = encode_sparse(update, rows)
        if self.cfg.compress == "int8":
            update = compress_int8(update, shared, rng)
        return RoundResult(update, examples, {"train-loss": float(np.mean(losses))})

    def evaluate(self, shared: dict[str, np.ndarray], stages: str, server_round: int = 0) -> RoundResult:
        """Each hosted user's own metrics with its serving weights (:meth:`serving_weights`), for each of the
        comma-separated ``stages`` ("val", "test"), as ``<stage>/<metric>`` means over the hosted users."""
        torch.set_num_threads(1)
        sums: dict[str, float] = {}
        users = np.intersect1d(self.users, self.split.eval_users)
        for user in users:
            self.serving_weights(user, shared, server_round)
            for stage in stages.split(","):
                for k, v in evaluate(self.model, self.log, self.split, stage, users=np.array([user])).items():
                    if k != "users":
                        sums[f"{stage}/{k}"] = sums.get(f"{stage}/{k}", 0.0) + v
        return RoundResult({}, len(users), {k: v / max(len(users), 1) for k, v in sums.items()})
