"""The federated benchmark end to end on a tiny dataset (Flower's simulation engine), and its summaries."""

from __future__ import annotations

import json

import pytest

from simulations import bench_federated, bench_upload_noise, compare_seeds
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
        "--max-len",
        "20",
    ]
    bench_federated.main(args)
    rows = [json.loads(line) for line in (tmp_path / "results" / "tiny_runs.jsonl").read_text().splitlines()]
    central, federated = rows
    assert central["stopped"] in ("patience", "max_epochs") and central["val"]["ndcg@10"] >= 0
    assert federated["key"] == f"{data}/federated/default" and federated["config"]["max_len"] == 20
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


def test_centralized_references_from_other_runs_make_the_mean_the_reference(tmp_path):
    """Centralized seeds recorded by other runs: each federated ratio and rounds-to-reach divides by their mean."""
    for name, val, test in (("central-a", 0.10, 0.08), ("central-b", 0.12, 0.10)):
        row = {"dataset": "d", "kind": "centralized", "key": "d/centralized", "val": {"ndcg@10": val}}
        row |= {"test": {"ndcg@10": test}, "epochs": 5, "stopped": "patience"}
        (tmp_path / f"{name}_runs.jsonl").write_text(json.dumps(row) + "\n")
    refs = bench_federated.centralized_references(["central-a", "central-b"], tmp_path)
    assert [r["from"] for r in refs] == ["central-a", "central-b"]
    curve = [
        {"round": 10, "val/ndcg@10": 0.089, "test/ndcg@10": 0.073},
        {"round": 20, "val/ndcg@10": 0.1, "test/ndcg@10": 0.0855},
    ]
    federated = {"dataset": "d", "kind": "federated", "variant": "default", "curve": curve}
    federated |= {"val": {"ndcg@10": 0.1}, "test": {"ndcg@10": 0.0855}, "seconds_per_round": 1.0}
    table = bench_federated.summarise([federated, *refs])
    row = next(line for line in table.splitlines() if "federated: default" in line).split(" | ")
    # mean reference: val 0.11, test 0.09 (0.0855 / 0.09 = 0.95); 80/90/95% of each: 0.088/0.099/0.1045, 0.072/0.081/0.0855
    assert row[5:8] == ["0.95", "10/20/-", "10/20/20"]
    assert "from central-b" in table
    with pytest.raises(FileNotFoundError, match="missing_runs.jsonl"):
        bench_federated.centralized_references(["missing"], tmp_path)


def _write_run(results, name, seed, val, test, kind="federated"):
    row = {
        "kind": kind,
        "variant": "v",
        "config": {"seed": seed},
        "val": {"ndcg@10": val},
        "test": {"ndcg@10": test},
        "upload_bytes_per_device": 1000.0,
    }
    with (results / f"{name}_runs.jsonl").open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def test_compare_seeds_pairs_runs_by_seed_and_reads_each_files_last_federated_row(tmp_path):
    # seed 0: base 0.04 (an older row 0.01 comes first), variant 0.03; seed 1: base 0.05, variant 0.055
    _write_run(tmp_path, "base", 0, 0.01, 0.01)
    _write_run(tmp_path, "base", 0, 0.04, 0.02)
    _write_run(tmp_path, "base", 0, 9.0, 9.0, kind="bytes")
    _write_run(tmp_path, "var", 0, 0.03, 0.02)
    _write_run(tmp_path, "base-seed1", 1, 0.05, 0.04)
    _write_run(tmp_path, "var-seed1", 1, 0.055, 0.04)
    result = compare_seeds.compare("base", "var", [0, 1], tmp_path)
    assert [r["val"]["gap"] for r in result["seeds"]] == pytest.approx([-0.25, 0.1])
    val = result["summary"]["val"]
    assert val["gap_of_means"] == pytest.approx(0.085 / 0.09 - 1)
    assert val["mean_gap"] == pytest.approx(-0.075)
    assert val["std"] == pytest.approx(0.35 / 2**0.5)
    assert val["se"] == pytest.approx(0.35 / 2)
    assert result["summary"]["test"]["gap_of_means"] == pytest.approx(0.0)
    assert "**-5.6%**" in compare_seeds.to_markdown(result)


def test_compare_seeds_refuses_missing_runs_and_unpaired_seeds(tmp_path):
    _write_run(tmp_path, "base", 0, 0.04, 0.02)
    with pytest.raises(FileNotFoundError, match="var_runs.jsonl"):
        compare_seeds.compare("base", "var", [0], tmp_path)
    _write_run(tmp_path, "var", 3, 0.04, 0.02)  # run with seed 3 under seed 0's name
    with pytest.raises(ValueError, match="seeds 0 and 3"):
        compare_seeds.compare("base", "var", [0], tmp_path)


def test_upload_noise_bench_measures_zero_for_an_exact_upload_and_more_for_a_sampled_one(
    tmp_path, monkeypatch
):
    """The upload-noise measure: output states with every row unquantized decode to the dense cohort mean
    (error ~0), sampling 40% of the other matrices' rows adds error there and not in the item tables."""
    monkeypatch.setattr(bench_upload_noise, "RESULTS", tmp_path)
    monkeypatch.setitem(
        bench_upload_noise.VARIANTS, "exact states", {"upload": "sparse", "sparse_sampling": "states"}
    )
    data = make_events(tmp_path / "events.csv", users=12)
    bench_upload_noise.main(
        [
            "--dataset",
            str(data),
            "--devices",
            "6",
            "--variants",
            "exact states",
            "default, sparse upload, output states, 40% of other rows",
            "--out",
            str(tmp_path / "stores"),
        ]
    )
    result = json.loads((tmp_path / "upload_noise.json").read_text())
    exact, sampled = (r["relative_error"] for r in result["rows"][1:])
    assert max(exact.values()) < 1e-9
    assert sampled["explanation"] > 1e-3 and sampled["item_emb"] < 1e-9
    assert "| exact states |" in (tmp_path / "upload_noise.md").read_text()
