"""The project's dropout: nn.Dropout's semantics (rate, scaling, gradient through the same mask) with a mask
drawn as 16-bit lanes of 64-bit random words."""

from __future__ import annotations

import pytest
import torch

from shared_model.dropout import Dropout, drop_mask


def test_training_drops_at_rate_p_and_scales_the_rest_to_keep_the_mean():
    torch.manual_seed(0)
    drop = Dropout(0.2).train()
    x = torch.full((200_000,), 3.0, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.2) < 0.005
    keep_chance = 1 - round(0.2 * 65536) / 65536  # the rate to 16 bits
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 3.0 / keep_chance))
    assert abs(3.0 / keep_chance - 3.0 / 0.8) < 1e-4
    (y * 2).sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * 2 / keep_chance)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_every_lane_of_a_random_word_drops_at_rate_p_independently(p):
    torch.manual_seed(1)
    mask = drop_mask(torch.Size((100_003,)), p, torch.device("cpu"))  # not a multiple of 4 lanes
    assert mask.shape == (100_003,) and mask.dtype == torch.bool
    lanes = mask[:100_000].view(-1, 4).float()  # element i uses lane i % 4 of word i // 4
    torch.testing.assert_close(lanes.mean(0), torch.full((4,), p), atol=0.012, rtol=0)
    # neighbours within a word and across words are uncorrelated
    a, b = mask[:-1].float(), mask[1:].float()
    assert abs(((a - p) * (b - p)).mean().item()) < 0.004


def test_masks_follow_the_seed_and_keep_the_shape():
    torch.manual_seed(7)
    first = drop_mask(torch.Size((3, 5, 7)), 0.3, torch.device("cpu"))
    torch.manual_seed(7)
    assert torch.equal(first, drop_mask(torch.Size((3, 5, 7)), 0.3, torch.device("cpu")))
    assert first.shape == (3, 5, 7)


def test_identity_in_eval_mode_and_at_zero():
    x = torch.randn(4, 5)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(1.0)
