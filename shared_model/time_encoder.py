"""Dual-view gated time encoder: a vector per event that is added to its item embedding.

Short-term view: the log-scaled gap since the previous event, ``log1p(gap_seconds / 60)``, as Gaussian soft
buckets plus a first-event flag. Long-term view: hour-of-day (not for day-resolution data), day-of-week and
season as sin/cos phases in UTC, and the personal rhythm, the log-gap minus the mean of this user's earlier
log-gaps. A scalar gate per event, ``g = sigmoid(w . [short; long] + b)``, mixes them:
``g * short + (1 - g) * long``. For order-only data (``time_unit="order"``) the encoder is a learned embedding
of the event's index among the real events, and the gate is 1.

Sequences are left-padded: ``mask`` is False on a prefix and True on the real events after it. Time arithmetic
stays in int64 (gaps, remainders) and float64 (phases, log-gaps) before the features are cast to float32,
since float32 cannot hold unix seconds to the second.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

TIME_UNITS = ("seconds", "days", "order")
SECONDS_PER_DAY = 86_400
SECONDS_PER_WEEK = 7 * SECONDS_PER_DAY
SECONDS_PER_YEAR = 31_556_952  # mean Gregorian year, 365.2425 days
MONDAY_SHIFT = 3 * SECONDS_PER_DAY  # 1970-01-01 was a Thursday: shift so that phase 0 is Monday 00:00 UTC
MAX_LOG_GAP = math.log1p(366 * 24 * 60)  # a year in minutes; longer gaps fall in the last bucket
BUCKET_CUTOFF = 20.0  # squared widths from a gap bucket's centre beyond which it reads 0 (exp(-20) = 2e-9)
INIT_STD = 0.02  # initial weight scale of the output layers: time vectors start as small as item embeddings
STATE_SIZE = 4  # [day of the previous event, its second of the day, events seen, mean of their log-gaps]
ORDER_TICK = (0.0, 0.0, 1.0, 0.0)  # the state change per event in order mode
SIN_COS_OFFSETS = (0.0, math.pi / 2)  # a periodic feature's phase offsets: its sine, then its cosine


def log_gap(delta: Tensor, has_prev: Tensor) -> Tensor:
    """``log1p(gap / 60)`` (float32) for int64 gaps in seconds; 0 without a previous event, ties and
    out-of-order times count as 0."""
    gap = torch.where(has_prev, delta, 0).clamp(min=0)
    return torch.log1p(gap.double() / 60).float()


def day_and_second(t: Tensor) -> tuple[Tensor, Tensor]:
    """Unix seconds (int64) as float32 (day, second of the day), both exact: float32 cannot hold unix seconds
    to the second, but it holds each of these (integer arithmetic throughout: no float32 rounding of ``t``)."""
    second = torch.remainder(t, SECONDS_PER_DAY)
    return ((t - second).double() / SECONDS_PER_DAY).float(), second.float()


def gap_features(times: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per event of left-padded sequences (B, L): its log-gap, whether it is the first real event, and its
    personal rhythm (log-gap minus the mean of the earlier log-gaps; 0 with fewer than two earlier events)."""
    seen = torch.cumsum(mask.long(), dim=1) - mask.long()  # real events before this one
    prev = torch.cat((times[:, :1], times[:, :-1]), dim=1)
    lg = log_gap(times - prev, mask & (seen > 0))
    earlier_gaps = (seen - 1).clamp(min=0)  # the first event has no gap
    earlier_sum = torch.cumsum(lg.double(), dim=1) - lg.double()
    earlier_mean = (earlier_sum / earlier_gaps.clamp(min=1)).float()
    rhythm = torch.where(mask & (earlier_gaps > 0), lg - earlier_mean, 0)
    return lg, mask & (seen == 0), rhythm


class DualViewGatedTimeEncoder(nn.Module):
    """Time vectors (B, L, d_model) for events with int64 timestamps; see the module docstring.

    ``time_unit``: "seconds" (unix seconds), "days" (day-aligned unix seconds: no hour-of-day) or "order"
    (timestamps ignored; positions clipped at ``max_len - 1``).
    """

    def __init__(
        self, d_model: int, time_unit: str = "seconds", max_len: int = 256, num_gap_buckets: int = 32
    ) -> None:
        super().__init__()
        if time_unit not in TIME_UNITS:
            raise ValueError(f"time_unit must be one of {TIME_UNITS}, got {time_unit!r}")
        self.time_unit = time_unit
        self.max_len = max_len
        if time_unit == "order":
            self.position = nn.Embedding(max_len, d_model)
            nn.init.normal_(self.position.weight, std=INIT_STD)
            return
        hour_of_day = ((SECONDS_PER_DAY, 0),) if time_unit == "seconds" else ()
        # (period, shift) in seconds of each periodic feature
        cycles = (*hour_of_day, (SECONDS_PER_WEEK, MONDAY_SHIFT), (SECONDS_PER_YEAR, 0))
        # each cycle twice (its sine, then its cosine), as int64 seconds
        periods, shifts = ([c[k] for c in cycles for _ in SIN_COS_OFFSETS] for k in (0, 1))
        self.register_buffer("cycle_periods", torch.tensor(periods), persistent=False)
        self.register_buffer("cycle_shifts", torch.tensor(shifts), persistent=False)
        self.phase_offsets = SIN_COS_OFFSETS * len(cycles)
        self.register_buffer("gap_centers", torch.linspace(0, MAX_LOG_GAP, num_gap_buckets), persistent=False)
        self.gap_width = MAX_LOG_GAP / (num_gap_buckets - 1)
        self.short = nn.Linear(num_gap_buckets + 1, d_model)
        self.long = nn.Linear(len(periods) + 1, d_model)
        self.gate_proj = nn.Linear(2 * d_model, 1)
        for layer in (self.short, self.long):  # start at the item embeddings' scale, not above it
            nn.init.normal_(layer.weight, std=INIT_STD)
            nn.init.zeros_(layer.bias)

    def _position(self, index: Tensor) -> Tensor:
        return self.position(index.clamp(0, self.max_len - 1))

    def gap_buckets(self, lg: Tensor) -> Tensor:
        """The short view's Gaussian soft buckets of log-gaps (..., 1) -> (..., num_gap_buckets), exactly 0 where
        the Gaussian is negligible: its tail (exp(-87) and below) is denormal in float32, and denormals in the
        short view's matmuls made the time encoder's training pass 2.5x slower on a CPU."""
        distance = ((lg.clamp(max=MAX_LOG_GAP) - self.gap_centers) / self.gap_width) ** 2
        return torch.exp(-distance).masked_fill(distance > BUCKET_CUTOFF, 0)

    def _views(
        self, times: Tensor, lg: Tensor, first: Tensor, rhythm: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Short view, long view and gate of events whose features come with a trailing axis of 1: times, log-gap,
        first-event flag and rhythm (..., 1) -> (..., d_model) views and the gate (..., 1). (Kept at (..., 1),
        the one-event step exports without a squeeze or unsqueeze per feature.)"""
        short = self.short(torch.cat((self.gap_buckets(lg), first.float()), dim=-1))
        # every cycle's sine and cosine at once (..., 2C) from its phase as a fraction of the period, the cosine
        # as the sine a quarter turn on (one Mod and one Sin in an exported graph)
        turns = torch.remainder(times + self.cycle_shifts, self.cycle_periods).double() / self.cycle_periods
        periodic = torch.sin(turns * (2 * math.pi) + turns.new_tensor(self.phase_offsets)).float()
        long = self.long(torch.cat((periodic, rhythm), dim=-1))
        gate = torch.sigmoid(self.gate_proj(torch.cat((short, long), dim=-1)))
        return short, long, gate

    def _sequence_views(self, times: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_views` of every event of left-padded sequences (B, L)."""
        return self._views(*(x[..., None] for x in (times, *gap_features(times, mask))))

    def forward(self, times: Tensor, mask: Tensor) -> Tensor:
        """times (B, L) int64, mask (B, L) bool (True at real events, left padding False) -> (B, L, d_model)
        time vectors to add to the item embeddings, zero at padded positions."""
        keep = mask[..., None].float()
        if self.time_unit == "order":
            return self._position(torch.cumsum(mask.long(), dim=1) - 1) * keep
        return _mix(*self._sequence_views(times, mask)) * keep

    def gate(self, times: Tensor, mask: Tensor) -> Tensor:
        """The gate g (B, L, 1) on the short view (1 in order mode; not masked at padded positions)."""
        if self.time_unit == "order":
            return torch.ones_like(times, dtype=torch.float32)[..., None]
        return self._sequence_views(times, mask)[2]

    def initial_state(self, batch: int) -> Tensor:
        """The state before any event: float32 zeros (batch, STATE_SIZE)."""
        return torch.zeros(batch, STATE_SIZE, device=next(self.parameters()).device)

    def state_after(self, times: Tensor, mask: Tensor) -> Tensor:
        """The state (B, STATE_SIZE) that rolling :meth:`step` from :meth:`initial_state` reaches after the
        real events of left-padded sequences: times (B, L) int64, mask (B, L) bool."""
        count = mask.sum(1)
        zero = torch.zeros_like(count, dtype=torch.float32)
        if self.time_unit == "order":
            return torch.stack((zero, zero, count.float(), zero), dim=-1)
        lg = gap_features(times, mask)[0]  # 0 at the first event and at padding
        gaps = (count - 1).clamp(min=0)
        mean = torch.where(gaps > 0, lg.double().sum(1) / gaps.clamp(min=1), 0).float()
        day, second = day_and_second(torch.where(count > 0, times[:, -1], 0))
        return torch.stack((day, second, count.float(), mean), dim=-1)

    def step(self, t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """The next event of each sequence: t (B,) int64, state (B, STATE_SIZE) -> (B, d_model), new state.

        Equals ``forward`` on the whole sequence at that event."""
        if self.time_unit == "order":  # only the count moves (one Add in an exported graph)
            return self._position(state.select(-1, 2).long()), state + state.new_tensor(ORDER_TICK)
        t = t.unsqueeze(-1)  # (B, 1): every feature below keeps that shape (see _views)
        prev_day, prev_second, seen, mean = (state.narrow(-1, k, 1) for k in range(STATE_SIZE))
        prev = prev_day.long() * SECONDS_PER_DAY + prev_second.long()
        lg = log_gap(t - prev, seen > 0)
        deviation = lg - mean  # the rhythm, and the running mean's update
        vector = _mix(*self._views(t, lg, seen == 0, torch.where(seen >= 2, deviation, 0)))
        mean = torch.where(seen > 0, mean + deviation / seen.clamp(min=1), mean)  # mean over `seen` gaps
        return vector, torch.cat((*day_and_second(t), seen + 1, mean), dim=-1)


def _mix(short: Tensor, long: Tensor, gate: Tensor) -> Tensor:
    """The gated mix ``g * short + (1 - g) * long``, as ``long + g * (short - long)``."""
    return long + gate * (short - long)
