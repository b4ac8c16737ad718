"""SASRec baseline (Kang & McAuley, ICDM 2018): causal self-attention over the item sequence."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .batching import Batch
from .config import ModelConfig
from .dropout import Dropout
from .sequence_model import SequenceModel


class _Block(nn.Module):
    """Pre-LayerNorm causal self-attention + point-wise feed-forward, as in SASRec."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(d, d), nn.GELU(), Dropout(dropout), nn.Linear(d, d), Dropout(dropout)
        )

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        q = self.ln1(x)
        x = q + self.attn(q, x, x, attn_mask=attn_mask, need_weights=False)[0]
        return x + self.ffn(self.ln2(x))


class SASRec(SequenceModel):
    """Learned positions, ``num_blocks`` causal attention blocks; padding keys are masked out."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.position = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(
            _Block(cfg.d_model, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_blocks)
        )
        self.final_ln = nn.LayerNorm(cfg.d_model)
        self.dropout = Dropout(cfg.dropout)

    def encode_grid(self, batch: Batch) -> Tensor:
        b, length = batch.items.shape
        pos = torch.arange(length, device=batch.items.device)
        x = self.item_emb(batch.items) * self.cfg.d_model**0.5 + self.position(
            pos + self.cfg.max_len - length
        )
        x = self.dropout(x) * batch.mask.unsqueeze(-1)
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=1)
        blocked = causal.unsqueeze(0) | ~batch.mask.unsqueeze(1)  # (B, L, L): future or padding keys
        # a large negative instead of -inf: all-padding rows stay finite (their outputs are never used)
        attn_mask = torch.zeros(blocked.shape, device=x.device).masked_fill(blocked, -1e9)
        attn_mask = attn_mask.repeat_interleave(self.cfg.num_heads, dim=0)
        for block in self.blocks:
            x = block(x, attn_mask) * batch.mask.unsqueeze(-1)
        return self.final_ln(x)

    def user_vector(self, states: Tensor) -> Tensor:
        return states
