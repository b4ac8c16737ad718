"""Explanation vocabularies: the three labelling rules and the attested table on hand-made data."""

from __future__ import annotations

import numpy as np
import torch

from shared_model.data import InteractionLog, ItemMeta, Ragged
from shared_model.data.explanations import (
    attested_explanations,
    history_matched_labels,
    mine_review_phrases,
    review_phrases,
    tag_or_genre_labels,
)
from shared_model.explanation import ExplanationBranch, attested_only, history_counts

NAMES = ("Drama", "Comedy", "Noir")
# item 0: Drama+Comedy, item 1: Comedy, item 2: Drama+Noir, item 3: no attribute
ATTRS = Ragged.from_lists([[0, 1], [1], [0, 2], []])


def _log() -> InteractionLog:
    # user 0 watches items 1, 1?, 0, 2, 3 in time order
    return InteractionLog.from_events(
        "t", [0, 0, 0, 0], [1, 0, 2, 3], [1, 2, 3, 4], "seconds", item_universe=[0, 1, 2, 3]
    )


def test_history_matched_is_causal_and_prefers_specific():
    log = history_matched_labels(_log(), ATTRS, NAMES, "genre")
    labels = [log.explanations.row(e).tolist() for e in range(4)]
    # event 0 (item 1): only Comedy. event 1 (item 0): Comedy seen once before -> Comedy.
    # event 2 (item 2): Drama seen once, Noir never -> Drama. event 3 (item 3): no attribute -> no label.
    assert labels == [[1], [1], [0], []]
    assert "earlier events" in log.vocab.rule and log.vocab.texts == NAMES


def test_first_event_tie_goes_to_the_rarer_attribute():
    log = InteractionLog.from_events("t", [0], [2], [1], "seconds", item_universe=[0, 1, 2, 3])
    assert history_matched_labels(log, ATTRS, NAMES, "genre").explanations.row(0).tolist() == [2]  # Noir


def test_user_tags_win_over_genres():
    tags = {(0, 0): ["Funny ", "funny"], (0, 2): ["rare tag"]}
    tags_other = {(5, 0): ["FUNNY"]}  # a second (user, item) pair makes 'funny' frequent enough
    log = tag_or_genre_labels(_log(), ATTRS, NAMES, {**tags, **tags_other}, min_pairs=2)
    assert log.vocab.texts == (*NAMES, "tag: funny")
    labels = [log.explanations.row(e).tolist() for e in range(4)]
    assert labels == [[1], [3], [0], []]  # item 0 -> its tag; 'rare tag' is below min_pairs -> genre


def test_review_phrases_group_near_duplicates():
    assert ("great", "sound") in review_phrases("Great sound! The strings are ok.")
    assert ("the", "strings") not in review_phrases("The strings")  # starts with a stopword
    users = ["a", "b", "c", "d"]
    texts = ["Great sound. Cheap case", "great sounds!", "GREAT SOUND, works", "nothing here"]
    vocab, labels = mine_review_phrases(users, texts, min_users=3)
    assert vocab.texts == ("great sound",)
    assert labels == [[0], [0], [0], []]
    assert "coverage 3/4" in vocab.rule


def test_attested_explanations_list_what_applies_to_each_item():
    """Labels of the given (training) events first, most used first; then the item's attributes that are
    vocabulary texts; nothing from events left out; -1 padding; the width keeps the most used."""
    meta = ItemMeta(attribute_names=NAMES, attributes=ATTRS)
    log = InteractionLog.from_events(
        "t", [0, 0, 0, 0], [1, 0, 2, 3], [1, 2, 3, 4], "seconds", item_universe=[0, 1, 2, 3], item_meta=meta
    )
    log = tag_or_genre_labels(log, ATTRS, NAMES, {(0, 0): ["funny"], (5, 0): ["funny"], (0, 3): ["funny"]})
    assert [log.explanations.row(e).tolist() for e in range(4)] == [[1], [3], [0], [3]]
    table = attested_explanations(log, np.array([0, 1, 2]))  # event 3 (item 3 tagged funny) is held out
    assert table.shape == (4, 32) and table.dtype == np.int64
    assert [row[row >= 0].tolist() for row in table] == [[3, 0, 1], [1], [0, 2], []]
    assert attested_explanations(log, np.array([0, 1, 2]), width=2)[0].tolist() == [3, 0]


def test_shown_explanations_are_attested_ids_with_the_rank_prior():
    scores = torch.tensor([[0.0, 3.0, 1.0, 2.0, 5.0]])
    candidates = torch.tensor([[2, 0, 3, -1]])  # id 4 is not attested: never shown despite its score
    plain = attested_only(scores, candidates)
    assert plain[0, 4] == -torch.inf and plain[0, 1] == -torch.inf
    assert torch.equal(plain[0, [0, 2, 3]], scores[0, [0, 2, 3]])
    assert ExplanationBranch(8, 5).shown_top(scores, candidates, 4).tolist() == [[3, 2, 0, -1]]  # by score
    prior = attested_only(scores, candidates, rank_prior=2.0)
    expected = scores[0, [2, 0, 3]] - 2.0 * torch.log1p(torch.arange(3.0))
    assert torch.allclose(prior[0, [2, 0, 3]], expected)
    # a strong prior shows the table's order (most used on the item first)
    assert ExplanationBranch(8, 5, rank_prior=100.0).shown_top(scores, candidates, 3).tolist() == [[2, 0, 3]]


def test_history_counts_count_each_id_over_a_users_items():
    ids = torch.tensor([[[0, 2, -1], [2, -1, -1]], [[-1, -1, -1], [1, -1, -1]]])  # (users, events, widest)
    assert history_counts(ids, 4).tolist() == [[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    events = torch.tensor([[True, False], [True, True]])  # the second user's first event, the first's second
    assert history_counts(ids, 4, events).tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]


def test_the_history_prior_shows_the_attested_id_the_user_meets_most():
    scores = torch.tensor([[0.0, 3.0, 1.0, 2.0, 5.0]])
    candidates = torch.tensor([[2, 0, 3, -1]])
    history = torch.tensor([[20.0, 50.0, 0.0, 0.0, 99.0]])  # ids 1 and 4 are not attested for this item
    branch = ExplanationBranch(8, 5, rank_prior=2.0, history_prior=1.0)
    bonus = branch.history_bonus(history)
    shown = branch.shown_scores(scores, candidates, bonus)
    assert torch.allclose(shown, attested_only(scores, candidates, 2.0) + torch.log1p(history))
    assert branch.shown_top(scores, candidates, 3, bonus).tolist() == [[0, 2, 3]]  # id 0 moves up
    assert (
        branch.shown_top(scores, candidates, 3).tolist()
        == ExplanationBranch(8, 5, rank_prior=2.0).shown_top(scores, candidates, 3).tolist()
    )  # without a history: the rank prior alone


def test_mi_weights_per_user_global_or_fixed():
    """The per-user weigher gives each state its own log-variances; the global control one learned pair for
    every row (which the MI loss trains); fixed weighting zeros."""
    torch.manual_seed(0)
    state = torch.randn(6, 8)
    per_user = ExplanationBranch(8, 5).mi_weights(state)
    assert per_user.shape == (6, 2) and not torch.allclose(per_user[0], per_user[1])
    branch = ExplanationBranch(8, 5, per_user=False)
    assert branch.weigher is None and torch.equal(branch.mi_weights(state), torch.zeros(6, 2))
    rows, ids, weights = torch.arange(6), torch.randint(0, 5, (6,)), torch.ones(6)
    items = torch.arange(6)
    branch.mi_loss(state, torch.randn(6, 8), torch.randn(6, 8), items, rows, ids, weights).backward()
    assert branch.log_variances.grad is not None and branch.log_variances.grad.abs().min() > 0
    fixed = ExplanationBranch(8, 5, dynamic=False)
    assert fixed.weigher is None and fixed.log_variances is None
    assert torch.equal(fixed.mi_weights(state), torch.zeros(6, 2))
