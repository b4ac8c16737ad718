"""The single table saying which parameters are personal (stay on the device) and which are shared.

Rows are the models' top-level modules; columns are named splits. ``card`` is the product card's split
(DESIGN section 3); the others are configurations compared in the federated benchmarks.
"""

from __future__ import annotations

from typing import Literal

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
    "interests": (P, S, S),  # interest-head projections and mixture gate
    "position": (P, S, S),  # SASRec baseline: positions, attention blocks, final norm
    "blocks": (P, S, S),
    "final_ln": (P, S, S),
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
