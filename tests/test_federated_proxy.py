"""The central stand-in of the federated optimizer: deterministic per seed, and its table's ratios."""

from __future__ import annotations

import numpy as np
import pytest

import simulations.federated_proxy as proxy
from simulations.federated_proxy import _cohort, custom_variant, run, summarise


def _row(variant: str, seed: int, val: float, test: float) -> dict:
    return {
        "dataset": "d",
        "variant": variant,
        "seed": seed,
        "steps": 400,
        "val": {"ndcg@10": val},
        "test": {"ndcg@10": test},
    }


def test_table_divides_by_the_default_on_the_same_seeds_and_by_the_centralized_mean():
    rows = [
        _row("default", 0, 0.10, 0.08),
        _row("default", 1, 0.12, 0.10),
        _row("default", 2, 0.50, 0.50),  # a seed the variant lacks: left out of its ratio
        _row("wider", 0, 0.11, 0.09),
        _row("wider", 1, 0.11, 0.09),
    ]
    table = summarise(rows, {"val": 0.2, "test": 0.1}).splitlines()
    wider = next(line for line in table if "| wider |" in line)
    assert "| 2 | 0.1100 (0.0000) | 0.0900 (0.0000) | 1.000 / 1.000 | 0.550 / 0.900 |" in wider
    default = next(line for line in table if "| default |" in line)
    assert "| 3 |" in default and "| - |" in default


def test_node_cohorts_take_whole_nodes_and_independent_cohorts_single_users():
    users = np.arange(100)
    nodes = [users[i : i + 10] for i in range(0, 100, 10)]
    rng = np.random.default_rng(0)
    for _ in range(20):
        picked = _cohort(rng, users, 3, nodes)
        groups = {int(u) // 10 for u in picked}
        assert len(groups) == 3 and len(picked) == 30  # every user of three nodes
        assert sorted(picked.tolist()) == sorted(u for g in groups for u in range(10 * g, 10 * g + 10))
    single = _cohort(rng, users, 30, None)
    assert len(set(single.tolist())) == 30


@pytest.mark.parametrize(
    "variant", ["explanation-warm-up-100", "centralized-adamw", "per-user-loss", "node-cohorts"]
)
def test_a_run_is_deterministic_per_seed(variant):
    """(The variants that change the loop: loss weights as it goes, the optimizer, one loss per user, cohorts
    by node.)"""
    first = run("movielens-latest-small", variant, seed=3, steps=2, eval_every=1)
    again = run("movielens-latest-small", variant, seed=3, steps=2, eval_every=1)
    assert [p["step"] for p in first["curve"]] == [1, 2]
    assert first["val"] == again["val"] and first["test"] == again["test"]
    assert first["curve"][-1]["val_ndcg@10"] == first["val"]["ndcg@10"]


def test_a_custom_variant_sends_each_setting_to_its_config_and_refuses_unknown_ones():
    name, spec = custom_variant({"server_lr": 0.006, "dropout": 0.1, "max_len": 100})
    assert name == 'set {"dropout": 0.1, "max_len": 100, "server_lr": 0.006}'
    assert spec == {"federated": {"server_lr": 0.006, "max_len": 100}, "model": {"dropout": 0.1}}
    with pytest.raises(ValueError, match="servr_lr"):
        custom_variant({"servr_lr": 0.006})
    for ignored in ("local_lr", "upload", "seed", "num_rounds"):  # not acted on, or set by the flags
        with pytest.raises(ValueError, match=ignored):
            custom_variant({ignored: 1})


def test_a_custom_variant_runs_its_settings(monkeypatch):
    built, original = [], proxy.model_for_run

    def spy(fed, log, **overrides):
        model = original(fed, log, **overrides)
        built.append(model.cfg)
        return model

    monkeypatch.setattr(proxy, "model_for_run", spy)
    _, spec = custom_variant({"dropout": 0.0, "max_len": 20})
    row = proxy.run("movielens-latest-small", "custom", seed=3, steps=1, eval_every=1, spec=spec)
    assert row["spec"] == spec and row["steps"] == 1 and row["val"]["ndcg@10"] > 0
    assert built[0].dropout == 0.0 and built[0].max_len == 20
