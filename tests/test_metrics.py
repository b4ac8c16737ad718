"""Full-ranking metrics: hand-computed cases (ties, masking, multi-label) and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from shared_model.data.log import Ragged
from shared_model.metrics import multilabel_metrics, ranking_metrics, target_ranks


def test_hand_computed_ranks_and_metrics():
    scores = np.array(
        [
            [0.9, 0.1, 0.5, 0.3],  # target 2: only item 0 above -> rank 1
            [0.2, 0.8, 0.8, 0.1],  # target 1 tied with item 2 -> pessimistic rank 1
            [0.1, 0.9, 0.8, 0.7],  # target 3, items 1 and 2 in history (masked) -> rank 0
        ]
    )
    history = Ragged.from_lists([[], [], [1, 2]])
    ranks = target_ranks(scores, np.array([2, 1, 3]), history)
    assert ranks.tolist() == [1, 1, 0]
    m = ranking_metrics(ranks, ks=(1, 2))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(1.0)
    assert m["ndcg@2"] == pytest.approx((2 / math.log2(3) + 1) / 3)
    assert m["mrr"] == pytest.approx((0.5 + 0.5 + 1) / 3)


def test_history_never_masks_the_target_and_constant_scores_get_no_credit():
    scores = np.zeros((1, 5))
    assert target_ranks(scores, np.array([3]), Ragged.from_lists([[3, 4]])).tolist() == [3]
    assert ranking_metrics(target_ranks(scores, np.array([0])), ks=(1,))["recall@1"] == 0.0


def test_multilabel_hand_computed():
    scores = np.array([[0.5, 0.4, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 0.0, 0.0]])
    targets = Ragged.from_lists([[0, 2], [0], []])  # third row has no label: skipped
    m = multilabel_metrics(scores, targets, ks=(2,))
    assert m["rows"] == 2
    assert m["recall@2"] == pytest.approx((0.5 + 0.0) / 2)
    idcg = 1 + 1 / math.log2(3)
    assert m["ndcg@2"] == pytest.approx((1 / idcg + 0) / 2)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="outside"):
        target_ranks(np.zeros((1, 2)), np.array([2]))
    with pytest.raises(ValueError, match="2-D"):
        target_ranks(np.zeros(3), np.array([0]))


def _brute_rank(row: np.ndarray, target: int, masked: set[int]) -> int:
    return sum(1 for j, s in enumerate(row) if j != target and j not in masked and s >= row[target])


@given(
    arrays(
        np.float32, st.tuples(st.integers(1, 8), st.integers(2, 30)), elements=st.integers(0, 5).map(float)
    ),
    st.data(),
)
@settings(max_examples=80, deadline=None)
def test_ranks_match_brute_force_and_metrics_are_bounded(scores, data):
    b, n = scores.shape
    targets = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=b, max_size=b)))
    hist = [data.draw(st.lists(st.integers(0, n - 1), max_size=n)) for _ in range(b)]
    ranks = target_ranks(scores, targets, Ragged.from_lists(hist))
    assert ranks.tolist() == [
        _brute_rank(scores[i], targets[i], set(hist[i]) - {targets[i]}) for i in range(b)
    ]
    m = ranking_metrics(ranks, ks=(1, 5, 10))
    assert all(0.0 <= v <= 1.0 for v in m.values())
    assert m["recall@1"] <= m["recall@5"] <= m["recall@10"]
    assert m["ndcg@10"] <= m["recall@10"] + 1e-12
    # a permutation of the candidates does not change ranks
    perm = np.random.default_rng(0).permutation(n)
    inv = np.argsort(perm)
    permuted = target_ranks(scores[:, perm], inv[targets], Ragged.from_lists([inv[h].tolist() for h in hist]))
    assert np.array_equal(permuted, ranks)


@given(
    arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(3, 20)), elements=st.floats(-3, 3)),
    st.data(),
)
@settings(max_examples=60, deadline=None)
def test_multilabel_bounds_and_single_label_agreement(scores, data):
    b, n = scores.shape
    rows = [data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4, unique=True)) for _ in range(b)]
    m = multilabel_metrics(scores, Ragged.from_lists(rows), ks=(1, 3))
    assert 0 <= m["recall@1"] <= m["recall@3"] <= 1 and 0 <= m["ndcg@3"] <= 1 + 1e-12
    single = [r[:1] for r in rows]
    one = multilabel_metrics(scores, Ragged.from_lists(single), ks=(3,))
    ref = ranking_metrics(target_ranks(scores, np.array([r[0] for r in single])), ks=(3,))
    assert one["recall@3"] == pytest.approx(ref["recall@3"]) and one["ndcg@3"] == pytest.approx(ref["ndcg@3"])
