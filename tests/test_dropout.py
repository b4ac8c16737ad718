"""The project's dropout: nn.Dropout's semantics (rate, scaling, gradient through the same mask)."""

from __future__ import annotations

import pytest
import torch

from shared_model.dropout import Dropout


def test_training_drops_at_rate_p_and_scales_the_rest():
    torch.manual_seed(0)
    drop = Dropout(0.2).train()
    x = torch.full((200_000,), 3.0, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.2) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 3.0 / 0.8))
    (y * 2).sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * 2 / 0.8)


def test_identity_in_eval_mode_and_at_zero():
    x = torch.randn(4, 5)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(1.0)
