"""The accuracy harness: model specs with overrides, converged-only means, the tuned baseline, run locks."""

from __future__ import annotations

import os

import pytest

from simulations import bench_accuracy
from simulations.bench_accuracy import _append_run, _claim, _header, _load_runs, parse_model, summarise


def test_parse_model_splits_model_and_training_overrides():
    assert parse_model("sasrec") == ("sasrec", {}, {})
    assert parse_model("lrurec[lr=0.002,dropout=0.1,num_blocks=3]") == (
        "lrurec",
        {"dropout": 0.1, "num_blocks": 3},
        {"lr": 0.002},
    )
    with pytest.raises(ValueError, match="neither"):
        parse_model("sasrec[bogus=1]")


def _run(model, seed, ndcg, val, stopped="patience"):
    return {
        "dataset": "d",
        "model": model,
        "seed": seed,
        "parameters": 1,
        "best_epoch": 3,
        "stopped": stopped,
        "seconds": 60.0,
        "test": {"ndcg@10": ndcg},
        "val": {"ndcg@10": val},
    }


def test_summary_averages_converged_runs_only_and_compares_with_the_tuned_sasrec():
    runs = [
        _run("tmepsr", 0, 0.10, 0.2),
        _run("tmepsr", 1, 0.12, 0.2),
        _run("tmepsr", 2, 0.50, 0.9, "budget"),
        _run("sasrec", 0, 0.05, 0.1),
        _run("sasrec[lr=0.002]", 0, 0.08, 0.15),
        _run("gru4rec", 0, 0.04, 0.1, "max_epochs"),
    ]
    rows = {r["model"]: r for r in summarise(runs)}
    assert rows["tmepsr"]["seeds"] == 2 and rows["tmepsr"]["ndcg@10"] == pytest.approx(0.11)
    assert rows["sasrec[lr=0.002]"]["tuned"] and not rows["sasrec"]["tuned"]
    assert rows["tmepsr"]["ndcg@10_vs_sasrec"] == pytest.approx(0.11 / 0.08)
    assert "ndcg@10" not in rows["gru4rec"] and rows["gru4rec"]["seeds"] == 0


def test_a_run_is_claimed_once_and_a_dead_workers_lock_is_taken_over(tmp_path):
    lock = tmp_path / "run.lock"
    assert _claim(lock) and lock.read_text() == str(os.getpid())
    assert not _claim(lock)  # held by a live process (this one)
    lock.write_text("999999999")  # no such process
    assert _claim(lock)


def test_a_datasets_stopping_rule_overrides_the_command_line_default(tmp_path, monkeypatch):
    """Latest-small and the Amazon sets train with a longer patience while --patience defaults to 10."""
    calls = []

    def fake_train(dataset, preset, folder, **kwargs):
        calls.append(kwargs)
        return {"dataset": dataset, "test": {"ndcg@10": 0.1}, "stopped": "patience", "best_epoch": 1}

    monkeypatch.setattr(bench_accuracy, "train_and_report", fake_train)
    monkeypatch.setattr(bench_accuracy, "RESULTS", tmp_path)
    monkeypatch.setattr(bench_accuracy, "_write_summary", lambda *a: None)
    common = ["--models", "sasrec", "--seeds", "0", "--state-dir", str(tmp_path / "state")]
    bench_accuracy.main(["--datasets", "amazon-musical-instruments-5core", *common])
    bench_accuracy.main(["--datasets", "movielens-100k", "--patience", "12", *common])
    assert calls[0]["patience"] == 30 and calls[0]["max_epochs"] == 500 and calls[0]["batch_size"] == 64
    assert calls[1]["patience"] == 12


def test_header_states_what_the_runs_recorded_not_the_reporting_command():
    def trained(dataset, patience, threads=None):
        run = {"dataset": dataset, "train_config": {"patience": patience, "device": "cpu"}}
        return run | ({"torch_threads": threads} if threads else {})

    runs = [
        trained("a", 30, 1),
        trained("a", 30, 2),
        trained("b", 10),
        {"dataset": "b", "model": "popularity"},
    ]
    header = _header("s", runs)
    assert "patience in evaluations: a 30, b 10;" in header
    assert "device: cpu (3 runs)" in header
    assert "torch threads per run: 1 (1 run), 2 (1 run), not recorded (1 run)." in header


def test_runs_file_appends_gzip_members_that_read_back_in_order(tmp_path):
    path = tmp_path / "suite_runs.jsonl.gz"
    assert _load_runs(path) == []
    runs = [{"dataset": "a", "seed": 0, "history": [{"epoch": 1}]}, {"dataset": "a", "seed": 1, "x": 0.5}]
    for run in runs:
        _append_run(path, run)
    assert _load_runs(path) == runs
