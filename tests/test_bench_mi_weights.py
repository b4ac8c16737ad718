"""The MI-weights benchmark on a small log: the weigher's spread, the weights chosen on validation, and the
ranking "as trained" equal to evaluation's shown-explanation NDCG@10."""

from __future__ import annotations

from shared_model.data.split import LeaveOneOutSplit
from shared_model.training import evaluate
from simulations.bench_mi_weights import SIGNALS, _markdown, measure

from .helpers import tiny_checkpoint


def test_weights_are_chosen_on_validation_and_as_trained_matches_evaluation(tmp_path):
    log, model, checkpoint = tiny_checkpoint(tmp_path)
    row = measure(str(checkpoint))
    split = LeaveOneOutSplit(log)
    for stage in ("val", "test"):
        assert row["model_as_trained"][stage] == evaluate(model, log, split, stage)["expl_attested_ndcg@10"]
    assert row["s_rec_std"] >= 0 and -1 <= row["corr_s_rec_log_nce"] <= 1
    for signal in SIGNALS:
        chosen, fixed = row[signal]["chosen"], row[signal]["fixed"]
        assert chosen["val"] >= fixed["val"]  # the fixed weights are part of the grid
    assert _markdown([row]).splitlines()[-1].startswith(f"| {log.name} | ")
