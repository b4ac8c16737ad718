"""The privacy benchmark's accuracy rows taken from the federated benchmark's full-length runs."""

from __future__ import annotations

import json

from simulations import bench_privacy


def _federated_row(variant: str, dataset: str = "movielens-100k", **config) -> dict:
    cfg = {"privacy": "plain", "dp_noise": 1.0, "num_rounds": 400} | config
    return {
        "dataset": dataset,
        "kind": "federated",
        "variant": variant,
        "config": cfg,
        "test": {"ndcg@10": 0.08 if cfg["privacy"] == "plain" else 0.02},
        "val": {"ndcg@10": 0.1},
        "epsilon": 16.9 if cfg["privacy"] == "dp" else None,
        "seconds_per_round": 2.5,
        "upload_bytes_per_device": 883_800,
    }


def test_federated_accuracy_maps_defaults_and_dp_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_privacy, "RESULTS", tmp_path)
    rows = [
        _federated_row("default"),
        _federated_row("default, central DP z=1, C=0.4", privacy="dp", dp_noise=1.0),
        _federated_row("server lr 2e-3"),  # another variant: not a privacy mode
        _federated_row("default", dataset="movielens-latest-small"),  # another dataset
        {"dataset": "movielens-100k", "kind": "centralized", "key": "movielens-100k/centralized"},
    ]
    (tmp_path / "fed_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    got = bench_privacy.federated_accuracy(["fed"], "movielens-100k")

    assert [r["key"] for r in got] == ["accuracy/dense", "accuracy/dp z=1"]
    dense, dp = got
    assert dense["test"]["ndcg@10"] == 0.08 and dense["epsilon"] is None
    assert dp["epsilon"] == 16.9 and dp["seconds"] == 2.5 * 400
    assert dp["source"] == "fed: default, central DP z=1, C=0.4"
    table = bench_privacy.summarise(got)
    assert "| dp z=1 | 0.0200 |" in table and "+75.0%" in table  # its cost against the defaults' run
