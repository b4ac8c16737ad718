"""The Flower ServerApp: sample devices, send the shared arrays, validate and aggregate what comes back,
evaluate federatedly, checkpoint every round and resume from the last checkpoint."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from shared_model.config import FederatedConfig
from shared_model.data import InteractionLog, load_dataset
from shared_model.partition import split_state
from shared_model.training import model_for_run

from .checkpoint import load_server_state, resumable_checkpoint, save_server_checkpoint
from .records import numpy_to_record, record_to_numpy
from .secagg import secagg_round
from .strategies import make_strategy
from .validated import ValidatedStrategy

log = logging.getLogger("tmepsr.server")
# how often the simulation engine's grid looks for the devices' replies (Flower's default, every 0.1 s, loses
# 0.05 s per round on average; docs/RESULTS.md, "Federated training")
SIMULATION_REPLY_POLL_SECONDS = 0.01


def initial_shared(cfg: FederatedConfig, log: InteractionLog | None = None) -> dict[str, np.ndarray]:
    """The shared arrays of the seeded initial model (what every device also builds)."""
    log = log or load_dataset(cfg.dataset, cfg.data_dir or None)
    return split_state(model_for_run(cfg, log), cfg.split)[0]


def wait_for_nodes(grid: Grid, cfg: FederatedConfig, num_users: int) -> int:
    """Wait until every node of the federation is connected; returns their number. The federation's size is
    what its first node reports (``num-partitions`` of its node config: ``tmepsr simulate`` starts one node per
    ``users_per_node`` users, ``flwr run`` as many as its federation has, each hosting its share of the users),
    else one node per ``users_per_node`` users. Sampling before then would size the cohort from the few nodes
    that happened to be up."""
    expected: int | None = None
    deadline = time.monotonic() + cfg.round_timeout
    while True:
        nodes = list(grid.get_node_ids())
        if nodes and expected is None:
            expected = _federation_size(grid, nodes[0], cfg.round_timeout)
            expected = expected or math.ceil(num_users / cfg.users_per_node)
        if expected is not None and len(nodes) >= expected:
            return len(nodes)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(nodes)} of {expected or 'the'} nodes connected within {cfg.round_timeout:.0f}s"
            )
        time.sleep(0.5)


def _ask_nodes(grid: Grid, nodes: list[int], timeout: float) -> dict[int, MetricRecord | None]:
    """Each node's answer to the query (its ``partition-id`` and ``num-partitions``; None where it gave none)."""
    messages = [Message(RecordDict({}), message_type=MessageType.QUERY, dst_node_id=node) for node in nodes]
    return {
        reply.metadata.src_node_id: None
        if reply.has_error() or "node" not in reply.content.metric_records
        else reply.content.metric_records["node"]
        for reply in grid.send_and_receive(messages, timeout=timeout)
    }


def _federation_size(grid: Grid, node: int, timeout: float) -> int | None:
    """The ``num-partitions`` a node reports (None if it does not say)."""
    answer = next(iter(_ask_nodes(grid, [node], timeout).values()), None)
    size = answer.get("num-partitions") if answer is not None else None
    return int(size) if size else None


def node_partitions(grid: Grid, timeout: float) -> dict[int, int]:
    """Ask every node for its partition id (its stable identity; node ids are random per run). Empty, with a
    warning, if a node does not answer: cohorts are then Flower's own, unseeded sample."""
    answers = _ask_nodes(grid, list(grid.get_node_ids()), timeout)
    silent = [node for node, answer in answers.items() if answer is None]
    if silent:
        log.warning("node %s did not say its partition id: cohorts are not seeded", silent[0])
        return {}
    return {node: int(answer["partition-id"]) for node, answer in answers.items()}


def run_rounds(grid: Grid, cfg: FederatedConfig, echo: bool = True) -> dict[str, Any]:
    """Run (or resume) the federated rounds; returns the metric history and the final shared arrays."""
    out = Path(cfg.out_dir)
    if isinstance(grid, InMemoryGrid):
        grid.pull_interval = SIMULATION_REPLY_POLL_SECONDS
    log = load_dataset(cfg.dataset, cfg.data_dir or None)
    strategy = make_strategy(cfg, wait_for_nodes(grid, cfg, log.num_users), log.num_users)
    # DP's accountant counts on amplification by sampling nobody can predict: Flower samples its cohorts
    strategy.setup_sampling(
        node_partitions(grid, cfg.round_timeout), None if cfg.privacy == "dp" else cfg.seed
    )
    resumed = resumable_checkpoint(cfg)
    if resumed is not None:
        shared, start, history, _ = resumed
        strategy.restore_server_state(load_server_state(out))
        start += 1
        _echo(echo, f"resuming from the checkpoint of round {start - 1}")
    else:
        shared, start, history = initial_shared(cfg, log), 1, []
    run_config = cfg.to_run_config()
    train_round = secagg_round if cfg.privacy == "secagg" else plain_round
    for rnd in range(start, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        shared, train_metrics, traffic = train_round(grid, strategy, rnd, shared, cfg)
        last = strategy.last_round  # a property under DP (the accountant runs on each read): read once
        row: dict[str, Any] = {
            "round": rnd,
            **{k: v for k, v in last.items() if k != "rejections"},
            "rejections": last.get("rejections", [])[:5],
            **traffic,
        }
        if strategy.sampled_partitions:
            row["cohort"] = list(
                strategy.sampled_partitions
            )  # partition ids: the same in a rerun with the same seed
        if train_metrics is not None:
            row["train_loss"] = float(train_metrics.get("train-loss", float("nan")))
        if strategy.head_share is not None:  # the population estimate the next round steers by
            row["head_share"] = [round(float(x), 4) for x in strategy.head_share]
        if rnd % cfg.eval_every == 0 or rnd == cfg.num_rounds:
            # validation and test together (the test curve is reported, never used to choose anything); the
            # devices adapt to the final model only (what they will serve), earlier rounds score the population
            final, t_eval = int(rnd == cfg.num_rounds), time.perf_counter()
            stage = {"stage": "val,test", "server-round": rnd, "adapt": final}
            ecfg = ConfigRecord(dict(run_config) | stage | strategy.round_config())
            ereplies = list(
                grid.send_and_receive(
                    strategy.configure_evaluate(rnd, numpy_to_record(shared), ecfg, grid),
                    timeout=cfg.round_timeout,
                )
            )
            row |= _evaluation_counts(rnd, ereplies)
            metrics = strategy.aggregate_evaluate(rnd, ereplies)
            for key, value in (metrics or {}).items():  # "val/ndcg@10" -> row["val"]["ndcg@10"]
                if "/" in key:  # (not the example count)
                    prefix, name = key.split("/", 1)
                    row.setdefault(prefix, {})[name] = float(value)
            row["eval_seconds"] = time.perf_counter() - t_eval
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        save_server_checkpoint(out, shared, rnd, history, run_config, strategy.server_state())
        (out / "metrics.json").write_text(json.dumps(history, indent=2, default=float) + "\n")
        _echo(echo and _printed(row, cfg.num_rounds), _round_line(row, cfg.num_rounds))
    return {"history": history, "shared": shared}


def plain_round(
    grid: Grid, strategy: ValidatedStrategy, rnd: int, shared: dict[str, np.ndarray], cfg: FederatedConfig
) -> tuple[dict[str, np.ndarray], MetricRecord | None, dict[str, float]]:
    """A plaintext training round: each sampled device's update reaches the strategy, which validates it.
    Returns the new shared arrays, the training metrics and the round's traffic (array payload bytes)."""
    config = ConfigRecord(cfg.to_run_config() | strategy.round_config())
    messages = strategy.configure_train(rnd, numpy_to_record(shared), config, grid)
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    upload = [
        r.content.array_records["arrays"].count_bytes()
        for r in replies
        if not r.has_error() and r.has_content() and "arrays" in r.content.array_records
    ]
    arrays, train_metrics = strategy.aggregate_train(rnd, replies)
    if arrays is not None:
        shared = record_to_numpy(arrays)
    traffic = {
        "upload_bytes_per_device": float(np.mean(upload)) if upload else 0.0,
        "download_bytes_per_device": float(sum(v.nbytes for v in shared.values())),
    }
    return shared, train_metrics, traffic


def _evaluation_counts(rnd: int, replies: list[Message]) -> dict[str, int]:
    """Users evaluated, devices that could not evaluate (one log line each) and users whose stores could not be
    read, so that a metric covering fewer users never goes unnoticed."""
    counts = {"evaluated_users": 0, "eval_failed": 0, "eval_failed_users": 0}
    for reply in replies:
        if reply.has_error():
            counts["eval_failed"] += 1
            log.warning(
                "round %d: device %s could not evaluate: %s",
                rnd,
                reply.metadata.src_node_id,
                reply.error.reason,
            )
        elif "metrics" in reply.content.metric_records:
            metrics = reply.content.metric_records["metrics"]
            counts["evaluated_users"] += int(metrics.get("num-examples", 0))
            counts["eval_failed_users"] += int(metrics.get("failed-users", 0))
    return counts


# about this many round lines on the terminal per run (the log and metrics.json keep every round)
PRINTED_ROUNDS = 50


def _printed(row: dict[str, Any], total: int) -> bool:
    """Whether a round's line goes to the terminal: the first and last round, every k-th (k the first of 1, 2, 5,
    10, 20, ... that prints at most ``PRINTED_ROUNDS``), evaluated rounds and any with rejected or failed devices
    or users."""
    every = next(  # a round step: 1, 2, 5, 10, 20, 50, ...
        step for step in (m * 10**k for k in range(9) for m in (1, 2, 5)) if step * PRINTED_ROUNDS >= total
    )
    return (
        row["round"] in (1, total)
        or row["round"] % every == 0
        or "val" in row
        or any(row.get(k) for k in ("rejected", "failed", "failed_users", "eval_failed", "eval_failed_users"))
    )


def _round_line(row: dict[str, Any], total: int) -> str:
    line = (
        f"round {row['round']}/{total}: {row.get('valid', 0)}/{row.get('sampled', 0)} devices valid, "
        f"{row.get('rejected', 0)} rejected, {row.get('failed', 0)} failed, "
        f"upload {row['upload_bytes_per_device'] / 1024:.1f} KiB/device, {row['seconds']:.1f}s"
    )
    if "rows_open" in row:
        line += f"; item rows open {row['rows_open']} ({row['promotions_held']} promotions held)"
    if "epsilon" in row:
        line += f"; DP epsilon {row['epsilon']:.3g} at delta {row['dp_delta']:g}"
    for stage in ("val", "test") if row["round"] == total else ("val",):
        if stage in row and "ndcg@10" in row[stage]:
            line += f"; {stage} NDCG@10 {row[stage]['ndcg@10']:.4f}"
            if stage == "val":
                line += f" over {row.get('evaluated_users', '?')} users"
            if f"{stage}-population" in row:  # served with the gated adaptations vs the population values
                line += f" (population values {row[f'{stage}-population']['ndcg@10']:.4f})"
            if "expl_recall@10" in row[stage]:
                line += f", expl R@10 {row[stage]['expl_recall@10']:.3f}"
    if row.get("failed_users") or row.get("eval_failed") or row.get("eval_failed_users"):
        line += (
            f"; {row.get('failed_users', 0)} users with unreadable stores sat training out; not evaluated: "
            f"{row.get('eval_failed_users', 0)} users (unreadable stores), {row.get('eval_failed', 0)} devices"
            " (failed)"
        )
    if "gate" in row:
        line += f"; adaptation kept by {row['gate']['kept']:.0%} of devices"
    return line


def _echo(enabled: bool, text: str) -> None:
    log.info(text)
    if enabled:
        print(text, flush=True)


def make_server_app(cfg: FederatedConfig | None = None) -> ServerApp:
    """A ServerApp running :func:`run_rounds` with ``cfg`` (or, for ``flwr run``, the run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_rounds(grid, cfg or FederatedConfig.from_run_config(dict(context.run_config)))

    return app


app = make_server_app()
