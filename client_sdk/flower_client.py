"""The Flower ClientApp: one node = one user device (or, for scale, a node hosting several virtual users).

The node's own settings come from its node config: ``partition-id`` / ``num-partitions`` (which users it
hosts) and ``store-dir`` (where its encrypted stores live); the run's settings come with each message.
Replies carry only the shared arrays and metrics: personal weights never leave the device.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared_model.config import FederatedConfig

from .device import Device

ROUND_KEYS = ("server-round", "stage")


def _device(msg: Message, context: Context) -> tuple[Device, FederatedConfig, dict[str, Any]]:
    config = dict(next(iter(msg.content.config_records.values())))
    extra = {k: config.pop(k) for k in ROUND_KEYS if k in config}
    cfg = FederatedConfig.from_run_config(config)
    node = context.node_config
    store_dir = node.get("store-dir") or f"{cfg.out_dir}/devices"
    device = Device(cfg, int(node["partition-id"]), int(node["num-partitions"]), store_dir)
    return device, cfg, extra


def _shared(msg: Message) -> dict:
    return {k: v.numpy() for k, v in next(iter(msg.content.array_records.values())).items()}


def make_client_app() -> ClientApp:
    """A ClientApp whose train/evaluate handlers run :class:`Device` rounds."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        device, _, extra = _device(msg, context)
        result = device.train(_shared(msg), int(extra.get("server-round", 0)))
        arrays = ArrayRecord({k: Array(v) for k, v in result.update.items()})
        metrics = MetricRecord({"num-examples": result.num_examples, **result.metrics})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        device, _, extra = _device(msg, context)
        result = device.evaluate(
            _shared(msg), str(extra.get("stage", "val")), int(extra.get("server-round", 0))
        )
        metrics = MetricRecord({"num-examples": result.num_examples, **result.metrics})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


app = make_client_app()
__all__ = ["app", "make_client_app"]
