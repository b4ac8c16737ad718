"""The single table saying which parameters are personal (stay on the device) and which are shared.

Rows are the models' top-level modules; columns are named splits. ``card`` is the product card's split
(personal time encoder, LRU blocks and heads); the others are configurations compared in the federated benchmarks.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

Group = Literal["personal", "shared"]
P: Group = "personal"
S: Group = "shared"

#                 module          card  heads-prior  all-shared
_TABLE: dict[str, tuple[Group, Group, Group]] = {
    "item_emb": (S, S, S),  # item embeddings (shared by every model)
    "item_bias": (S, S, S),
    "explanation": (S, S, S),  # the whole explanation branch
    "time_encoder": (P, P, S),  # the user's own temporal rhythm
    "encoder": (P, S, S),  # multihead LRU interest blocks
    "embed_norm": (P, S, S),  # optional input LayerNorm (LRURec's embedding layer)
    "interests": (P, S, S),  # interest-head projections and mixture gate
    "position": (P, S, S),  # SASRec baseline: positions, attention blocks, final norm
    "blocks": (P, S, S),
    "final_ln": (P, S, S),
    "gru": (P, S, S),  # GRU4Rec baseline: recurrent layers and output projection
    "dense": (P, S, S),
}
SPLITS = ("card", "heads-prior", "all-shared")


def group_of(name: str, split: str = "card") -> Group:
    """The group of the parameter ``name`` (as in ``model.named_parameters()``) under ``split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    module = name.split(".", 1)[0]
    if module not in _TABLE:
        raise KeyError(f"parameter {name!r} is not in the partition table")
    return _TABLE[module][SPLITS.index(split)]


def parameter_groups(model: nn.Module, split: str = "card") -> dict[Group, list[str]]:
    """Parameter names by group; every parameter is in exactly one group (unknown ones raise)."""
    groups: dict[Group, list[str]] = {P: [], S: []}
    for name, _ in model.named_parameters():
        groups[group_of(name, split)].append(name)
    return groups


def split_state(model: nn.Module, split: str = "card") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The model's parameters as numpy arrays: (shared, personal), by :func:`group_of`."""
    shared: dict[str, np.ndarray] = {}
    personal: dict[str, np.ndarray] = {}
    for name, param in model.named_parameters():
        target = shared if group_of(name, split) == S else personal
        target[name] = param.detach().cpu().numpy().copy()
    return shared, personal


def load_parts(model: nn.Module, *parts: dict[str, np.ndarray]) -> None:
    """Copy arrays (shared and/or personal) into the model's parameters; names and shapes must match."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for part in parts:
            for name, value in part.items():
                if name not in params:
                    raise KeyError(f"unknown parameter {name!r}")
                if tuple(value.shape) != tuple(params[name].shape):
                    raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(params[name].shape)}")
                params[name].copy_(torch.from_numpy(np.asarray(value)))
