"""One device's work in a federated round, independent of Flower: load personal weights from the encrypted
store (or the initial values), take the server's shared arrays, train locally with the same training step as
centralized training, save personal weights atomically, and return only the shared arrays.

A device normally hosts one user. For large simulations it may host several virtual users and return their
example-weighted mean update, which is exactly what FedAvg would compute from them one by one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from shared_model.config import FederatedConfig, TrainConfig
from shared_model.data import InteractionLog, load_dataset
from shared_model.data.split import LeaveOneOutSplit, partition_users, user_data
from shared_model.partition import load_parts, parameter_groups, split_state
from shared_model.protocol.clipping import clip_update
from shared_model.protocol.updates import (
    ITEM_TABLES,
    STATE_COUNTS,
    STATE_SHARES,
    STATES,
    compress,
    densify,
    encode_rows,
    importance_update,
    largest_rows_update,
    sent_rows,
    sparse_update,
    unsent_change,
    update_weight,
    upload_rows,
)
from shared_model.sequence_model import SequenceModel
from shared_model.training import (
    evaluate,
    model_for_run,
    next_item_losses,
    train_end_per_user,
    train_epoch,
)

from .store import DeviceRecord, EncryptedStore, StoreError

RESIDUAL = "residual/"  # the store-state prefix of error feedback's carried upload change


@lru_cache(maxsize=4)
def cached_log(dataset: str, data_dir: str) -> InteractionLog:
    """Each process loads a dataset once (simulated devices share the process-wide copy)."""
    return load_dataset(dataset, data_dir or None)


@lru_cache(maxsize=4)
def _cached_model(cfg: FederatedConfig) -> tuple[SequenceModel, dict[str, np.ndarray]]:
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
class Adaptation:
    """The outcome of a device's local adaptation: whether the gate kept it, the adapted values it kept, the
    mean held-out cross-entropy of the population and adapted values, and the improvement in standard errors."""

    kept: bool
    weights: dict[str, np.ndarray]
    population_loss: float = float("nan")
    adapted_loss: float = float("nan")
    z: float = float("nan")


@dataclass
class RoundResult:
    update: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


class DeviceError(RuntimeError):
    """The device cannot take part in a round: none of its users' stores can be read, or none of its users has
    training events. The ClientApp replies with this one-line reason instead of a traceback."""


class StoredUser(NamedTuple):
    """One read of a user's store: its personal weights and error feedback's carried upload change (by array
    name; empty unless error feedback left something unsent)."""

    personal: dict[str, np.ndarray]
    residual: dict[str, np.ndarray]

    def carried(self, shared: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The carried change of the arrays that still exist with the same shape in ``shared``."""
        return {k: v for k, v in self.residual.items() if k in shared and v.shape == shared[k].shape}


class HostedUsers:
    """The users one Flower node hosts (partition ``partition_id`` of ``num_partitions``) and their encrypted
    stores: one user, a real device, in a deployment; several virtual users in a simulation, whose node replies
    with their example-weighted mean update."""

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

    def stored(self, user: int) -> StoredUser:
        """What the user's store holds for training, in one read: its personal weights (the split's personal
        group, else the initial values) and error feedback's carried change (``residual/<array>`` in ``state``)."""
        store = self.store(user)
        if not store.exists():
            return StoredUser(self.initial_personal, {})
        record = store.load()
        weights = record.weights
        personal = (
            {k: weights[k] for k in self.initial_personal}
            if set(self.initial_personal) <= set(weights)
            else self.initial_personal
        )
        residual = {k.removeprefix(RESIDUAL): v for k, v in record.state.items() if k.startswith(RESIDUAL)}
        return StoredUser(personal, residual)

    def personal_weights(self, user: int) -> dict[str, np.ndarray]:
        """The user's personal weights (the split's personal group) from its store, else the initial values."""
        return self.stored(user).personal

    def save_personal(
        self,
        user: int,
        personal: dict[str, np.ndarray],
        server_round: int,
        residual: dict[str, np.ndarray] | None = None,
        **meta: object,
    ) -> None:
        """Write the user's history, personal weights and (error feedback) upload residual to its encrypted
        store (atomically)."""
        own = user_data(self.log, user)
        record = DeviceRecord(
            items=own.items,
            times=own.times,
            state={RESIDUAL + k: v for k, v in (residual or {}).items()},
            weights=personal,
            meta={
                "user": str(self.log.user_ids[user]),
                "round": server_round,
                "split": self.cfg.split,
                **meta,
            },
        )
        self.store(user).save(record)

    def _fit(
        self,
        user: int,
        weights: tuple[dict[str, np.ndarray], ...],
        server_round: int,
        epochs: int,
        trainable: set[str] | None = None,
        item_rows: np.ndarray | None = None,
        head_share: Sequence[float] | None = None,
    ) -> list[dict[str, float]]:
        """``epochs`` local epochs on ``user``'s training events from ``weights`` (left in ``self.model``): all
        parameters (a training round), or only ``trainable`` (local adaptation; the rest frozen, and the
        user's last ``gate_events`` training events held out). ``item_rows``: only these rows of the item
        tables train (sparse upload). ``head_share``: the population's head shares the server last estimated
        (the responsibility balance steers toward the heads it under-uses; None: no steering). Returns each
        epoch's mean loss parts."""
        load_parts(self.model, *weights)
        heads = self.model.cfg.num_heads
        share = np.full(heads, 1 / heads) if head_share is None else np.asarray(head_share, np.float32)
        if hasattr(self.model, "population_share"):
            self.model.population_share = torch.as_tensor(share, dtype=torch.float32)
        adapting = trainable is not None
        params = [p for name, p in self.model.named_parameters() if not adapting or name in trainable]
        for name, p in self.model.named_parameters():
            p.requires_grad_(not adapting or name in trainable)
        train_end = self.train_end.copy()
        if adapting:
            train_end[user] -= self.cfg.gate_events
            tcfg = TrainConfig(lr=self.cfg.adapt_lr, batch_size=1, grad_clip=None, seed=self.cfg.seed)
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=0.0)
        else:
            tcfg = TrainConfig(lr=self.cfg.local_lr, batch_size=1, grad_clip=None, seed=self.cfg.seed)
            optimizer = (
                torch.optim.SGD(params, lr=tcfg.lr)
                if self.cfg.local_optimizer == "sgd"
                else torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
            )
        rng = np.random.default_rng([self.cfg.seed, server_round, int(user), int(adapting)])
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
            return [
                train_epoch(self.model, optimizer, self.log, users, train_end, tcfg, rng)
                for _ in range(epochs)
            ]
        finally:
            for hook in hooks:
                hook.remove()
            for p in self.model.parameters():
                p.requires_grad_(True)

    def adapt(
        self,
        user: int,
        shared: dict[str, np.ndarray],
        server_round: int,
        head_share: Sequence[float] | None = None,
        personal: dict[str, np.ndarray] | None = None,
    ) -> Adaptation:
        """The user's own adaptation of the split's adapted parts (time encoder and interest heads under
        ``population``), behind the device's validation gate; leaves the serving weights in ``self.model``.

        The adapted parts train ``adapt_epochs`` epochs from the population values (everything else frozen) on
        the user's training events except the last ``gate_events``; both versions then predict those held-out
        recent events, and the adaptation is kept only if its cross-entropy there is lower by more than
        ``gate_z`` standard errors of the paired per-event differences (a lower loss on a few events is often
        noise, and an adaptation kept on noise makes recommendations worse). ``personal``: the user's personal
        weights when the caller has read them already (else read from its store). Deterministic in (seed, round,
        user)."""
        if personal is None:
            personal = self.personal_weights(user)
        adapted = set(parameter_groups(self.model, self.cfg.split)["adapted"])
        start, end = int(self.log.user_ptr[user]), int(self.train_end[user])
        if not (self.cfg.adapt_epochs and adapted and end - start >= self.cfg.gate_events + 2):
            load_parts(self.model, shared, personal)
            return Adaptation(kept=False, weights={})
        held_out = np.arange(end - self.cfg.gate_events, end)
        load_parts(self.model, shared, personal)
        before = next_item_losses(self.model, self.log, start, held_out)
        self._fit(
            user, (shared, personal), server_round, self.cfg.adapt_epochs, adapted, head_share=head_share
        )
        after = next_item_losses(self.model, self.log, start, held_out)
        gain = before - after
        mean = float(gain.mean())
        se = float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else 0.0
        kept = mean > 0 and mean > self.cfg.gate_z * se
        weights = {k: v.detach().numpy().copy() for k, v in self.model.named_parameters() if k in adapted}
        if not kept:
            load_parts(self.model, shared, personal)
        z = mean / se if se > 0 else float("nan")
        return Adaptation(kept, weights if kept else {}, float(before.mean()), float(after.mean()), z)

    def train(
        self, shared: dict[str, np.ndarray], server_round: int, head_share: Sequence[float] | None = None
    ) -> RoundResult:
        """Local training of every hosted user; the example-weighted mean of their shared arrays (sparse uploads:
        each user's change as that user's own device would send it, the node's reply over the union of their
        rows, so a node of one user is exactly a deployment's device). The metrics
        carry the users' mean head shares of their target items (``head-share-<h>``, with a responsibility
        balance), from which the server estimates the population's ``head_share`` for the next rounds."""
        torch.set_num_threads(1)
        train_end = self.train_end
        total: dict[str, np.ndarray] = {}
        users = [u for u in self.users if train_end[u] - self.log.user_ptr[u] >= 2]
        if not users:
            raise DeviceError(f"device hosts no user with training events ({len(self.users)} users)")
        users, failures = self._readable(users, "train")  # user -> what its store holds, each read once
        rng = np.random.default_rng([self.cfg.seed, server_round, int(self.users[0]), 1])
        sparse = self.cfg.upload == "sparse"
        sampling = self.cfg.sparse_sampling if sparse else None
        balanced_for = self.cfg.compress if self.cfg.row_budget == "balanced" else None
        dense_training = sampling in ("importance", "error-feedback", "states")  # rows chosen after training
        node_rows: dict[str, list[np.ndarray]] = {}  # sparse: the rows each user's own device would send
        states: list[np.ndarray] = []  # "states": each user's output states, and its example weight
        state_weights: list[int] = []
        examples, losses, shares = 0, [], {}
        for user in users:
            n = update_weight(
                int(train_end[user] - self.log.user_ptr[user]), self.cfg.max_len, self.cfg.local_epochs
            )
            touched = self.log.item[self.log.user_ptr[user] : train_end[user]] + 1  # item table rows
            rows = (
                upload_rows(touched, self.cfg.decoy_rows, len(shared[ITEM_TABLES[0]]), rng)
                if sparse and not dense_training
                else None
            )
            self.model.output_states = [] if sampling == "states" else None
            try:
                epochs = self._fit(
                    user,
                    (shared, users[user].personal),
                    server_round,
                    self.cfg.local_epochs,
                    item_rows=rows,
                    head_share=head_share,
                )
                if sampling == "states":  # one SGD step: one (coordinates, log-priors) pair
                    ((a, prior),) = self.model.output_states
                    states.append(torch.cat((a, prior.unsqueeze(-1)), dim=-1).numpy())
                    state_weights.append(n)
            finally:
                self.model.output_states = None
            losses += [parts["loss"] for parts in epochs]
            for key in (k for k in epochs[-1] if k.startswith("head_share_")):
                shares[key] = shares.get(key, 0.0) + n * epochs[-1][key]
            new_shared, personal = split_state(self.model, self.cfg.split)
            residual = {}
            if sampling == "error-feedback":  # last time's unsent change joins this one's
                carried = users[user].carried(shared)
                new_shared = {k: v + carried[k] if k in carried else v for k, v in new_shared.items()}
            # the server's per-update clips and a sparse device's encoding, applied per user: a simulated node's
            # mean is then a mean of what each user's own device would send (one user per node in a deployment)
            new_shared = clip_update(new_shared, shared, self.cfg.clip_norm, self.cfg.row_clip).arrays
            if sparse:
                decoys, fraction = self.cfg.decoy_rows, self.cfg.row_fraction
                if sampling == "error-feedback":
                    one = largest_rows_update(new_shared, shared, touched, decoys, fraction)
                    residual = unsent_change(new_shared, shared, one)
                elif sampling in ("importance", "states"):  # states: the server computes the untouched rows
                    decoys = decoys if sampling == "importance" else 0
                    one = importance_update(new_shared, shared, touched, decoys, fraction, rng, balanced_for)
                else:
                    one = sparse_update(new_shared, shared, touched, rows, fraction, rng)
                for name, r in sent_rows(one).items():
                    node_rows.setdefault(name, []).append(r)
                # "states": every user's own rows enter the node's mean whole (the union of the users' rows
                # is sent, and the server adds the other rows' change from the states)
                whole = ITEM_TABLES if sampling == "states" else ()
                new_shared = densify(one, shared) | {k: new_shared[k] for k in whole}
            self.save_personal(user, personal, server_round, residual)
            for k, v in new_shared.items():
                total[k] = total.get(k, 0) + n * v.astype(np.float64)
            examples += n
        update = {k: (v / examples).astype(np.float32) for k, v in total.items()}
        if sparse:  # the node replies with its users' mean over the union of their rows
            update = encode_rows(update, {k: np.unique(np.concatenate(r)) for k, r in node_rows.items()})
        if self.cfg.compress != "none":
            update = compress(update, shared, rng, self.cfg.compress)
        if states:
            update |= {
                STATES: np.concatenate(states).astype(
                    np.float32 if self.cfg.compress == "none" else np.float16
                ),
                STATE_COUNTS: np.array([len(x) for x in states], np.int32),
                STATE_SHARES: (np.array(state_weights, np.float64) / examples).astype(np.float32),
            }
        metrics = {"train-loss": float(np.mean(losses)), "failed-users": len(failures)}
        if (
            self.cfg.privacy == "plain"
        ):  # DP and SecAgg+ rounds release nothing per device beyond their update
            metrics |= {k.replace("_", "-"): v / examples for k, v in shares.items()}
        return RoundResult(update, examples, metrics)

    def evaluate(
        self,
        shared: dict[str, np.ndarray],
        stages: str,
        server_round: int = 0,
        adapt: bool = True,
        head_share: Sequence[float] | None = None,
    ) -> RoundResult:
        """Each hosted user's own metrics for each of the comma-separated ``stages`` ("val", "test"), as
        ``<stage>/<metric>`` means over the hosted users, served as the device would serve them (after
        :meth:`adapt`; ``adapt=False``: with the population values of the adapted parts, as the server's
        intermediate evaluations do). With adaptation, the same users are also scored with the population values, paired:
        ``<stage>-population/<metric>``, the share of users whose gate kept their adaptation (``gate/kept``)
        and, over all users with the kept ones' values only, ``<stage>-kept/<metric>`` (served) and
        ``<stage>-kept-population/<metric>``: dividing by ``gate/kept`` gives the kept users' own means."""
        torch.set_num_threads(1)
        sums: dict[str, float] = {}

        def scores(user: int) -> dict[tuple[str, str], float]:
            return {
                (stage, k): v
                for stage in stages.split(",")
                for k, v in evaluate(self.model, self.log, self.split, stage, users=np.array([user])).items()
                if k != "users"
            }

        def add(prefix: str, metrics: dict[tuple[str, str], float]) -> None:
            for (stage, k), v in metrics.items():
                sums[f"{stage}{prefix}/{k}"] = sums.get(f"{stage}{prefix}/{k}", 0.0) + v

        users, failures = self._readable(np.intersect1d(self.users, self.split.eval_users), "evaluate")
        paired = bool(
            adapt and self.cfg.adapt_epochs and parameter_groups(self.model, self.cfg.split)["adapted"]
        )
        for user in users:
            if not paired:
                load_parts(self.model, shared, users[user].personal)
                add("", scores(user))
                continue
            adaptation = self.adapt(user, shared, server_round, head_share, users[user].personal)
            served = population = scores(user)
            add("", served)
            sums["gate/kept"] = sums.get("gate/kept", 0.0) + adaptation.kept
            if adaptation.kept:  # back to the population values of the adapted parts only
                load_parts(self.model, {k: shared[k] for k in adaptation.weights})
                population = scores(user)
                add("-kept", served)
                add("-kept-population", population)
            add("-population", population)
        if paired:  # every device reports the same keys (Flower aggregates only matching records)
            for key in [k for k in sums if k.split("/")[0] in stages.split(",")]:
                stage, name = key.split("/", 1)
                for prefix in ("-kept", "-kept-population"):
                    sums.setdefault(f"{stage}{prefix}/{name}", 0.0)
        metrics = {k: v / max(len(users), 1) for k, v in sums.items()}
        return RoundResult({}, len(users), metrics | {"failed-users": len(failures)})

    def _readable(self, users: np.ndarray | list[int], task: str) -> tuple[dict[int, StoredUser], list[str]]:
        """What the stores of the users whose stores can be read hold, and one line per user whose store
        cannot (such a user sits the round out and its store is left as it is); :class:`DeviceError` if there
        were users and none can."""
        readable, failures = {}, []
        for user in users:
            try:
                readable[int(user)] = self.stored(int(user))
            except StoreError as exc:
                failures.append(f"user {self.log.user_ids[user]}: {type(exc).__name__}: {exc}")
        if failures and not readable:
            more = f" (and {len(failures) - 2} more)" if len(failures) > 2 else ""
            raise DeviceError(f"no user of this device can {task}: {'; '.join(failures[:2])}{more}")
        return readable, failures
