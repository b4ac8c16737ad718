"""The model a config describes: one constructor for training, federated simulation and export."""

from __future__ import annotations

from .config import ModelConfig
from .gru4rec import GRU4Rec
from .model import TMEPSR
from .sasrec import SASRec
from .sequence_model import SequenceModel

MODEL_KINDS: dict[str, type[SequenceModel]] = {"tmepsr": TMEPSR, "sasrec": SASRec, "gru4rec": GRU4Rec}


def build_model(cfg: ModelConfig) -> SequenceModel:
    """The model a config describes (``kind``: "tmepsr", "sasrec" or "gru4rec")."""
    return MODEL_KINDS[cfg.kind](cfg)
