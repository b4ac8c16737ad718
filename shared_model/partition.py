"""The single table saying which parameters are personal (stay on the device) and which are shared.

Rows are the models' top-level modules; columns are named splits. Three groups:

* ``shared``: trained on devices from the server's values; their change is uploaded and aggregated.
* ``personal``: trained on the device only and never uploaded, not even as an update.
* ``adapted``: a *population* value learned like a shared one, plus the device's own adaptation of it, trained
  locally from the population value and kept only when it beats it on the user's recent events (the
  device's validation gate, ``client_sdk.device``); the adaptation never leaves the device.

``population`` (the default) learns the whole model from many users and adapts the time encoder and interest
heads per user; ``card`` is the product card's strict split (time encoder, LRU blocks and heads personal from
the start); ``heads-prior`` keeps only the time encoder personal.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from .config import SPLITS

Group = Literal["personal", "shared", "adapted"]
P: Group = "personal"
S: Group = "shared"
A: Group = "adapted"

#                 module        population  card  heads-prior
_TABLE: dict[str, tuple[Group, Group, Group]] = {
    "item_emb": (S, S, S),  # item embeddings (shared by every model)
    "item_bias": (S, S, S),
    "explanation": (S, S, S),  # the whole explanation branch
    "time_encoder": (A, P, P),  # the user's own temporal rhythm
    "encoder": (S, P, S),  # multihead LRU interest blocks
    "embed_norm": (S, P, S),  # optional input LayerNorm (LRURec's embedding layer)
    "interests": (A, P, S),  # interest-head projections and mixture gate
    "position": (S, P, S),  # SASRec baseline: positions, attention blocks, final norm
    "blocks": (S, P, S),
    "final_ln": (S, P, S),
    "gru": (S, P, S),  # GRU4Rec baseline: recurrent layers and output projection
    "dense": (S, P, S),
}


def group_of(name: str, split: str = "population") -> Group:
    """The group of the parameter ``name`` (as in ``model.named_parameters()``) under ``split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    module = name.split(".", 1)[0]
    if module not in _TABLE:
        raise KeyError(f"parameter {name!r} is not in the partition table")
    return _TABLE[module][SPLITS.index(split)]


def parameter_groups(model: nn.Module, split: str = "population") -> dict[Group, list[str]]:
    """Parameter names by group; every parameter is in exactly one group (unknown ones raise)."""
    groups: dict[Group, list[str]] = {P: [], S: [], A: []}
    for name, _ in model.named_parameters():
        groups[group_of(name, split)].append(name)
    return groups


def split_state(
    model: nn.Module, split: str = "population"
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The model's parameters as numpy arrays: (trained in rounds and uploaded: the shared and adapted groups'
    population values, personal), by :func:`group_of`."""
    shared: dict[str, np.ndarray] = {}
    personal: dict[str, np.ndarray] = {}
    for name, param in model.named_parameters():
        target = personal if group_of(name, split) == P else shared
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
