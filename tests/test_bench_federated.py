"""The federated benchmark end to end on a tiny dataset (Flower's simulation engine), and its summaries."""

from __future__ import annotations

import json

import pytest

from simulations import bench_federated
from simulations.bench_federated import rounds_to_reach

from .helpers import make_events


def test_rounds_to_reach_reads_the_first_round_past_each_share():
    curve = [
        {"round": 10, "val/ndcg@10": 0.05},
        {"round": 20, "val/ndcg@10": 0.091},
        {"round": 30, "val/ndcg@10": 0.0955},
    ]
    assert rounds_to_reach(curve, 0.1, "val") == {"80%": 20, "90%": 20, "95%": 30}
    assert rounds_to_reach(curve, 0.2, "val") == {"80%": None, "90%": None, "95%": None}


@pytest.mark.slow
def test_benchmark_records_converged_centralized_curves_and_paired_personalization(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_federated, "RESULTS", tmp_path / "results")
    data = make_events(tmp_path / "events.csv", users=12)
    args = [
        "--datasets",
        str(data),
        "--rounds",
        "2",
        "--eval-every",
        "1",
        "--variants",
        "default",
        "--parts",
        "centralized",
        "federated",
        "--name",
        "tiny",
        "--out",
        str(tmp_path / "runs"),
        "--cpus",
        "2",
    ]
    bench_federated.main(args)
    rows = [json.loads(line) for line in (tmp_path / "results" / "tiny_runs.jsonl").read_text().splitlines()]
    central, federated = rows
    assert central["stopped"] in ("patience", "max_epochs") and central["val"]["ndcg@10"] >= 0
    assert federated["key"] == f"{data}/federated/default"
    assert [c["round"] for c in federated["curve"]] == [1, 2]  # validation and test at every evaluation
    assert all("val/ndcg@10" in c and "test/ndcg@10" in c for c in federated["curve"])
    assert federated["seconds_per_round"] > 0
    pers = federated["personalization"]  # the final round: gated adaptation vs population values, paired
    assert 0 <= pers["kept"] <= 1 and pers["test/population"] >= 0
    table = (tmp_path / "results" / "tiny.md").read_text()
    assert "federated: default" in table and "centralized (" in table
    bench_federated.main(args)  # everything recorded: nothing runs again
    assert len((tmp_path / "results" / "tiny_runs.jsonl").read_text().splitlines()) == 2
    # the final model re-evaluated in-process gives what the Flower run's final evaluation reported
    bench_federated.main(
        [*args[: args.index("--parts")], "--parts", "personalization", *args[args.index("--name") :]]
    )
    again = json.loads((tmp_path / "results" / "tiny_runs.jsonl").read_text().splitlines()[-1])
    assert again["kind"] == "personalization" and again["round"] == 2
    assert again["personalization"].keys() == pers.keys()
    assert all(again["personalization"][k] == pytest.approx(v, rel=1e-6, abs=1e-9) for k, v in pers.items())
