"""Multihead Linear Recurrent Unit (LRU, Orvieto et al. 2023) and the LRURec blocks built on it.

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

from .dropout import Dropout

SCAN_CHUNK = 8  # events per chunk of the parallel scan (see MultiheadLRU.scan_with_state)


def scan_offsets(length: int) -> list[int]:
    """The doubling offsets 1, 2, 4, ... below ``length``: ceil(log2 length) scan iterations."""
    offsets = []
    k = 1
    while k < length:
        offsets.append(k)
        k *= 2
    return offsets


def _swap_pairs(z: Tensor, rows: int) -> Tensor:
    """``z`` (rows, cols, 2) -> (cols, rows, 2) contiguous: a transpose that keeps each [re, im] pair.

    Viewed as complex numbers the copy moves 8-byte elements, about 5x faster on a CPU than the same permute
    of float32s; a graph export takes the plain permute (same values)."""
    z = z.reshape(rows, -1, 2)
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return z.transpose(0, 1).contiguous()
    return torch.view_as_real(torch.view_as_complex(z).T.contiguous())


class MultiheadLRU(nn.Module):
    """``num_heads`` independent LRUs, head ``h`` on channels ``[h * d_head, (h + 1) * d_head)``.

    Each head keeps ``d_state = state_expansion * d_head`` complex states (LRURec: 2 per channel); the state
    is ``(batch, num_heads, d_state, 2)``, complex numbers as [real, imag].
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        r_min: float = 0.8,
        r_max: float = 0.99,
        phase_max: float = 2 * math.pi,
        state_expansion: int = 1,
    ) -> None:
        super().__init__()
        assert d_model % num_heads == 0, f"d_model={d_model} is not divisible by num_heads={num_heads}"
        self.d_model = d_model
        self.num_heads = num_heads
        self.d_head = n = d_model // num_heads
        self.d_state = m = state_expansion * n
        shape = (num_heads, m)
        # Ring initialisation: |lambda|^2 uniform in [r_min^2, r_max^2], arg(lambda) uniform in (0, phase_max].
        u1, u2 = torch.rand(shape), 1 - torch.rand(shape)
        self.nu_log = nn.Parameter(torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2)))
        self.theta_log = nn.Parameter(torch.log(phase_max * u2))
        self.B_re = nn.Parameter(torch.randn(num_heads, m, n) / math.sqrt(2 * n))  # (head, state, input)
        self.B_im = nn.Parameter(torch.randn(num_heads, m, n) / math.sqrt(2 * n))
        self.C_re = nn.Parameter(torch.randn(num_heads, n, m) / math.sqrt(m))  # (head, output, state)
        self.C_im = nn.Parameter(torch.randn(num_heads, n, m) / math.sqrt(m))
        self.D = nn.Parameter(torch.randn(d_model))

    def lambda_power(self, k: int) -> tuple[Tensor, Tensor]:
        """Real and imaginary parts of ``lambda ** k``, each (num_heads, d_state), in polar form."""
        log_modulus = -k * torch.exp(self.nu_log)
        angle = k * torch.exp(self.theta_log)
        modulus = torch.exp(log_modulus)
        return modulus * torch.cos(angle), modulus * torch.sin(angle)

    def drive_matrix(self) -> Tensor:
        """``gamma * B`` as one real matrix (d_model, 2 H d_state), block-diagonal over heads: ``x @ M`` is the
        drive of every complex state as [re, im] pairs, flattened in the state's (head, state, re/im) order."""
        h = self.num_heads
        gamma = torch.sqrt(1 - torch.exp(-2 * torch.exp(self.nu_log)))  # sqrt(1 - |lambda|^2)
        drive = torch.stack((self.B_re, self.B_im), dim=-1) * gamma[:, :, None, None]  # (H, M, d_head, 2)
        eye_head = torch.eye(h, dtype=drive.dtype, device=drive.device)
        return (eye_head[:, None, :, None, None] * drive.permute(0, 2, 1, 3)[:, :, None]).reshape(
            -1, 2 * h * self.d_state
        )

    def readout_matrix(self) -> Tensor:
        """``Re(C .)`` as one real matrix (2 H d_state, d_model), block-diagonal over heads, on flattened
        states (the layout of :meth:`drive_matrix`'s output)."""
        h = self.num_heads
        readout = torch.stack((self.C_re, -self.C_im), dim=-1).permute(0, 2, 3, 1)  # (H, M, 2, d_head)
        eye_head = torch.eye(h, dtype=readout.dtype, device=readout.device)
        return (eye_head[:, None, None, :, None] * readout[:, :, :, None]).reshape(-1, self.d_model)

    def forward(self, x: Tensor) -> Tensor:
        """x (batch, L, d_model), left-padded with zeros -> y (batch, L, d_model)."""
        return self.scan_with_state(x)[0]

    def _powers(self, start: int, count: int) -> tuple[Tensor, Tensor]:
        """``lambda ** j`` for ``j = start .. start + count - 1``: real and imaginary parts (count, H, M)."""
        j = torch.arange(start, start + count, device=self.nu_log.device).to(self.nu_log.dtype)[:, None, None]
        modulus = torch.exp(-j * torch.exp(self.nu_log))
        angle = j * torch.exp(self.theta_log)
        return modulus * torch.cos(angle), modulus * torch.sin(angle)

    def _chunk_kernels(self, chunk: int) -> tuple[Tensor, Tensor]:
        """The chunked scan's two real matrices per complex channel ``c`` (``H * d_state`` of them), acting on
        ``[re, im]`` pairs: ``K`` (C, 2 chunk, 2 chunk) maps a chunk's drives ``u_s`` to its states
        ``h_t = sum_(s <= t) lambda^(t - s) u_s`` (a causal Toeplitz product), and ``P`` (C, 2 chunk, 2) maps
        the state entering the chunk to its contribution ``lambda^(t + 1) h_in`` at event ``t``. Rows and
        columns are ordered (event, re/im)."""
        p_re, p_im = (p.flatten(1) for p in self._powers(0, chunk + 1))  # (chunk + 1, C)
        steps = torch.arange(chunk, device=p_re.device)
        lag = steps[:, None] - steps[None, :]
        causal = (lag >= 0).to(p_re.dtype)[:, :, None]
        t_re, t_im = p_re[lag.clamp(min=0)] * causal, p_im[lag.clamp(min=0)] * causal  # (t, s, C)
        # the 2x2 block of multiplying by re + i im: [[re, -im], [im, re]] (row: output part, column: input)
        blocks = torch.stack((torch.stack((t_re, -t_im), -1), torch.stack((t_im, t_re), -1)), -2)
        kernel = blocks.permute(2, 0, 3, 1, 4).reshape(-1, 2 * chunk, 2 * chunk)
        q_re, q_im = p_re[1:], p_im[1:]  # lambda^(t + 1), (chunk, C)
        entry = torch.stack((torch.stack((q_re, -q_im), -1), torch.stack((q_im, q_re), -1)), -2)
        return kernel, entry.permute(1, 0, 2, 3).reshape(-1, 2 * chunk, 2)

    def scan_with_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Parallel scan over x (batch, L, d_model): y (batch, L, d_model) and the state after the last step.

        Chunked, channel-major: the drives are laid out as one (2 chunk x batch * chunks) matrix per complex
        channel, so that inside chunks of ``SCAN_CHUNK`` events the recurrence is one batched matmul with the
        Toeplitz kernel (:meth:`_chunk_kernels`); across chunks a doubling scan of depth ceil(log2(L / chunk))
        carries the chunk-end states, and a second batched matmul adds each chunk's entering state to all its
        events. Total depth O(log L), and two copies of the (B, L, d) activations (into and out of the
        channel-major layout).
        """
        b, length, _ = x.shape
        chunk = min(SCAN_CHUNK, length)
        pad = (-length) % chunk
        m = (length + pad) // chunk
        channels = self.num_heads * self.d_state
        u = nn.functional.pad(x, (0, 0, pad, 0)) @ self.drive_matrix()  # left zero-padding: the state stays 0
        u = _swap_pairs(u, b * m * chunk).reshape(channels, b * m, 2 * chunk)  # channel-major
        kernel, entry = self._chunk_kernels(chunk)
        h = u @ kernel.transpose(
            1, 2
        )  # (C, B M, 2 chunk): states inside each chunk, from a zero entering state
        # across chunks: S_j = E_j + lambda^chunk * S_(j-1), by doubling over the chunk-end states E
        ends = h[..., -2:].reshape(channels, b, m, 2).permute(0, 3, 1, 2)  # (C, 2, B, M)
        for k in scan_offsets(m):
            re, im = (p.reshape(channels, 1, 1) for p in self.lambda_power(k * chunk))
            e_re, e_im = nn.functional.pad(ends[..., :-k], (k, 0)).unbind(1)
            ends = ends + torch.stack((re * e_re - im * e_im, re * e_im + im * e_re), dim=1)
        carried = nn.functional.pad(ends[..., :-1], (1, 0))  # the state entering each chunk
        h = torch.baddbmm(h, carried.reshape(channels, 2, b * m).transpose(1, 2), entry.transpose(1, 2))
        h = _swap_pairs(h, channels).reshape(b, m * chunk, -1)[:, pad:]
        state = ends[..., -1].permute(2, 0, 1).reshape(b, self.num_heads, self.d_state, 2)
        return h @ self.readout_matrix() + self.D * x, state

    def step_weights(self) -> tuple[Tensor, Tensor]:
        """The O(1) step as two real matrices on ``z = [s, x]``, the flattened state ``s``
        (batch, H * d_state * 2) next to the input ``x`` (batch, d_model): the new state ``s' = z @ M`` and the
        output ``y = z @ W``.

        ``M`` (2 H d_state + d_model, 2 H d_state) stacks the recurrence (a 2x2 rotation-scaling block per
        complex state: the diagonal ``lambda``) over the drive ``gamma * B``; ``W = M @ R + [0; diag(D)]``
        (2 H d_state + d_model, d_model) folds the readout ``y = Re(C s') + D * x`` (``R`` = ``Re(C .)``) into
        the same input, so the two products are independent. Both are block-diagonal over heads and depend on
        parameters only, so a runtime computes them once per set of weights (the ONNX export moves them into
        ``personalize.onnx``)."""
        n_state = 2 * self.num_heads * self.d_state
        re, im = self.lambda_power(1)  # (H, M)
        rotation = torch.stack((torch.stack((re, im), -1), torch.stack((-im, re), -1)), -2)  # (H, M, in, out)
        eye_state = torch.eye(n_state // 2, dtype=re.dtype, device=re.device)[:, None, :, None]
        recurrence = (eye_state * rotation.reshape(-1, 2, 1, 2)).reshape(n_state, n_state)
        transition = torch.cat((recurrence, self.drive_matrix()), dim=0)
        direct = torch.cat((recurrence.new_zeros(n_state, self.d_model), torch.diag(self.D)), dim=0)
        return transition, transition @ self.readout_matrix() + direct

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One event: x_t (batch, d_model), state (batch, num_heads, d_state, 2) or flattened
        (batch, num_heads * d_state * 2) -> y_t, the new state (shaped like ``state``)."""
        transition, output = self.step_weights()
        z = torch.cat((state.flatten(1), x_t), dim=-1)
        new_state = z @ transition
        return z @ output, new_state if state.dim() == 2 else new_state.view(state.shape)

    def initial_state(self, batch: int) -> Tensor:
        """The zero state (batch, num_heads, d_state, 2)."""
        return self.nu_log.new_zeros(batch, self.num_heads, self.d_state, 2)


class LRUBlock(nn.Module):
    """LRURec block: LRU -> dropout -> residual + LayerNorm -> FFN (d -> 4d -> d, GELU) -> residual + LayerNorm.

    LayerNorms and FFN are bias-free so that a zero input at the zero state maps to a zero output (the
    left-padding contract in the module docstring).
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.1, state_expansion: int = 1) -> None:
        super().__init__()
        self.lru = MultiheadLRU(d_model, num_heads, state_expansion=state_expansion)
        self.dropout = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model, bias=False)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, 4 * d_model, bias=False),
            nn.GELU(),
            Dropout(dropout),
            nn.Linear(4 * d_model, d_model, bias=False),
            Dropout(dropout),
        )
        self.norm2 = nn.LayerNorm(d_model, bias=False)

    def _position_wise(self, x: Tensor, y: Tensor) -> Tensor:
        z = self.norm1(x + self.dropout(y))
        return self.norm2(z + self.ffn(z))

    def forward(self, x: Tensor) -> Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model)."""
        return self.scan_with_state(x)[0]

    def scan_with_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Outputs (batch, L, d_model) and the LRU state after the last step (batch, H, d_state, 2)."""
        y, state = self.lru.scan_with_state(x)
        return self._position_wise(x, y), state

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One event: x_t (batch, d_model), state (batch, H, d_state, 2) or flattened -> output, new state."""
        y, state = self.lru.step(x_t, state)
        return self._position_wise(x_t, y), state

    def initial_state(self, batch: int) -> Tensor:
        """The zero state (batch, H, d_state, 2)."""
        return self.lru.initial_state(batch)


class LRUEncoder(nn.Module):
    """A stack of ``num_blocks`` LRUBlocks; its state is the blocks' states stacked on dim 1:
    (batch, num_blocks, num_heads, d_state, 2)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_blocks: int = 2,
        dropout: float = 0.1,
        state_expansion: int = 1,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            LRUBlock(d_model, num_heads, dropout, state_expansion) for _ in range(num_blocks)
        )

    def forward(self, x: Tensor) -> Tensor:
        """x (batch, L, d_model), left-padded with zeros -> (batch, L, d_model)."""
        return self.scan_with_state(x)[0]

    def scan_with_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Outputs (batch, L, d_model) and the final state (batch, num_blocks, H, d_state, 2)."""
        states = []
        for block in self.blocks:
            x, state = block.scan_with_state(x)
            states.append(state)
        return x, torch.stack(states, dim=1)

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One event: x_t (batch, d_model), state (batch, num_blocks, H, d_state, 2) -> output, new state.
        The blocks step on slices of the flattened state (fewer reshapes in an exported graph)."""
        flat = state.flatten(1)
        width = flat.shape[1] // len(self.blocks)
        states = []
        for i, block in enumerate(self.blocks):
            x_t, block_state = block.step(x_t, flat[:, i * width : (i + 1) * width])
            states.append(block_state)
        return x_t, torch.cat(states, dim=1).view(state.shape)

    def initial_state(self, batch: int) -> Tensor:
        """The zero state (batch, num_blocks, H, d_state, 2)."""
        return torch.stack([block.initial_state(batch) for block in self.blocks], dim=1)
