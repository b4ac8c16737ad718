"""GRU4Rec baseline (Hidasi et al., ICLR 2016, in its sequential-recommendation form as in RecBole): item
embeddings -> dropout -> GRU -> a dense layer to the item-table width, scored against the item table with
the same full softmax as every model here."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .batching import Batch
from .config import ModelConfig
from .dropout import Dropout
from .sequence_model import SequenceModel


class GRU4Rec(SequenceModel):
    """``num_blocks`` GRU layers of width ``d_model``. Left-padded inputs are run as packed sequences, so
    padding never enters the recurrence."""

    groups_rows = False  # packed sequences never run the padding

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.dropout = Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.d_model, cfg.d_model, num_layers=cfg.num_blocks, batch_first=True)
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)

    def encode_grid(self, batch: Batch) -> Tensor:
        b, length = batch.items.shape
        lengths = batch.mask.sum(1)
        # left padding -> right padding (real events first), as packing needs; and back after the GRU
        cols = torch.arange(length, device=lengths.device)
        to_right = (cols + (length - lengths)[:, None]) % length
        x = self.dropout(self.item_emb(batch.items.gather(1, to_right)))
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out = pad_packed_sequence(out, batch_first=True, total_length=length)[0]
        to_left = (cols - (length - lengths)[:, None]) % length
        out = out.gather(1, to_left[..., None].expand(-1, -1, out.shape[-1]))
        return self.dense(out) * batch.mask.unsqueeze(-1)

    def user_vector(self, states: Tensor) -> Tensor:
        return states
