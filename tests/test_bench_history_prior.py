"""The history-prior benchmark on a small log: every weight scored, the weight chosen on validation."""

from __future__ import annotations

from shared_model.data.split import LeaveOneOutSplit
from shared_model.training import evaluate
from simulations.bench_history_prior import KEY, WEIGHTS, _markdown, measure

from .helpers import tiny_checkpoint


def test_every_weight_is_scored_and_the_validation_best_is_reported(tmp_path):
    log, model, checkpoint = tiny_checkpoint(tmp_path)
    row = measure(str(checkpoint))
    assert set(row["val"]) == set(row["test"]) == {f"{w:g}" for w in WEIGHTS}
    assert row["val"][f"{row['chosen']:g}"] == max(row["val"].values())
    assert row["test_chosen"] == row["test"][f"{row['chosen']:g}"]
    split = LeaveOneOutSplit(log)
    model.explanation.history_prior = 0.0  # weight 0 is the ranking without the history
    assert row["test_without"] == evaluate(model, log, split, "test")[KEY]
    assert f"| `{tmp_path.name}` |" in _markdown([row])
