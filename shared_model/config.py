"""Typed configuration in one place: the model and its training. Saved with every checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .data.log import TimeUnit

ModelKind = Literal["tmepsr", "sasrec", "gru4rec"]
# federated splits of the parameters (the table itself: shared_model/partition.py)
Split = Literal["population", "card", "heads-prior"]
SPLITS: tuple[str, ...] = get_args(Split)
LocalOptimizer = Literal["sgd", "adamw"]
ServerOptimizer = Literal["fedadam", "fedavg"]
Upload = Literal["dense", "sparse"]
Compress = Literal["none", "int8", "int4"]
SparseSampling = Literal["uniform", "importance", "error-feedback", "states"]
RowBudget = Literal["per-matrix", "balanced"]
Privacy = Literal["plain", "dp", "secagg"]
Aggregation = Literal["mean", "trimmed-mean", "median"]
RobustScope = Literal["all", "item-tables"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and loss of a sequence model. Every TME-PSR module can be switched off here.

    ``num_items`` / ``num_explanations`` are vocabulary sizes (item ids are shifted by one inside the model:
    0 is padding). ``time_unit`` is the dataset's ("seconds", "days" or "order").
    """

    num_items: int
    num_explanations: int = 0
    kind: ModelKind = "tmepsr"
    time_unit: TimeUnit = "seconds"
    d_model: int = 64
    num_heads: int = 4  # interest heads (1 = a plain LRU, as LRURec)
    num_blocks: int = 2
    lru_state_expansion: int = 1  # complex LRU states per channel of a head (LRURec: 2)
    embed_norm: bool = False  # LayerNorm (no bias) on the input vectors, as LRURec's embedding layer
    dropout: float = 0.2
    max_len: int = 200
    use_time: bool = True  # dual-view gated time encoder
    use_explanations: bool = True  # explanation branch + its losses
    dynamic_mi: bool = True  # learned MI weights; False = fixed equal weights
    # learned weights from each user's state (a small network); False = one learned pair for everyone
    mi_per_user: bool = True
    alpha: float = 0.5  # weight of the explanation cross-entropy
    beta: float = 0.1  # weight of the mutual-information terms
    gamma: float = 0.01  # weight of the head-diversity regulariser
    head_balance: float = 0.1  # weight of the mean KL(each state's head prior || uniform)
    responsibility_balance: float = (
        0.1  # weight of KL(heads' mean responsibility for the targets || uniform);
    )
    # a federated device steers by the population's shares instead (TMEPSR.population_share)
    mi_temperature: float = 0.2
    # what is shown for an item: the branch's score of each attested id minus this x log(1 + the id's rank
    # among the item's attested ids by training use); 0 = the branch alone. 2 was the best on the Musical
    # Instruments validation set (review phrases) and costs < 1% on MovieLens-100k's genres
    explanation_rank_prior: float = 2.0
    # ... plus this x log(1 + the number of the user's events (those the state has seen) whose item has the id
    # attested): among an item's attested ids, the ones the user's own history carries; 0 = off
    explanation_history_prior: float = 0.0

    def __post_init__(self) -> None:
        _check_types(self)
        if self.num_items < 1:
            raise ValueError("num_items must be >= 1")
        if min(self.max_len, self.d_model, self.num_heads, self.num_blocks) < 1:
            raise ValueError("max_len, d_model, num_heads and num_blocks must be >= 1")
        if (
            not 0 <= self.dropout < 1
            or min(self.alpha, self.beta, self.gamma, self.head_balance, self.responsibility_balance) < 0
        ):
            raise ValueError("dropout must lie in [0, 1) and the loss weights must be >= 0")
        if not self.mi_temperature > 0:
            raise ValueError("mi_temperature must be > 0")
        if min(self.explanation_rank_prior, self.explanation_history_prior) < 0:
            raise ValueError("explanation_rank_prior and explanation_history_prior must be >= 0")
        if self.lru_state_expansion < 1:
            raise ValueError("lru_state_expansion must be >= 1")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.use_explanations and self.kind == "tmepsr" and self.num_explanations < 1:
            raise ValueError(
                "use_explanations needs a dataset with an explanation vocabulary (num_explanations >= 1)"
            )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and early stopping (defaults follow LRURec: AdamW, lr 1e-3, weight decay 1e-2, batch 128,
    gradient norm clipped to 5)."""

    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 128
    grad_clip: float | None = 5.0  # max L2 norm of the whole gradient (None = no clipping)
    max_epochs: int = 200
    patience: int = 10  # evaluations without a better validation NDCG@10
    eval_every: int = 1
    eval_batch_size: int = 512
    max_minutes: float | None = None  # compute budget; training stops (and says so) when it runs out
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        _check_types(self)
        if min(self.batch_size, self.max_epochs, self.patience, self.eval_every, self.eval_batch_size) < 1:
            raise ValueError("batch_size, max_epochs, patience, eval_every and eval_batch_size must be >= 1")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0 and weight_decay >= 0")
        if (self.grad_clip is not None and not self.grad_clip > 0) or (
            self.max_minutes is not None and not self.max_minutes > 0
        ):
            raise ValueError("grad_clip and max_minutes must be > 0 (or None)")


def _check_types(cfg: Any) -> None:
    """Every scalar field holds its declared type (an int where a float is declared is fine) and every
    ``Literal`` field one of its values."""
    for name, allowed in choices(type(cfg)).items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(cfg, name)!r}")
    for f in fields(cfg):
        value, kind = getattr(cfg, f.name), str(f.type)
        expected = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(kind.split(" ")[0])
        if kind.endswith("| None") and value is None or expected is None:
            continue
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise ValueError(f"{f.name} must be {kind}, got {value!r}")


@cache
def choices(cls: type) -> dict[str, tuple[str, ...]]:
    """The allowed values of each ``Literal`` field of a config dataclass (what the CLI offers as choices)."""
    hints = get_type_hints(cls)
    return {f.name: get_args(hints[f.name]) for f in fields(cls) if get_origin(hints[f.name]) is Literal}


def to_json(cfg: ModelConfig | TrainConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Rebuild a :class:`ModelConfig`; unknown keys are an error (a checkpoint from another version)."""
    known = {f.name for f in fields(ModelConfig)}
    if unknown := sorted(set(data) - known):
        raise ValueError(f"unknown model settings {unknown}; known: {', '.join(sorted(known))}")
    return ModelConfig(**data)


# Named model presets: each is a set of ModelConfig overrides. Ablations switch one TME-PSR module off.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tmepsr": {},
    "tmepsr-no-time": {"use_time": False},
    "tmepsr-one-head": {"num_heads": 1},
    "tmepsr-no-explanations": {"use_explanations": False},
    "tmepsr-fixed-mi": {"dynamic_mi": False},
    "tmepsr-global-mi": {"mi_per_user": False},  # learned weights, the same for every user (control)
    "multihead-lru": {"use_time": False, "use_explanations": False},  # the backbone alone, 4 heads
    "lrurec": {"num_heads": 1, "use_time": False, "use_explanations": False},  # LRURec-equivalent
    "sasrec": {"kind": "sasrec", "num_heads": 2, "use_time": False, "use_explanations": False},
    "gru4rec": {
        "kind": "gru4rec",
        "num_heads": 1,
        "num_blocks": 1,
        "use_time": False,
        "use_explanations": False,
    },
}


def _opt(default: Any, help_text: str) -> Any:
    """A config field with a help text (shown by ``tmepsr simulate --help``)."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class FederatedConfig:
    """A federated run. Flat scalars only, so it travels as Flower's run config."""

    dataset: str = _opt("movielens-latest-small", "dataset name (tmepsr data list) or an event file path")
    data_dir: str = _opt("", "shared data folder ('' = $TMEPSR_DATA_DIR, ../shared/data, then embedded)")
    preset: str = _opt(
        "tmepsr", "model preset (MODEL_PRESETS: tmepsr, its ablations, lrurec, sasrec, gru4rec)"
    )
    max_len: int = _opt(50, "events per training window and per input")
    d_model: int = _opt(64, "embedding and state width")
    # 32: the best of 0-32 on latest-small's validation set (shown explanations 1.03x -> 1.09x item-aware
    # popularity on test); 0 for labels users wrote (Musical Instruments' review phrases: any weight lost there)
    explanation_history_prior: float = _opt(
        32.0, "shown explanations: + this x log(1 + the user's events the id applies to); 0 = off"
    )
    split: Split = _opt(
        "population",
        "which parameters stay personal (shared_model/partition.py): population | card | heads-prior",
    )
    # 300: the main job's budget, about 9 minutes on 2 cores (test NDCG@10 2.1x item popularity on latest-small);
    # accuracy still rises to 450 rounds (2.85x, about 13 minutes): README, Results
    num_rounds: int = _opt(300, "federated rounds")
    fraction_train: float = _opt(0.1, "share of devices sampled per training round")
    min_reply_fraction: float = _opt(
        0.5, "a round aggregates only if this share of sampled devices replied validly"
    )
    local_epochs: int = _opt(1, "local passes over the device's own events per round (one window each)")
    local_lr: float = _opt(0.1, "device learning rate")
    local_optimizer: LocalOptimizer = _opt(
        "sgd", "sgd (plain SGD: its change follows the gradient) | adamw (a fresh AdamW each round)"
    )
    adapt_epochs: int = _opt(
        5,
        "local adaptation: before evaluating or serving, a device trains its own copy of the split's adapted"
        " parts (population split: time encoder and interest heads) this many epochs from the population"
        " values, the rest frozen, and keeps it only if it beats them on its held-out recent events",
    )
    adapt_lr: float = _opt(4e-3, "learning rate of the local adaptation (AdamW)")
    # 10 events and 2.33 standard errors: on federated ML-100k the gate on 5 events (z 1.64) kept adaptations
    # that halved those users' test NDCG@10; on 10 events none hurt (simulations/results/federated.md)
    gate_events: int = _opt(
        10, "recent training events a device holds out to decide whether its adaptation beats the population"
    )
    gate_z: float = _opt(
        2.33,
        "the adaptation is kept only if its held-out cross-entropy is lower than the population's by more than"
        " gate_z standard errors (paired over the held-out events; 0 = any improvement)",
    )
    server_optimizer: ServerOptimizer = _opt(
        "fedadam", "fedadam (a server Adam step on the averaged update, state kept across rounds) | fedavg"
    )
    # 4e-3: with target-weighted updates the runs take off earlier and end higher than at 2e-3 on validation
    # (ML-100k 0.1153 vs 0.1054, latest-small 0.0467 vs 0.0410; simulations/results/federated.md)
    server_lr: float = _opt(4e-3, "FedAdam's server learning rate (eta; its peak when server_lr_decay > 0)")
    # 0.25: on federated ML-100k the run ends at test NDCG@10 0.0806 (0.95x centralized) instead of 0.0711 with a
    # constant eta, whose last rounds oscillate by ~0.01 (simulations/results/federated.md)
    server_lr_decay: float = _opt(
        0.25,
        "share of the last rounds over which FedAdam's eta falls from server_lr to 0 (a cosine), so the run"
        " ends on a settled model; 0 = constant, 1 = a cosine over the whole run",
    )
    server_tau_items: float = _opt(
        0.0,
        "FedAdam's epsilon for the item tables (0 = server_tau): larger keeps tiny consistent changes of rows"
        " that honest devices barely move (a cold item's) from becoming full server steps",
    )
    server_tau: float = _opt(
        1e-8, "FedAdam's adaptivity (tau, added to sqrt(v)): small values follow small updates"
    )
    upload: Upload = _opt("dense", "dense | sparse (only the item rows a device touched)")
    decoy_rows: int = _opt(
        300,
        "sparse upload: extra random item rows, trained as negatives and weighted by the inverse of their"
        " sampling chance (an unbiased estimate of the untouched rows' dense change; without them a sparse"
        " upload cost 24-29 percent NDCG@10 on ML-100k, with 300 about 1: simulations/results/federated.md)",
    )
    row_fraction: float = _opt(
        1.0,
        "sparse upload: the share of the rows of every other shared matrix a device sends (random rows,"
        " weighted by the inverse share: an unbiased estimate of its change; 1 = every row)",
    )
    # importance: at about 45 KB (int4, 300 decoys, 30-40% of other rows) it cost 3.7% / 1.9% validation / test
    # NDCG@10 on ML-100k and 14% / 3% on latest-small (two seeds each) against uniform's 8% / 3% and 30% / 16%
    # (simulations/results/federated.md)
    sparse_sampling: SparseSampling = _opt(
        "importance",
        "sparse upload: importance (dense local training, then each untouched item row and each row of the"
        " other matrices drawn with a chance proportional to its change: less variance for the same bytes) |"
        " uniform (decoys and sampled rows drawn uniformly, the decoys trained as the only untouched rows) |"
        " error-feedback (dense local training, then the rows that changed most, unscaled; the device keeps"
        " what it did not send and adds it to its next change) | states (dense local training; the touched"
        " item rows, the other matrices as importance, and the step's output states, from which the server"
        " computes every other item row's change exactly: no decoys; needs one local SGD epoch and"
        " clip_norm=0)",
    )
    row_budget: RowBudget = _opt(
        "per-matrix",
        "sparse upload with importance or states sampling and row_fraction < 1: per-matrix (each other matrix"
        " sends about row_fraction of its rows) | balanced (the same expected bytes, shared among the matrices"
        " so that the sum of their relative sampling variances is least)",
    )
    compress: Compress = _opt(
        "none",
        "none | int8 | int4 (per-row quantized changes with stochastic rounding, ~4x / ~8x smaller; int4 sends"
        " vectors such as biases as int8)",
    )
    norm_bound: float = _opt(50.0, "reject an update whose L2 distance to the sent arrays is larger")
    privacy: Privacy = _opt(
        "plain",
        "plain | dp (central DP: clipped updates + Gaussian noise) | secagg (Flower SecAgg+, >= 3 nodes)",
    )
    dp_noise: float = _opt(1.0, "dp: noise multiplier (noise std = dp_noise * dp_clip on the summed update)")
    dp_clip: float = _opt(1.0, "dp: L2 clipping norm of each device's update")
    dp_delta: float = _opt(1e-5, "dp: the delta at which the accountant reports epsilon")
    secagg_shares: int = _opt(3, "secagg: secret shares per device (Flower's num_shares)")
    secagg_threshold: int = _opt(
        2, "secagg: shares needed to reconstruct (devices that may drop out = shares - this)"
    )
    secagg_clip: float = _opt(8.0, "secagg: values are clipped to [-clip, clip] before quantization")
    aggregation: Aggregation = _opt(
        "mean", "mean | trimmed-mean (coordinate-wise) | median (coordinate-wise)"
    )
    trim_fraction: float = _opt(0.1, "trimmed-mean: share of updates cut at each end, per coordinate")
    robust_scope: RobustScope = _opt(
        "all",
        "fedadam with a robust aggregation: all arrays, or item-tables (the item embedding and bias robust,"
        " every other array on the example-weighted mean)",
    )
    clip_norm: float = _opt(0.0, "clip each update's L2 change to this norm before aggregating (0 = off)")
    row_clip: float = _opt(
        0.5,
        "clip each item-table row's L2 change to this norm before aggregating (0 = off; it halves what 3"
        " percent item-promotion attackers reach, at no measured NDCG cost: simulations/results/poisoning.md)",
    )
    row_quorum: int = _opt(
        4,
        "an item row moves up only once this many distinct devices have raised its bias (0 = off; at most a"
        " tenth of the devices, none below 20; plain and DP rounds: server/row_quorum.py, THREAT_MODEL.md)",
    )
    eval_every: int = _opt(50, "federated evaluation every k rounds (and after the last round)")
    fraction_evaluate: float = _opt(1.0, "share of devices that evaluate")
    users_per_node: int = _opt(
        10,
        "users each simulated node hosts; it replies with their example-weighted mean (FedAvg-equivalent)."
        " 1 = one Flower node per user, as in a deployment",
    )
    seed: int = _opt(0, "seed of the initial model, device sampling and local training")
    round_timeout: float = _opt(600.0, "seconds to wait for replies (and for all nodes to connect)")
    out_dir: str = _opt("runs/simulate", "checkpoints, metrics and the device stores")

    def __post_init__(self) -> None:
        _check_types(self)
        if self.adapt_epochs < 0 or self.gate_events < 1 or not self.adapt_lr > 0 or not self.gate_z >= 0:
            raise ValueError("adapt_epochs must be >= 0, gate_events >= 1, adapt_lr > 0 and gate_z >= 0")
        if self.preset not in MODEL_PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {', '.join(MODEL_PRESETS)}")
        if not 0 <= self.server_lr_decay <= 1:
            raise ValueError(f"server_lr_decay must lie in [0, 1], got {self.server_lr_decay}")
        if not self.server_tau > 0 or self.server_tau_items < 0:
            raise ValueError(
                f"server_tau must be > 0 and server_tau_items >= 0, got {self.server_tau}, {self.server_tau_items}"
            )
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError("trim_fraction must lie in [0, 0.5)")
        if self.row_quorum < 0:
            raise ValueError(f"row_quorum must be >= 0, got {self.row_quorum}")
        if min(self.dp_noise, self.dp_clip, self.clip_norm, self.row_clip) < 0 or not 0 < self.dp_delta < 1:
            raise ValueError("dp_noise, dp_clip, clip_norm, row_clip must be >= 0 and dp_delta in (0, 1)")
        if self.privacy == "dp" and (min(self.dp_noise, self.dp_clip) <= 0 or self.aggregation != "mean"):
            raise ValueError(
                "privacy=dp needs dp_noise > 0, dp_clip > 0 and aggregation=mean (noise fits a mean)"
            )
        if not 1 <= self.secagg_threshold <= self.secagg_shares:
            raise ValueError("secagg needs 1 <= secagg_threshold <= secagg_shares")
        if self.privacy == "secagg":
            self._check_secagg()
        if not 0 < self.fraction_train <= 1 or not 0 <= self.min_reply_fraction <= 1:
            raise ValueError("fractions must lie in (0, 1]")
        if min(self.users_per_node, self.num_rounds, self.local_epochs, self.max_len, self.eval_every) < 1:
            raise ValueError("users_per_node, num_rounds, local_epochs, max_len and eval_every must be >= 1")
        if not min(self.local_lr, self.server_lr, self.round_timeout) > 0 or self.decoy_rows < 0:
            raise ValueError("local_lr, server_lr and round_timeout must be > 0 and decoy_rows >= 0")
        if not 0 < self.fraction_evaluate <= 1 or not 0 < self.row_fraction <= 1:
            raise ValueError("fractions must lie in (0, 1]")
        if self.sparse_sampling == "states" and self.upload == "sparse":
            wrong = {"local_epochs": 1, "local_optimizer": "sgd", "clip_norm": 0.0}
            bad = [f"{k}={getattr(self, k)!r}" for k, v in wrong.items() if getattr(self, k) != v]
            if bad:
                raise ValueError(
                    "sparse_sampling='states' lets the server recompute one local SGD step's softmax change"
                    " (it needs local_epochs=1, local_optimizer='sgd', clip_norm=0), got " + ", ".join(bad)
                )
        if self.row_budget == "balanced" and self.sparse_sampling not in ("importance", "states"):
            raise ValueError(
                "row_budget='balanced' shares importance-sampled rows: it needs sparse_sampling"
                f" 'importance' or 'states', got {self.sparse_sampling!r}"
            )
        if self.row_fraction < 1 and self.upload != "sparse":
            raise ValueError("row_fraction < 1 samples the rows of a sparse upload: it needs upload='sparse'")
        heads = MODEL_PRESETS[self.preset].get("num_heads", ModelConfig.num_heads)
        if self.d_model < 1 or self.d_model % heads:
            raise ValueError(
                f"d_model={self.d_model} must be a positive multiple of the preset's {heads} heads"
            )

    def _check_secagg(self) -> None:
        """SecAgg+ sums dense updates the server never sees one by one (server.secagg)."""
        needs = {
            "upload": "dense",
            "compress": "none",
            "aggregation": "mean",
        }
        wrong = [f"{k}={getattr(self, k)!r} (needs {v!r})" for k, v in needs.items() if getattr(self, k) != v]
        if wrong:
            raise ValueError(
                "privacy='secagg' sums dense updates inside SecAgg+, so per-update codecs and robust aggregates"
                " cannot apply (clip_norm and row_clip are applied by each device before masking, secagg_clip"
                " bounds each coordinate): " + ", ".join(wrong)
            )
        if not (
            self.secagg_shares >= 3 and self.secagg_shares / 2 < self.secagg_threshold < self.secagg_shares
        ):
            raise ValueError(
                "secagg needs secagg_shares >= 3 and secagg_shares / 2 < secagg_threshold < secagg_shares (a"
                " majority threshold, and shares - threshold devices may drop out), got"
                f" {self.secagg_shares} shares, threshold {self.secagg_threshold}"
            )
        if not self.secagg_clip > 0:
            raise ValueError(f"secagg_clip must be > 0, got {self.secagg_clip}")

    @property
    def states_lr(self) -> float:
        """The local SGD rate a server completes output-states uploads with (``sparse_sampling="states"``):
        ``local_lr``, or 0 when the upload sends no states."""
        return self.local_lr if self.upload == "sparse" and self.sparse_sampling == "states" else 0.0

    def to_run_config(self) -> dict[str, Any]:
        """Flower run config (kebab-case keys, scalar values)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> FederatedConfig:
        """Inverse of :meth:`to_run_config`; missing keys take the defaults, unknown keys are an error."""
        defaults = cls()
        values = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if not hasattr(defaults, name):
                raise ValueError(f"unknown run config key {key!r}")
            default = getattr(defaults, name)
            exact_int = isinstance(value, int) and not isinstance(value, bool)
            # Flower hands `round-timeout=120` as an int; any other mismatch is the typed check's to report
            values[name] = float(value) if isinstance(default, float) and exact_int else value
        return cls(**values)
