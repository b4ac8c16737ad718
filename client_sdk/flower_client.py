"""The Flower ClientApp: one node = one user device (or, for scale, a node hosting several virtual users).

The node's own settings come from its node config: ``partition-id`` / ``num-partitions`` (which users it
hosts) and ``store-dir`` (where its encrypted stores live); the run's settings come with each message.
Replies carry only the shared arrays and metrics: personal weights never leave the device.

SecAgg+ rounds (``privacy="secagg"``, see ``server.secagg``): the messages that carry SecAgg+ configs go through
Flower's ``secaggplus_mod``, which answers the key stages itself and, in the collect stage, calls the train
function with the legacy FitIns; the device trains as in any round and returns its clipped change
(``shared_model.protocol.secagg_vector.encode``) with its capped example weight as a legacy FitRes. On the way out,
:func:`secagg_mod` sends the masked vector as uint32 (its values are already reduced modulo 2**32, which
Flower would send as int64) and reports the weight as 0: the mod has used it inside the masked vector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import (
    Code,
    FitRes,
    Status,
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat

from shared_model.config import FederatedConfig
from shared_model.partition import group_of
from shared_model.protocol import secagg_vector
from shared_model.protocol.clipping import clip_update

from .device import DeviceError, HostedUsers

ROUND_KEYS = ("server-round", "stage", "adapt", "head-share")


def _device(
    config: Mapping[str, Any], context: Context
) -> tuple[HostedUsers, FederatedConfig, dict[str, Any]]:
    config = dict(config)
    extra = {k: config.pop(k) for k in ROUND_KEYS if k in config}
    cfg = FederatedConfig.from_run_config(config)
    node = context.node_config
    store_dir = node.get("store-dir") or f"{cfg.out_dir}/devices"
    device = HostedUsers(cfg, int(node["partition-id"]), int(node["num-partitions"]), store_dir)
    return device, cfg, extra


def _config(msg: Message) -> ConfigRecord:
    return next(iter(msg.content.config_records.values()))


def _shared(msg: Message) -> dict:
    return {k: v.numpy() for k, v in next(iter(msg.content.array_records.values())).items()}


def is_secagg(msg: Message) -> bool:
    """Whether a message belongs to a SecAgg+ round (it carries the protocol's configs)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages (others pass through); the masked vector leaves as
    uint32 and the plaintext weight as 0 (see the module docstring)."""
    if not is_secagg(msg):
        return call_next(msg, context)
    reply = secaggplus_mod(msg, context, call_next)
    configs = reply.content.config_records[RECORD_KEY_CONFIGS]
    if Key.MASKED_PARAMETERS in configs:
        masked = [bytes_to_ndarray(b).astype(np.uint32) for b in configs[Key.MASKED_PARAMETERS]]
        configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in masked]
        reply.content.metric_records["fitres.num_examples"]["num_examples"] = 0
    return reply


def _secagg_train(msg: Message, context: Context) -> Message:
    """The collect stage of a SecAgg+ round: train on the sent arrays (legacy Parameters in sorted key order)
    and return the clipped change as a legacy FitRes for ``secaggplus_mod`` to mask."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    device, cfg, extra = _device(fitins.config, context)
    names = sorted(n for n, _ in device.model.named_parameters() if group_of(n, cfg.split) != "personal")
    shared = dict(zip(names, parameters_to_ndarrays(fitins.parameters), strict=True))
    result = device.train(shared, int(extra.get("server-round", 0)), extra.get("head-share"))
    update = clip_update(result.update, shared, cfg.clip_norm, cfg.row_clip).arrays  # the server cannot
    vector = secagg_vector.encode(update, shared, result.metrics["train-loss"], cfg.secagg_clip)
    fitres = FitRes(
        Status(Code.OK, ""), ndarrays_to_parameters(vector), secagg_vector.weight(result.num_examples), {}
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _refused(msg: Message, exc: DeviceError) -> Message:
    """The reply of a device that cannot take part: an error with its one-line reason (the server counts it as
    failed and logs the line), not a raised exception (whose traceback the simulation engine would print)."""
    return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"), reply_to=msg)


def make_client_app(mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp whose train/evaluate handlers run :class:`HostedUsers` rounds. ``mods``: Flower mods around every
    handler (the tests and the poisoning benchmark tamper with replies this way)."""
    app = ClientApp(mods=list(mods))

    @app.train(mods=[secagg_mod])
    def train(msg: Message, context: Context) -> Message:
        if is_secagg(msg):
            return _secagg_train(msg, context)
        device, cfg, extra = _device(_config(msg), context)
        if cfg.privacy == "secagg":
            raise ValueError("privacy='secagg': this device sends its update only masked, in a SecAgg+ round")
        try:
            result = device.train(_shared(msg), int(extra.get("server-round", 0)), extra.get("head-share"))
        except DeviceError as exc:
            return _refused(msg, exc)
        arrays = ArrayRecord({k: Array(v) for k, v in result.update.items()})
        metrics = MetricRecord({"num-examples": result.num_examples, **result.metrics})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """The node's partition id (its stable identity, which the server samples cohorts by) and the number of
        partitions (the federation's size, which the server waits for)."""
        node = context.node_config
        partition = MetricRecord(
            {"partition-id": int(node["partition-id"]), "num-partitions": int(node["num-partitions"])}
        )
        return Message(RecordDict({"node": partition}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        device, _, extra = _device(_config(msg), context)
        try:
            result = device.evaluate(
                _shared(msg),
                str(extra.get("stage", "val")),
                int(extra.get("server-round", 0)),
                adapt=bool(extra.get("adapt", 1)),
                head_share=extra.get("head-share"),
            )
        except DeviceError as exc:
            return _refused(msg, exc)
        metrics = MetricRecord({"num-examples": result.num_examples, **result.metrics})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


app = make_client_app()
__all__ = ["app", "make_client_app"]
