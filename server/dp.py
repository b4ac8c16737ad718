"""Central differential privacy on the shared update and its privacy accountant.

:class:`CentralDP` is a wrapper strategy (as Flower's own DP strategies, it holds ``self.strategy``) between
validation (:class:`server.validated.ValidatedStrategy`, which hands it only valid, dense updates) and the
strategy that steps the model. Each round every valid update's change from the sent arrays is clipped to L2
norm ``C`` (over all shared arrays together). The released update is

    sent + (sum of the clipped changes + N(0, (z C)^2 I)) / n

with ``n`` the sampled cohort size, fixed before the round (so devices that drop out or are rejected shorten
the step but never shrink the noise), uniform device weights (example weights would let one device's share
exceed ``C / n``) and ``z`` the noise multiplier. Adding or removing one device changes the sum by at most
``C``: the Gaussian mechanism with noise multiplier ``z``, on a cohort of rate ``q = n / N``. The privacy unit
is a node (a user, with one user per node). The released mean is handed to the wrapped strategy as the round's
one reply: FedAvg takes it, and FedAdam's step towards it is post-processing. (Flower's wrappers add the noise
to what the wrapped strategy returns, which for FedAdam is after its per-coordinate normalization: not the
Gaussian mechanism on the mean.) Not covered: the training-loss metric and the federated evaluation metrics devices send.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` is not used because it clips the raw replies *before*
the wrapped strategy validates them (positionally against the sent arrays, so a sparse, reordered or NaN
update is clipped wrong or crashes the round instead of being rejected), skips the whole round when any device
failed (the project aggregates when ``min_reply_fraction`` replied), adds its noise to an example-weighted mean
of however many replied, draws it from NumPy's global generator, and its accountant needs the optional
``dp-accounting`` package. Its noise formula (``compute_stdv``: ``z C / n``) is the one used here; clipping is
:func:`shared_model.protocol.clipping.clip_update` (the poisoning defence's norm clip).

The accountant (:class:`RdpAccountant`) composes the Renyi DP of the Poisson-subsampled Gaussian mechanism at
integer orders (Mironov, Talwar & Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian Mechanism",
section 3.3) and converts it to (epsilon, delta) with Canonne, Kamath & Steinke 2020, proposition 12 (the
conversion Google's ``dp-accounting`` uses). Sampling assumption: Flower samples a fixed-size cohort without
replacement; the accountant assumes each node is included independently with probability ``q`` (Poisson) and
add-or-remove-one neighbours, the usual approximation (DP-FedAvg, McMahan et al. 2018). For fixed-size samples
the exact notion is replace-one (sensitivity ``2 C``), under which the reported epsilon is optimistic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import compute_stdv

from shared_model.protocol.clipping import clip_update

from .records import cohort_metrics, record_to_numpy
from .wrapper import Reducer

ORDERS = tuple(range(2, 257))  # integer Renyi orders


def _logsumexp(values: np.ndarray) -> float:
    top = float(np.max(values))
    return top + math.log(float(np.sum(np.exp(values - top))))


def rdp_sampled_gaussian(q: float, noise_multiplier: float, orders: Iterable[int] = ORDERS) -> np.ndarray:
    """Renyi DP, at each integer order ``a``, of one release of the Gaussian mechanism (noise multiplier
    ``noise_multiplier``) on a Poisson sample of rate ``q``: ``log(A_a) / (a - 1)`` with
    ``A_a = sum_k binom(a, k) (1 - q)^(a - k) q^k exp((k^2 - k) / (2 sigma^2))`` (Mironov et al. 2019)."""
    orders = [int(a) for a in orders]
    if not 0 <= q <= 1 or noise_multiplier <= 0 or min(orders) < 2:
        raise ValueError("need 0 <= q <= 1, noise_multiplier > 0 and integer orders >= 2")
    if q == 0:
        return np.zeros(len(orders))
    if q == 1:
        return np.array(orders, dtype=np.float64) / (2 * noise_multiplier**2)
    out = []
    for a in orders:
        k = np.arange(a + 1, dtype=np.float64)
        log_binom = np.array(
            [math.lgamma(a + 1) - math.lgamma(j + 1) - math.lgamma(a - j + 1) for j in range(a + 1)]
        )
        terms = (
            log_binom + (a - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * noise_multiplier**2)
        )
        out.append(_logsumexp(terms) / (a - 1))
    return np.array(out)


def rdp_to_epsilon(rdp: np.ndarray, orders: Iterable[int], delta: float) -> tuple[float, int]:
    """The smallest epsilon (and its order) at ``delta`` implied by Renyi DP ``rdp`` at ``orders``:
    ``eps = rdp + log(1 - 1/a) - (log(delta) + log(a)) / (a - 1)`` (Canonne, Kamath & Steinke 2020)."""
    if not 0 < delta < 1:
        raise ValueError("delta must lie in (0, 1)")
    best = (math.inf, 0)
    for a, r in zip(orders, rdp, strict=True):
        if delta**2 + math.expm1(-r) > 0:  # the KL bound already gives epsilon = 0
            eps = 0.0
        else:
            eps = r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, (max(0.0, eps), int(a)))
    return best


class RdpAccountant:
    """Epsilon spent by repeated releases of the subsampled Gaussian mechanism (RDP composes additively)."""

    def __init__(self, sampling_rate: float, noise_multiplier: float, orders: Iterable[int] = ORDERS) -> None:
        self.orders = tuple(orders)
        self.rdp_per_release = rdp_sampled_gaussian(sampling_rate, noise_multiplier, self.orders)
        self.releases = 0

    def step(self, count: int = 1) -> None:
        """Account ``count`` more releases."""
        self.releases += count

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` after the releases so far (0 before any)."""
        if self.releases == 0:
            return 0.0
        return rdp_to_epsilon(self.releases * self.rdp_per_release, self.orders, delta)[0]


class CentralDP(Reducer):
    """Central DP in front of ``strategy``: each update clipped to ``C``, their sum over the fixed cohort, plus
    Gaussian noise, handed on as one reply. :meth:`round_report` carries ``epsilon`` at ``dp_delta``."""

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        clip: float,
        delta: float,
        cohort: int,
        population: int,
    ) -> None:
        """Noise multiplier ``z``, clipping norm ``C``, the reported ``delta``, the sampled cohort size ``n``
        and the number of nodes ``N`` (sampling rate ``n / N``)."""
        if noise_multiplier <= 0 or clip <= 0 or not 1 <= cohort <= population:
            raise ValueError("central DP needs noise_multiplier > 0, clip > 0 and 1 <= cohort <= population")
        super().__init__(strategy)
        self.noise_multiplier, self.clip, self.delta, self.cohort = noise_multiplier, clip, delta, cohort
        self.accountant = RdpAccountant(cohort / population, noise_multiplier)
        self.noise_std = compute_stdv(noise_multiplier, clip, cohort)
        # OS entropy: noise drawn from the seed in the run config could be subtracted by anyone who knows it
        self.noise_rng = np.random.default_rng()
        self.started = False
        self.sent: dict[str, np.ndarray] = {}
        self.clipped = 0

    def expect(self, sent: dict[str, np.ndarray]) -> None:
        """The arrays this round sent (the changes are clipped around them)."""
        self.sent, self.clipped = sent, 0

    def round_report(self) -> dict[str, Any]:
        """The privacy spent so far and the last round's clipping."""
        return {
            "epsilon": self.accountant.epsilon(self.delta),
            "dp_delta": self.delta,
            "dp_noise_std": self.noise_std,
            "dp_clipped": self.clipped,
        }

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.started:  # a resumed run: count every earlier round as a release (an upper bound)
            self.accountant.step(server_round - 1)
            self.started = True
        return super().configure_train(server_round, arrays, config, grid)

    def reduce(self, replies: list[Message]) -> tuple[dict[str, np.ndarray], MetricRecord]:
        """Each change clipped, summed, divided by the fixed cohort size, Gaussian noise added."""
        total = {k: np.zeros(v.shape, np.float64) for k, v in self.sent.items()}
        for msg in replies:
            clip = clip_update(record_to_numpy(msg.content["arrays"]), self.sent, self.clip, 0.0)
            self.clipped += clip.norm_clipped
            for k, v in clip.arrays.items():
                total[k] += v.astype(np.float64) - self.sent[k]
        released = {}
        for k, change in total.items():  # sum / cohort, not sum / replies
            noise = self.noise_rng.normal(0.0, self.noise_std, change.shape)
            released[k] = (self.sent[k] + change / self.cohort + noise).astype(self.sent[k].dtype)
        self.accountant.step()
        return released, cohort_metrics(replies, uniform=True)
