"""Interaction-inference benchmark (attack 1 of THREAT_MODEL.md): how well an honest-but-curious server tells which items
a device interacted with from what it receives, per upload and privacy mode, and what each mode costs in
NDCG@10.

Attack: the server sends the round-1 shared arrays; sampled devices run the real ``HostedUsers.train``; the server
scores every item row from what it receives and the AUC of touched rows (items in the user's training history)
against untouched ones is averaged over target users. Scores of a row's change (embedding ``dE``, bias
``db``): ``norm`` = ||(dE, db)||; ``bias`` = db (a target item's bias rises, the softmax pushes every other
bias down); ``direction`` = -cos(dE, mean row change) (untouched rows all move along the same direction);
``outlier`` = ||dE - mean row change||. ``best`` is the best of them per view, an AUC below 0.5 counted as
1 - AUC (chosen with hindsight: an upper bound for this attacker). Rows a sparse update does not carry score lowest (the server knows they were not
touched). Views:

* sparse upload (the touched rows, values and ids), and sparse with ``d`` random decoy rows;
* dense upload (every row changes: weight decay and the softmax over all items);
* dense under SecAgg+: the server sees only the sum over a cohort of ``m`` devices (``m`` = the round's cohort
  size); emulated here as the plaintext sum, which is what SecAgg+ reveals (its own tests check that it
  equals the plaintext sum); the target is attacked from the sum of its cohort, and, as a reference, from the
  sum of a cohort without it;
* central DP, server view: each device's clipped update (clipping scales an update as a whole, so every
  score's ranking, hence the AUC, is that of the dense view);
* central DP, released aggregate: (sum of the cohort's clipped updates + N(0, (z C)^2)) / m, seen by anyone
  who gets the model, at a few noise multipliers z (epsilon after the run's rounds from the accountant);
* no observation: rows ranked by the item's popularity among the other users (what popularity alone gives:
  the floor that any view of a sum inherits, since a user's items tend to be popular ones).

Because a user's items are mostly popular ones, the plain AUC credits an attacker with what popularity alone
gives (0.87 on ML-100k). The **popularity-matched AUC** compares touched and untouched rows only within the same
popularity stratum (``STRATA`` quantile bins of the item's popularity among the other users; the AUC of each
bin weighted by its positive-negative pairs): what the observation reveals beyond popularity (0.5 = nothing).

Accuracy: real Flower simulations (``run_simulation``) of each mode and two plain dense runs (seeds 0 and 1:
the run-to-run spread); cost = relative NDCG@10 drop from the dense seed-0 run. SecAgg+ returns the exact sum,
so its cost here is that of dense (its quantization is measured with SecAgg+ itself).

With ``--accuracy-from NAME ...`` the accuracy of "dense" (the shipped defaults) and of "dp z=<z>" comes from
the federated benchmark's results instead (``simulations.bench_federated``: runs of the full round budget,
resumable, e.g. 400 rounds, where this benchmark's own runs are short), and ``--rounds`` should be that budget
so the epsilons match.

Results go to ``simulations/results/<name>.json`` (rewritten after each item) and ``<name>.md``.
Run: ``python -m simulations.bench_privacy`` (``--parts``, ``--variants``, ``--dataset``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from client_sdk.device import HostedUsers, cached_log
from server.app import initial_shared
from server.dp import RdpAccountant
from server.validation import validate_update
from shared_model.config import FederatedConfig
from shared_model.data import InteractionLog
from shared_model.protocol.updates import ITEM_TABLES, ROWS
from simulations.simulate import run_simulation

RESULTS = Path(__file__).parent / "results"
PARTS = ("attack", "accuracy")
DECOYS = (0, 10, 50, 200)
DP_NOISE = (0.5, 1.0, 2.0)
ACCURACY_RUNS: dict[str, dict[str, Any]] = {  # in order of need
    "dense": {},
    "sparse + 50 decoys": {"upload": "sparse", "sparse_sampling": "uniform", "decoy_rows": 50},
    "dp z=1": {"privacy": "dp", "dp_noise": 1.0},
    "dense, seed 1": {"seed": 1},
    "sparse": {"upload": "sparse", "sparse_sampling": "uniform"},
    **{f"dp z={z:g}": {"privacy": "dp", "dp_noise": z} for z in DP_NOISE if z != 1},
}
ATTACKS = ("norm", "bias", "direction", "outlier")
STRATA = 20  # popularity bins of the matched AUC


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the ``positive`` rows against the rest (ties count 1/2)."""
    order = np.argsort(scores, kind="stable")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # average 1-based rank of each tie group
    pos = int(positive.sum())
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * (len(scores) - pos)))


def matched_auc(scores: np.ndarray, positive: np.ndarray, strata: np.ndarray) -> float:
    """AUC within each stratum, averaged with weights = the stratum's positive-negative pairs."""
    total, weight = 0.0, 0
    for s in np.unique(strata):
        rows = strata == s
        pos = int(positive[rows].sum())
        pairs = pos * (int(rows.sum()) - pos)
        if pairs:
            total += pairs * auc(scores[rows], positive[rows])
            weight += pairs
    return total / weight if weight else float("nan")


def popularity_strata(log: InteractionLog, user: int) -> tuple[np.ndarray, np.ndarray]:
    """Each item's popularity among the other users, and its stratum (``STRATA`` quantile bins)."""
    counts = np.bincount(log.item, minlength=log.num_items)
    own = np.bincount(log.item[log.user_ptr[user] : log.user_ptr[user + 1]], minlength=log.num_items)
    popularity = (counts - own).astype(np.float64)
    edges = np.unique(np.quantile(popularity, np.linspace(0, 1, STRATA + 1)[1:-1]))
    return popularity, np.searchsorted(edges, popularity, side="right")


def attack_scores(
    emb: np.ndarray, bias: np.ndarray, carried: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Each attack's score per item row from the row changes ``emb`` (rows, d) and ``bias`` (rows,); rows not
    ``carried`` by a sparse update score -inf."""
    rows = np.ones(len(bias), bool) if carried is None else carried
    e, b = emb[rows].astype(np.float64), bias[rows].astype(np.float64)
    mean = e.mean(axis=0)
    norms = np.linalg.norm(e, axis=1)
    raw = {
        "norm": np.sqrt(norms**2 + b**2),
        "bias": b,
        "direction": -(e @ mean) / np.maximum(norms * np.linalg.norm(mean), 1e-30),
        "outlier": np.linalg.norm(e - mean, axis=1),
    }
    out = {}
    for name, score in raw.items():
        full = np.full(len(bias), -np.inf)
        full[rows] = score
        out[name] = full
    return out


def touched_rows(log: InteractionLog, train_end: np.ndarray, user: int) -> np.ndarray:
    """Item-table rows of the user's training history (row = item id + 1; row 0 is padding)."""
    touched = np.zeros(log.num_items + 1, bool)
    touched[log.item[log.user_ptr[user] : train_end[user]] + 1] = True
    return touched


class UserUpdates:
    """Round-1 updates of some users under one config, as the server receives them (densified)."""

    def __init__(
        self, cfg: FederatedConfig, pids: np.ndarray, nodes: int, sent: dict[str, np.ndarray], store: Path
    ) -> None:
        shutil.rmtree(store, ignore_errors=True)  # personal weights from an earlier run would change training
        self.emb, self.bias, self.norm, self.carried, self.touched, self.users = [], [], [], [], [], []
        self.strata: list[np.ndarray] = []
        for pid in pids:
            device = HostedUsers(cfg, int(pid), nodes, store)
            result = device.train(sent, 1)
            dense = validate_update(result.update, sent, result.num_examples, math.inf)
            delta = {k: dense[k].astype(np.float64) - sent[k] for k in sent}
            self.emb.append(delta[ITEM_TABLES[0]][1:].astype(np.float32))
            self.bias.append(delta[ITEM_TABLES[1]][1:].astype(np.float32))
            self.norm.append(math.sqrt(sum(float(np.sum(d**2)) for d in delta.values())))
            rows = result.update.get(ITEM_TABLES[0] + ROWS)
            self.carried.append(
                None if rows is None else np.isin(np.arange(1, len(sent[ITEM_TABLES[1]])), rows)
            )
            self.users.append(int(device.users[0]))
            self.touched.append(touched_rows(device.log, device.train_end, self.users[-1])[1:])
            self.strata.append(popularity_strata(device.log, self.users[-1])[1])

    def score(self, i: int, scores: dict[str, np.ndarray], into: dict[str, list[float]]) -> None:
        """Append user ``i``'s plain and popularity-matched AUC of each attack's ``scores``."""
        for name, score in scores.items():
            into[name].append(auc(score, self.touched[i]))
            into[f"{name}/matched"].append(matched_auc(score, self.touched[i], self.strata[i]))

    def individual_auc(self) -> dict[str, list[float]]:
        """Each attack's AUCs per user from the user's own update."""
        aucs = _empty()
        for i, (e, b, c) in enumerate(zip(self.emb, self.bias, self.carried, strict=True)):
            self.score(i, attack_scores(e, b, c), aucs)
        return aucs

    def cohort_sum(self, members: np.ndarray, clip: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Sum of the members' changes (each first clipped to L2 norm ``clip`` over all shared arrays)."""
        factor = [1.0 if clip is None else min(1.0, clip / max(self.norm[i], 1e-30)) for i in members]
        emb = sum(f * self.emb[i].astype(np.float64) for f, i in zip(factor, members, strict=True))
        bias = sum(f * self.bias[i].astype(np.float64) for f, i in zip(factor, members, strict=True))
        return emb, bias


def _empty(names: tuple[str, ...] = ATTACKS) -> dict[str, list[float]]:
    return {key: [] for a in names for key in (a, f"{a}/matched")}


def _summary(aucs: dict[str, list[float]]) -> dict[str, Any]:
    """Mean AUC per attack, plain and popularity-matched; the best attack counts an AUC below 0.5 as 1 - AUC
    (the attacker flips the score, whose sign a simulation on made-up users tells him)."""
    mean = {a: float(np.mean(v)) for a, v in aucs.items()}

    def best(keys: list[str]) -> str:
        return max(keys, key=lambda a: max(mean[a], 1 - mean[a]))

    plain, matched = (
        best([a for a in mean if "/" not in a]),
        best([a for a in mean if a.endswith("/matched")]),
    )
    return {
        "auc": mean,
        "auc_sd": {a: float(np.std(v)) for a, v in aucs.items()},
        "best_attack": plain,
        "best_auc": max(mean[plain], 1 - mean[plain]),
        "best_matched_attack": matched,
        "best_matched_auc": max(mean[matched], 1 - mean[matched]),
        "targets": len(next(iter(aucs.values()))),
    }


def attack_views(base: FederatedConfig, args: argparse.Namespace, done: set[str], record) -> None:
    """Every view of the attack; each is recorded as it finishes."""
    log = cached_log(base.dataset, base.data_dir)
    sent = initial_shared(base, log)
    nodes = log.num_users  # one user per device
    cohort = max(1, round(base.fraction_train * nodes))
    pids = np.random.default_rng([base.seed, 6]).choice(nodes, size=min(2 * cohort, nodes), replace=False)
    targets, other = np.arange(min(cohort, len(pids))), np.arange(min(cohort, len(pids)), len(pids))
    store = Path(args.out) / "attack-stores"
    for decoys in DECOYS:
        key = f"attack/sparse/{decoys}"
        if key not in done:
            cfg = replace(base, upload="sparse", sparse_sampling="uniform", decoy_rows=decoys)
            ups = UserUpdates(cfg, pids[targets], nodes, sent, store)
            view = "sparse upload" + (f" + {decoys} decoy rows" if decoys else "")
            record(
                kind="attack",
                key=key,
                view=view,
                sees="each device's touched (and decoy) rows",
                run="sparse" if decoys == 0 else f"sparse + {decoys} decoys",
                **_summary(ups.individual_auc()),
            )
    if all(k in done for k in _dense_keys()):
        return
    dense = UserUpdates(base, pids, nodes, sent, store)
    record(
        kind="attack",
        key="attack/dense",
        view="dense upload",
        sees="each device's full update",
        run="dense",
        median_update_norm=float(np.median(dense.norm)),
        **_summary(dense.individual_auc()),
    )
    for z in (None, *DP_NOISE):
        in_cohort, without = _empty(), _empty()
        noise = np.random.default_rng([base.seed, 7, int(1000 * (z or 0))])
        sums = []
        for members in (targets, other):  # two disjoint cohorts of m devices
            emb, bias = dense.cohort_sum(members, None if z is None else args.dp_clip)
            if z is not None:  # the released update, times m: sum + N(0, (z C)^2)
                emb = emb + noise.normal(0, z * args.dp_clip, emb.shape)
                bias = bias + noise.normal(0, z * args.dp_clip, bias.shape)
            sums.append(attack_scores(emb, bias))
        for i in targets:
            dense.score(i, sums[0], in_cohort)
            dense.score(i, sums[1], without)
        if z is None:
            view, sees, run, extra = f"dense, SecAgg+ (sum of {cohort})", "the cohort sum only", "dense", {}
        else:
            accountant = RdpAccountant(cohort / nodes, z)
            accountant.step(base.num_rounds)
            view, sees, run = f"central DP z={z:g}, released", "the noisy clipped mean", f"dp z={z:g}"
            extra = {"noise_multiplier": z, "epsilon": accountant.epsilon(base.dp_delta)}
        tag = "secagg" if z is None else f"dp/{z:g}"
        record(
            kind="attack", key=f"attack/{tag}", view=view, sees=sees, run=run, **extra, **_summary(in_cohort)
        )
        record(
            kind="attack",
            key=f"attack/{tag}/without-target",
            view=view + ", target not in the cohort",
            sees=sees,
            run=run,
            **extra,
            **_summary(without),
        )
    clipped = _empty()  # the DP server's view: each clipped update (same AUC as dense)
    for i in range(len(pids)):
        f = min(1.0, args.dp_clip / dense.norm[i])
        dense.score(i, attack_scores(f * dense.emb[i], f * dense.bias[i]), clipped)
    record(
        kind="attack",
        key="attack/dp/server",
        view=f"central DP (C={args.dp_clip:g}), server view",
        sees="each device's clipped update",
        run="dp z=1",
        **_summary(clipped),
    )
    prior = _empty(("popularity",))
    for i, user in enumerate(dense.users):  # popularity among the other users
        dense.score(i, {"popularity": popularity_strata(log, user)[0]}, prior)
    record(
        kind="attack",
        key="attack/none",
        view="no observation (item popularity)",
        sees="nothing",
        run="dense",
        **_summary(prior),
    )


def _dense_keys() -> list[str]:
    tags = ["secagg", *(f"dp/{z:g}" for z in DP_NOISE)]
    return [
        "attack/dense",
        "attack/dp/server",
        "attack/none",
        *(f"attack/{t}" for t in tags),
        *(f"attack/{t}/without-target" for t in tags),
    ]


def federated_accuracy(names: list[str], dataset: str) -> list[dict[str, Any]]:
    """Accuracy rows from federated benchmark results (``simulations/results/<name>_runs.jsonl`` of
    ``simulations.bench_federated``, runs trained to their full round budget): its shipped defaults as "dense"
    and its central-DP variants as "dp z=<z>"; other variants are left out."""
    rows = []
    for name in names:
        for line in (RESULTS / f"{name}_runs.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["kind"] != "federated" or r["dataset"] != dataset:
                continue
            cfg = r["config"]
            run = f"dp z={cfg['dp_noise']:g}" if cfg["privacy"] == "dp" else "dense"
            if run == "dense" and r["variant"] != "default":
                continue
            rows.append(
                {
                    "kind": "accuracy",
                    "key": f"accuracy/{run}",
                    "run": run,
                    "source": f"{name}: {r['variant']}",
                    "config": cfg,
                    "test": r["test"],
                    "val": r["val"],
                    "epsilon": r.get("epsilon"),
                    "upload_bytes_per_device": r["upload_bytes_per_device"],
                    "seconds": r["seconds_per_round"] * cfg["num_rounds"],
                }
            )
    return rows


def accuracy_runs(base: FederatedConfig, args: argparse.Namespace, done: set[str], record) -> None:
    for name in args.variants:
        key = f"accuracy/{name}"
        if key in done:
            continue
        out = Path(args.out) / re.sub(r"[^a-z0-9.]+", "-", name)
        shutil.rmtree(out, ignore_errors=True)  # a fresh run: no checkpoint to resume, no old device stores
        cfg = replace(base, **ACCURACY_RUNS[name], out_dir=str(out))
        history = run_simulation(cfg, num_cpus=args.cpus)["history"]
        last = history[-1]
        record(
            kind="accuracy",
            key=key,
            run=name,
            config=asdict(cfg),
            test=last.get("test", {}),
            val=last.get("val", {}),
            epsilon=last.get("epsilon"),
            upload_bytes_per_device=history[0]["upload_bytes_per_device"],
            seconds=sum(h["seconds"] for h in history),
        )


def _cell(value: float | None, fmt: str = ".3f") -> str:
    return "" if value is None or value != value else format(value, fmt)


def summarise(rows: list[dict[str, Any]]) -> str:
    acc = {r["run"]: r for r in rows if r["kind"] == "accuracy"}
    base = acc.get("dense", {}).get("test", {}).get("ndcg@10")

    def ndcg(run: str) -> tuple[float | None, float | None]:
        value = acc.get(run, {}).get("test", {}).get("ndcg@10")
        return value, None if value is None or not base else 100 * (base - value) / base

    lines = [
        "AUC per attack: plain / popularity-matched.",
        "",
        "| view | the server sees | " + " | ".join(ATTACKS) + " | best AUC | best popularity-matched AUC | "
        "targets | epsilon | run | NDCG@10 | NDCG@10 cost vs dense |",
        "|---" * (len(ATTACKS) + 10) + "|",
    ]
    for r in rows:
        if r["kind"] != "attack":
            continue
        value, cost = ndcg(r["run"])
        pair = [f"{_cell(r['auc'].get(a))} / {_cell(r['auc'].get(a + '/matched'))}" for a in ATTACKS]
        cells = pair + [
            _cell(r["best_auc"]),
            _cell(r.get("best_matched_auc")),
            str(r["targets"]),
            _cell(r.get("epsilon"), ".3g"),
            r["run"],
            _cell(value, ".4f"),
            _cell(cost, "+.1f") + ("%" if cost is not None else ""),
        ]
        lines.append(f"| {r['view']} | {r['sees']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| run | test NDCG@10 | Recall@10 | NDCG@10 cost vs dense | epsilon | upload KB/device | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in acc.items():
        value, cost = ndcg(name)
        cells = (
            _cell(value, ".4f"),
            _cell(r["test"].get("recall@10"), ".4f"),
            _cell(cost, "+.1f") + ("%" if cost is not None else ""),
            _cell(r.get("epsilon"), ".3g"),
            _cell(r["upload_bytes_per_device"] / 1000, ".1f"),
            _cell(r["seconds"], ".0f"),
        )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + _targets(rows, ndcg)) + "\n"


def _targets(rows: list[dict[str, Any]], ndcg) -> list[str]:
    """The privacy targets (AUC <= 0.55 under SecAgg+ and with decoys, at <= 1% NDCG@10 cost), as measured."""
    attack = {r["key"]: r for r in rows if r["kind"] == "attack"}
    out = [
        "",
        "Targets (AUC <= 0.55 at <= 1% NDCG@10 cost; judged on the popularity-matched AUC, plain in brackets):",
    ]
    for key in ["attack/secagg", *(f"attack/sparse/{d}" for d in DECOYS if d)]:
        if key in attack:
            r = attack[key]
            cost = ndcg(r["run"])[1]
            met = r["best_matched_auc"] <= 0.55 and cost is not None and cost <= 1
            cost_text = "not run" if cost is None else f"{cost:+.1f}%"
            out.append(
                f"- {r['view']}: popularity-matched AUC {r['best_matched_auc']:.3f} "
                f"({r['best_matched_auc'] - 0.55:+.3f} vs 0.55; plain {r['best_auc']:.3f}), "
                f"NDCG@10 cost {cost_text}: {'met' if met else 'not met'}"
            )
    refs = [attack.get(k) for k in ("attack/secagg/without-target", "attack/none")]
    if all(refs):
        out.append(
            f"- references: the same attack on a cohort sum without the target {refs[0]['best_matched_auc']:.3f}"
            f" matched ({refs[0]['best_auc']:.3f} plain); item popularity alone "
            f"{refs[1]['best_matched_auc']:.3f} matched ({refs[1]['best_auc']:.3f} plain)"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="movielens-100k")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.1, help="devices sampled per round")
    parser.add_argument("--dp-clip", type=float, default=10.0, help="DP clipping norm C")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--variants", nargs="+", default=list(ACCURACY_RUNS), choices=ACCURACY_RUNS)
    parser.add_argument("--cpus", type=int, default=None)
    parser.add_argument(
        "--accuracy-from",
        nargs="*",
        default=[],
        metavar="NAME",
        help="take the accuracy of 'dense' and 'dp z=...' from these bench_federated results (400-round runs"
        " of the shipped defaults and their central-DP variants) instead of running them here",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="privacy")
    parser.add_argument("--out", default="runs/bench_privacy", help="simulation outputs and device stores")
    args = parser.parse_args(argv)
    base = FederatedConfig(
        dataset=args.dataset,
        num_rounds=args.rounds,
        fraction_train=args.fraction,
        eval_every=args.rounds,
        seed=args.seed,
        dp_clip=args.dp_clip,
    )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {r["key"] for r in rows}

    def record(**row: Any) -> None:
        rows.append({"dataset": args.dataset, **row})
        path.write_text(json.dumps(rows, indent=2, default=float) + "\n")
        (RESULTS / f"{args.name}.md").write_text(summarise(rows))
        print(row["key"], row.get("best_auc", row.get("test", {}).get("ndcg@10")), flush=True)

    if "attack" in args.parts:
        attack_views(base, args, done, record)
    for row in federated_accuracy(args.accuracy_from, args.dataset):
        if row["key"] not in done:
            record(**row)
            done.add(row["key"])
    if "accuracy" in args.parts:
        accuracy_runs(base, args, done, record)
    print(summarise(rows))


if __name__ == "__main__":
    main()
