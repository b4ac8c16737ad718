"""Dropout with a cheaper mask: ``torch.rand_like(x) >= p`` kept as a bool tensor, about twice as fast on a
CPU as ``nn.Dropout`` (whose Bernoulli sampling dominates), the same distribution and saved memory. Used by
every model here in place of ``nn.Dropout``."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:  # type: ignore[override]
        keep = torch.rand_like(x) >= p
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return torch.mul(x, keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None


class Dropout(nn.Module):
    """``nn.Dropout(p)`` semantics: in training, zero each element with probability ``p`` and scale the rest
    by ``1 / (1 - p)``; the identity in eval mode and at ``p = 0``."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        return _Dropout.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
