"""SecAgg+ training rounds (``privacy="secagg"``): the server learns only the cohort's weighted mean update.

How Flower's SecAgg+ is driven from the project's Message-API ``run_rounds`` (flwr 1.42)
------------------------------------------------------------------------------------------
Flower ships SecAgg+ only for the legacy workflow: ``SecAggPlusWorkflow`` (server) runs one training round
as four message exchanges (setup: public keys; share keys: encrypted Shamir shares; collect masked vectors:
the FitIns, then each device's masked, quantized vector; unmask: the shares that remove the masks, including
the pairwise masks of devices that dropped out after sharing their keys) on a ``LegacyContext`` with a legacy
``Strategy``; ``secaggplus_mod`` (client) answers the stages and calls the ClientApp's train function inside
the collect stage. Rather than reimplement the protocol, or switch the whole server to the legacy
``DefaultWorkflow`` (which would bypass the project's sampling, validation, checkpoints, evaluation and
metrics), :func:`secagg_round` replaces only the train exchange of a ``run_rounds`` round:

1. the project's strategy samples the cohort (``configure_train``, as in a plaintext round; its messages are
   not sent) and stays the only place that applies the server step (FedAvg, or FedAdam's Adam step);
2. ``SecAggPlusWorkflow`` runs once on a ``LegacyContext`` holding the sent arrays (legacy ``Parameters``, in
   sorted key order) and :class:`_CohortStrategy`, a legacy strategy that hands the workflow that cohort with
   the round's FitIns and keeps the unmasked aggregate the workflow passes to ``aggregate_fit``;
3. the aggregate is decoded (:mod:`shared_model.protocol.secagg_vector`), validated and handed to the strategy's server step.

Evaluation rounds stay Message-API rounds. On the device, ``client_sdk.flower_client`` runs ``secaggplus_mod``
on the messages that carry SecAgg+ configs; inside the collect stage the device trains with the same
``HostedUsers.train`` as a plaintext round and contributes its clipped change (``shared_model.protocol.secagg_vector.encode``).

Quantization and weighting: each device's value is ``w * clip(delta, -secagg_clip, secagg_clip)`` with
``w = min(num_examples, MAX_WEIGHT) / MAX_WEIGHT``, quantized stochastically onto ``[0, T]``; the workflow
divides the unmasked sum by the sum of the (quantized) weights, so the result is the **example-weighted**
mean (as plaintext FedAvg) of the clipped changes, with an error of at most ``n * 2 * secagg_clip / T`` over
the sum of the weights. ``T`` is chosen per round as the largest power of two with ``n * T < 2**32`` (the
modulus), at most ``2**30``, so the masked sum never wraps: the more devices, the coarser the grid.

Validation: under SecAgg+ no individual update can be checked (that is the point). What is checked is the
unmasked aggregate: it must decode to the sent keys and shapes, be finite, stay within ``[-secagg_clip,
secagg_clip]`` per coordinate (a mean of clipped values does; an overflowing or tampered sum does not) and
within ``norm_bound`` of the sent arrays. A rejected aggregate rejects the whole cohort's round (the arrays
stay). Robust aggregates (trimmed mean, median) need individual updates: the configuration refuses them with
``privacy="secagg"``. ``clip_norm`` and ``row_clip`` are applied by each device to its own update before
masking (which binds honest devices only), and ``secagg_clip`` bounds each device's influence per coordinate.
The row quorum (:mod:`server.row_quorum`) counts which devices raised an item's bias, which a masked update
does not show: SecAgg+ rounds hold no rows.

What the server still sees in the clear: who took part and who dropped out, the stage messages' sizes, and
nothing per device about its update, weight or loss (the device reports its weight as 0 outside the masked
vector and its loss inside it). Metrics rows report ``sampled``; ``valid`` (devices whose masked vector is in
the accepted sum); ``rejected`` (all of them, when the aggregate is rejected); ``failed`` (the rest);
``dropped`` (devices that failed or did not answer some stage); ``upload_bytes_per_device`` (serialized
replies of all four stages, mean over the devices that finished) and ``download_bytes_per_device``.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import recorddict_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from shared_model.config import FederatedConfig
from shared_model.protocol.secagg_vector import MAX_WEIGHT, decode

from .records import numpy_to_record, one_reply, record_to_numpy
from .validated import ValidatedStrategy
from .validation import UpdateRejected, validate_update

log = logging.getLogger("tmepsr.server")
MOD_RANGE = 1 << 32  # Flower's default modulus; masks and masked values are uint32
MIN_COHORT = 3


def quantization_range(cohort: int) -> int:
    """The largest power of two ``T <= 2**30`` with ``cohort * T < MOD_RANGE``: quantized values lie in
    ``[0, T]`` and the weight factors in ``[0, T]``, so their masked sums over the cohort never wrap."""
    return min(1 << 30, 1 << (((MOD_RANGE - 1) // cohort).bit_length() - 1))


class _CohortStrategy(LegacyFedAvg):
    """The legacy strategy :class:`SecAggPlusWorkflow` calls: ``configure_fit`` returns the cohort the
    project's strategy sampled with the round's config; ``aggregate_fit`` keeps the unmasked aggregate (the
    workflow sets every survivor's ``FitRes.parameters`` to it) and the number of survivors."""

    def __init__(self, grid: Grid, cohort: list[int], config: dict[str, Any]) -> None:
        super().__init__()
        self.proxies = [GridClientProxy(nid, grid, grid.run.run_id) for nid in cohort]
        self.config = config
        self.aggregate: list[np.ndarray] | None = None
        self.survivors = 0

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(proxy, FitIns(parameters, dict(self.config))) for proxy in self.proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict]:
        self.survivors = len(results)
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}


class _MeteredGrid:
    """Forwards the workflow's exchanges to the real grid and counts, per node, the serialized bytes it sends
    and receives in each stage, and which nodes failed or did not reply."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.upload: dict[int, dict[str, int]] = defaultdict(dict)
        self.download: dict[int, int] = defaultdict(int)
        self.dropped: set[int] = set()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            self.download[msg.metadata.dst_node_id] += recorddict_to_proto(msg.content).ByteSize()
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) if messages else ""
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.dropped.add(node)
            else:
                self.upload[node][stage] = recorddict_to_proto(reply.content).ByteSize()
        self.dropped |= {m.metadata.dst_node_id for m in messages} - {r.metadata.src_node_id for r in replies}
        return replies


def _check_aggregate(
    vector: list[np.ndarray], sent: dict[str, np.ndarray], cfg: FederatedConfig, weight: int
) -> tuple[dict[str, np.ndarray], float]:
    """Decode and validate the unmasked mean; the new shared arrays and the mean training loss."""
    deltas, loss = decode(vector, sent, cfg.secagg_clip)
    if not all(np.isfinite(d).all() for d in deltas.values()) or not math.isfinite(loss):
        raise UpdateRejected("the unmasked aggregate has non-finite values")
    bound = cfg.secagg_clip * 1.01  # a mean of clipped values, plus the quantization error
    if (peak := max(float(np.abs(d).max(initial=0.0)) for d in deltas.values())) > bound:
        raise UpdateRejected(
            f"the unmasked aggregate leaves the clip range ({peak:.3g} > {cfg.secagg_clip:.3g})"
        )
    new = {k: (sent[k] + deltas[k]).astype(sent[k].dtype) for k in sent}
    return validate_update(new, sent, weight, cfg.norm_bound), loss


def secagg_round(
    grid: Grid, strategy: ValidatedStrategy, rnd: int, shared: dict[str, np.ndarray], cfg: FederatedConfig
) -> tuple[dict[str, np.ndarray], dict[str, float] | None, dict[str, Any]]:
    """One SecAgg+ training round (see the module docstring): the new shared arrays, the training metrics and
    the round's traffic. Sets ``strategy.last_round``."""
    config = cfg.to_run_config() | {"server-round": rnd}
    requests = list(strategy.configure_train(rnd, numpy_to_record(shared), ConfigRecord(dict(config)), grid))
    cohort = [m.metadata.dst_node_id for m in requests]
    if len(cohort) < MIN_COHORT:
        raise ValueError(
            f"SecAgg+ needs a cohort of at least {MIN_COHORT} devices; fraction_train={cfg.fraction_train} "
            f"sampled {len(cohort)}"
        )
    cohort_strategy = _CohortStrategy(grid, cohort, config)
    context = LegacyContext(Context(grid.run.run_id, 0, {}, RecordDict(), {}), strategy=cohort_strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    parameters = ndarrays_to_parameters([shared[k] for k in sorted(shared)])
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(parameters, True)
    workflow = SecAggPlusWorkflow(
        cfg.secagg_shares,
        cfg.secagg_threshold,
        max_weight=float(MAX_WEIGHT),
        clipping_range=cfg.secagg_clip,
        quantization_range=quantization_range(len(cohort)),
        modulus_range=MOD_RANGE,
        timeout=cfg.round_timeout,
    )
    metered = _MeteredGrid(grid)
    workflow(metered, context)  # type: ignore[arg-type]  # the workflow only calls send_and_receive

    aggregate, metrics, rejections = None, None, []
    if cohort_strategy.aggregate is None:
        rejections.append("SecAgg+ halted: too few devices answered a stage to reach the threshold")
    else:
        try:
            aggregate, loss = _check_aggregate(
                cohort_strategy.aggregate, shared, cfg, cohort_strategy.survivors
            )
            metrics = {"train-loss": loss}
        except ValueError as exc:  # UpdateRejected, or a vector that does not decode
            rejections.append(f"the unmasked aggregate was rejected: {exc}")
    for reason in rejections:
        log.warning("round %d: %s; shared arrays unchanged", rnd, reason)
    valid = cohort_strategy.survivors if aggregate is not None else 0
    rejected = cohort_strategy.survivors - valid
    aggregated = aggregate is not None and valid >= strategy.needed(len(cohort))
    if aggregated:
        shared = _server_step(strategy, rnd, requests[0], aggregate)
    strategy.last_round = {
        "sampled": len(cohort),
        "valid": valid,
        "rejected": rejected,
        "failed": len(cohort) - valid - rejected,
        "dropped": len(metered.dropped & set(cohort)),
        "rejections": rejections,
        "aggregated": aggregated,
    }
    finished = [n for n in cohort if n not in metered.dropped] or cohort
    stages = sorted({s for n in finished for s in metered.upload[n]})
    traffic = {
        "upload_bytes_per_device": float(np.mean([sum(metered.upload[n].values()) for n in finished])),
        "download_bytes_per_device": float(np.mean([metered.download[n] for n in finished])),
        "upload_bytes_by_stage": {
            s: float(np.mean([metered.upload[n].get(s, 0) for n in finished])) for s in stages
        },
    }
    return shared, metrics, traffic


def _server_step(
    strategy: ValidatedStrategy, rnd: int, request: Message, aggregate: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The strategy's own server step (FedAvg: take the mean; FedAdam: an Adam step towards it) on the
    validated aggregate, handed to it as the round's one reply."""
    arrays, _ = strategy.server_step(rnd, [one_reply(aggregate, {}, request)])
    return record_to_numpy(arrays)
