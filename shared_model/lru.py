"""Multihead Linear Recurrent Unit (LRU, Orvieto et al. 2023) and the LRURec blocks built on it (DESIGN §3).

Everything is real arithmetic: a complex number is a trailing pair ``[..., 2] = [real, imag]``, so the
module exports to ONNX. Each head owns its own slice of channels and runs a diagonal complex recurrence

    h_t = lambda * h_{t-1} + gamma * (B x_t),    y_t = Re(C h_t) + D * x_t,

with ``lambda = exp(-exp(nu) + i exp(theta))`` and ``gamma = sqrt(1 - |lambda|^2)``. Two forms compute it and
agree: a parallel (Hillis-Steele doubling) scan over a whole sequence, of depth ceil(log2 L), for training,
and an O(1) ``step`` for on-device inference.

Padding contract: sequences are LEFT-padded with all-zero input vectors, and no mask is taken. A zero input
at the zero state leaves the state at zero and gives a zero output, in every layer of every block (the block's
LayerNorms and feed-forward layers have no bias for this reason), so a padded prefix changes nothing that
follows it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

SCAN_CHUNK = 16  # events per chunk of the parallel scan (see MultiheadLRU.scan_with_state)


def scan_offsets(length: int) -> list[int]:
    """The doubling offsets 1, 2, 4, ... below ``length``: ceil(log2 length) scan iterations."""
    offsets = []
    k = 1
    while k < length:
        offsets.append(k)
        k *= 2
    return offsets


def _cmul(z: Tensor, re: Tensor, im: Tensor) -> Tensor:
    """Complex product of ``z`` (..., 2) with ``re + i im`` (broadcast against ``z[..., 0]``)."""
    z_re, z_im = z.unbind(-1)
    return torch.stack((re * z_re - im * z_im, re * z_im + im * z_re), dim=-1)


class MultiheadLRU(nn.Module):
    """``num_heads`` independent LRUs, head ``h`` on channels ``[h * d_head, (h + 1) * d_head)``.

    The state is ``(batch, num_heads, d_head, 2)``: ``d_head`` complex numbers per head as [real, imag].
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        r_min: float = 0.8,
        r_max: float = 0.99,
        phase_max: float = 2 * math.pi,
    ) -> None:
        super().__init__()
        assert d_model % num_heads == 0, f"d_model={d_model} is not divisible by num_heads={num_heads}"
        self.d_model = d_model
        self.num_heads = num_heads
        self.d_head = n = d_model // num_heads
        shape = (num_heads, n)
        # Ring initialisation: |lambda|^2 uniform in [r_min^2, r_max^2], arg(lambda) uniform in (0, phase_max].
        u1, u2 = torch.rand(shape), 1 - torch.rand(shape)
        self.nu_log = nn.Parameter(torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2)))
        self.theta_log = nn.Parameter(torch.log(phase_max * u2))
        self.B_re = nn.Parameter(torch.randn(num_heads, n, n) / math.sqrt(2 * n))  # (head, state, input)
        self.B_im = nn.Parameter(torch.randn(num_heads, n, n) / math.sqrt(2 * n))
        self.C_re = nn.Parameter(torch.randn(num_heads, n, n) / math.sqrt(n))  # (head, output, state)
        self.C_im = nn.Parameter(torch.randn(num_heads, n, n) / math.sqrt(n))
        self.D = nn.Parameter(torch.randn(d_model))

    def lambda_power(self, k: int) -> tuple[Tensor, Tensor]:
        """Real and imaginary parts of ``lambda ** k``, each (num_heads, d_head), in polar form."""
        log_modulus = -k * torch.exp(self.nu_log)
        angle = k * torch.exp(self.theta_log)
        modulus = torch.exp(log_modulus)
        return modulus * torch.cos(angle), modulus * torch.sin(angle)

    def _drive(self, x: Tensor) -> Tensor:
        """``gamma * B x`` per head: x (..., d_model) -> (..., num_heads, d_head, 2)."""
        gamma = torch.sqrt(1 - torch.exp(-2 * torch.exp(self.nu_log)))  # sqrt(1 - |lambda|^2)
        weight = torch.stack((self.B_re, self.B_im), dim=2) * gamma[:, :, None, None]  # (H, N, 2, d_head)
        return torch.einsum("...hd,hnkd->...hnk", x.unflatten(-1, (self.num_heads, self.d_head)), weight)

    def _readout(self, h: Tensor, x: Tensor) -> Tensor:
        """``Re(C h) + D * x``: h (..., num_heads, d_head, 2), x (..., d_model) -> (..., d_model)."""
        weight = torch.stack((self.C_re, -self.C_im), dim=-1)  # (H, d_head, N, 2)
        return torch.einsum("...hnk,hdnk->...hd", h, weight).flatten(-2) + self.D * x

    def forward(self, x: Tensor) -> Tensor:
        """x (batch, L, d_model), left-padded with zeros -> y (batch, L, d_model)."""
        return self.scan_with_state(x)[0]

    def _powers(self, start: int, count: int) -> tuple[Tensor, Tensor]:
        """``lambda ** j`` for ``j = start .. start + count - 1``: real and imaginary parts (count, H, N)."""
        j = torch.arange(start, start + count, device=self.nu_log.device).to(self.nu_log.dtype)[:, None, None]
        modulus = torch.exp(-j * torch.exp(self.nu_log))
        angle = j * torch.exp(self.theta_log)
        return modulus * torch.cos(angle), modulus * torch.sin(angle)

    def scan_with_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Parallel scan over x (batch, L, d_model): y (batch, L, d_model) and the state after the last step.

        Chunked: inside chunks of ``SCAN_CHUNK`` events the recurrence is a causal Toeplitz product
        ``h_t = sum_s lambda^(t-s) u_s`` (one batched matmul); across chunks a doubling scan of depth
        ceil(log2(L / chunk)) carries the chunk-end states; one complex product adds the carried state to
        every position. Total depth O(log L), and few passes over the (B, L, H, N) tensor.
        """
        b, length, _ = x.shape
        chunk = min(SCAN_CHUNK, length)
        pad = (-length) % chunk
        u = self._drive(nn.functional.pad(x, (0, 0, pad, 0)))  # left zero-padding keeps the state at zero
        m = (length + pad) // chunk
        u = u.reshape(b, m, chunk, self.num_heads, self.d_head, 2)
        # intra-chunk: T[t, s] = lambda^(t - s) for s <= t
        p_re, p_im = self._powers(0, chunk)
        lag = torch.arange(chunk)[:, None] - torch.arange(chunk)[None, :]
        causal = (lag >= 0).to(x.dtype)[:, :, None, None]
        t_re, t_im = p_re[lag.clamp(min=0)] * causal, p_im[lag.clamp(min=0)] * causal  # (C, C, H, N)
        u_re, u_im = u.unbind(-1)
        h_re = torch.einsum("tshn,bmshn->bmthn", t_re, u_re) - torch.einsum("tshn,bmshn->bmthn", t_im, u_im)
        h_im = torch.einsum("tshn,bmshn->bmthn", t_re, u_im) + torch.einsum("tshn,bmshn->bmthn", t_im, u_re)
        # across chunks: S_j = E_j + lambda^chunk * S_(j-1), by doubling over chunk-end states E
        ends = torch.stack((h_re[:, :, -1], h_im[:, :, -1]), dim=-1)  # (B, M, H, N, 2)
        for k in scan_offsets(m):
            re, im = self.lambda_power(k * chunk)
            earlier = torch.cat((torch.zeros_like(ends[:, :k]), ends[:, :-k]), dim=1)
            ends = ends + _cmul(earlier, re, im)
        carried = torch.cat((torch.zeros_like(ends[:, :1]), ends[:, :-1]), dim=1)  # state entering each chunk
        q_re, q_im = self._powers(1, chunk)  # lambda^(t + 1) for the t-th event of a chunk
        c_re, c_im = carried[:, :, None].unbind(-1)
        h_re = h_re + q_re * c_re - q_im * c_im
        h_im = h_im + q_re * c_im + q_im * c_re
        h = torch.stack((h_re, h_im), dim=-1).reshape(b, m * chunk, self.num_heads, self.d_head, 2)[:, pad:]
        return self._readout(h, x), ends[:, -1]

    def step_weights(self) -> tuple[Tensor, Tensor]:
        """The O(1) step as two real matrices on ``z = [s, x]``, the flattened state ``s``
        (batch, H * d_head * 2) next to the input ``x`` (batch, d_model): the new state ``s' = z @ M`` and the
        output ``y = z @ W``.

        ``M`` (2 H d_head + d_model, 2 H d_head) stacks the recurrence (a 2x2 rotation-scaling block per
        complex state: the diagonal ``lambda``) over the drive ``gamma * B``; ``W = M @ R + [0; diag(D)]``
        (2 H d_head + d_model, d_model) folds the readout ``y = Re(C s') + D * x`` (``R`` = ``Re(C .)``) into
        the same input, so the two products are independent. Both are block-diagonal over heads and depend on
        parameters only, so a runtime computes them once per set of weights (the ONNX export moves them into
        ``personalize.onnx``)."""
        h, n = self.num_heads, self.d_head
        re, im = self.lambda_power(1)  # (H, N)
        rotation = torch.stack((torch.stack((re, im), -1), torch.stack((-im, re), -1)), -2)  # (H, N, in, out)
        eye_state = torch.eye(h * n, dtype=re.dtype, device=re.device)[:, None, :, None]
        recurrence = (eye_state * rotation.reshape(h * n, 2, 1, 2)).reshape(2 * h * n, 2 * h * n)
        gamma = torch.sqrt(1 - torch.exp(-2 * torch.exp(self.nu_log)))  # sqrt(1 - |lambda|^2)
        drive = torch.stack((self.B_re, self.B_im), dim=-1) * gamma[:, :, None, None]  # (H, N, d_head, 2)
        eye_head = torch.eye(h, dtype=re.dtype, device=re.device)
        drive = (eye_head[:, None, :, None, None] * drive.permute(0, 2, 1, 3)[:, :, None]).reshape(
            -1, 2 * h * n
        )
        readout = torch.stack((self.C_re, -self.C_im), dim=-1).permute(0, 2, 3, 1)  # (H, N, 2, d_head)
        readout = (eye_head[:, None, None, :, None] * readout[:, :, :, None]).reshape(2 * h * n, -1)
        transition = torch.cat((recurrence, drive), dim=0)
        direct = torch.cat((recurrence.new_zeros(2 * h * n, self.d_model), torch.diag(self.D)), dim=0)
        return transition, transition @ readout + direct

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One event: x_t (batch, d_model), state (batch, num_heads, d_head, 2) or flattened
        (batch, num_heads * d_head * 2) -> y_t, the new state (shaped like ``state``)."""
        transition, output = self.step_weights()
        z = torch.cat((state.flatten(1), x_t), dim=-1)
        new_state = z @ transition
        return z @ output, new_state if state.dim() == 2 else new_state.view(state.shape)

    def initial_state(self, batch: int) -> Tensor:
        """The zero state (batch, num_heads, d_head, 2)."""
        return self.nu_log.new_zeros(batch, self.num_heads, self.d_head, 2)


class LRUBlock(nn.Module):
    """LRURec block: LRU -> dropout -> residual + LayerNorm -> FFN (d -> 4d -> d, GELU) -> residual + LayerNorm.

    LayerNorms and FFN are bias-free so that a zero input at the zero state maps to a zero output (the
    left-padding contract in the module docstring).
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.lru = MultiheadLRU(d_model, num_heads)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model, bias=False)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, 4 * d_model, bias=False),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(4 * d_model, d_model, bias=False),
            nn.Dropout(dropout),
        )
        self.norm2 = nn.LayerNorm(d_model, bias=False)

    def _position_wise(self, x: Tensor, y: Tensor) -> Tensor:
        z = self.norm1(x + self.dropout(y))
        return self.norm2(z + self.ffn(z))

    def forward(self, x: Tensor) -> Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model)."""
        return self.scan_with_state(x)[0]

    def scan_with_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Outputs (batch, L, d_model) and the LRU state after the last step (batch, H, d_head, 2)."""
        y, state = self.lru.scan_with_state(x)
        return self._position_wise(x, y), state

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One event: x_t (batch, d_model), state (batch, H, d_head, 2) or flattened -> output, new state."""
        y, state = self.lru.step(x_t, state)
        return self._position_wise(x_t, y), state

    def initial_state(self, batch: int) -> Tensor:
        """The zero state (batch, H, d_head, 2)."""
        return self.lru.initial_state(batch)


class LRUEncoder(nn.Module):
    """A stack of ``num_blocks`` LRUBlocks; its state is the blocks' states stacked on dim 1:
    (batch, num_blocks, num_heads, d_head, 2)."""

    def __init__(self, d_model: int, num_heads: int, num_blocks: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(LRUBlock(d_model, num_heads, dropout) for _ in range(num_blocks))

    def forward(self, x: Tensor) -> Tensor:
        """x (batch, L, d_model), left-padded with zeros -> (batch, L, d_model)."""
        return self.scan_with_state(x)[0]

    def scan_with_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Outputs (batch, L, d_model) and the final state (batch, num_blocks, H, d_head, 2)."""
        states = []
        for block in self.blocks:
            x, state = block.scan_with_state(x)
            states.append(state)
        return x, torch.stack(states, dim=1)

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One event: x_t (batch, d_model), state (batch, num_blocks, H, d_head, 2) -> output, new state.
        The blocks step on slices of the flattened state (fewer reshapes in an exported graph)."""
        flat = state.flatten(1)
        width = flat.shape[1] // len(self.blocks)
        states = []
        for i, block in enumerate(self.blocks):
            x_t, block_state = block.step(x_t, flat[:, i * width : (i + 1) * width])
            states.append(block_state)
        return x_t, torch.cat(states, dim=1).view(state.shape)

    def initial_state(self, batch: int) -> Tensor:
        """The zero state (batch, num_blocks, H, d_head, 2)."""
        return torch.stack([block.initial_state(batch) for block in self.blocks], dim=1)
