"""The explanation-estimator benchmark on a small log: every estimator scored, ratios to the baseline."""

from __future__ import annotations

import numpy as np

from shared_model.data import load_dataset
from shared_model.data.split import LeaveOneOutSplit
from simulations.bench_explanation_baselines import _history_counts, _markdown, evaluate

from .helpers import make_events


def test_every_estimator_is_scored_against_item_aware_popularity(tmp_path):
    result = evaluate(str(make_events(tmp_path / "events.csv", users=30, events=20)))
    rows = result["estimators"]
    assert set(rows) == {
        "item-aware popularity",
        "item-aware, attested",
        "user-aware",
        "item + user",
        "item + similar items",
        "combined",
        "history",
        "item + history",
        "ceiling: the true ids first among the attested",
    }
    assert rows["item-aware popularity"]["x_item_popularity"] == 1.0
    for row in rows.values():
        assert 0 <= row["test_ndcg@10"] <= 1 and 0 <= row["val_ndcg@10"] <= 1
        assert row["x_item_popularity"] >= 0
    assert rows["item + user"]["chosen"].startswith("item + user (w=")
    ceiling = rows["ceiling: the true ids first among the attested"]["test_ndcg@10"]
    assert all(r["test_ndcg@10"] <= ceiling + 1e-9 for k, r in rows.items() if k != "item-aware popularity")
    assert 0 <= result["test_labels_attested"] <= 1
    assert "| item-aware popularity |" in _markdown([result])


def test_history_counts_the_ids_attested_for_each_users_earlier_items(tmp_path):
    log = load_dataset(str(make_events(tmp_path / "events.csv", users=12, events=9)))
    candidates = LeaveOneOutSplit(log).explanation_candidates
    target = LeaveOneOutSplit(log).target_events("test")
    counts = _history_counts(log, candidates, target)
    for row, event in enumerate(target):
        user = np.searchsorted(log.user_ptr, event, side="right") - 1
        expected = np.zeros(len(log.vocab))
        for earlier in range(log.user_ptr[user], event):
            ids = candidates[log.item[earlier]]
            np.add.at(expected, ids[ids >= 0], 1.0)
        np.testing.assert_array_equal(counts[row], expected)
    assert counts.sum() > 0
