"""Every loader reproduces its PROVENANCE.md counts and the canonical event order."""

from __future__ import annotations

import numpy as np
import pytest

from shared_model.data import DATASETS, InteractionLog, load_dataset
from shared_model.data.readers import load_plain_pickle
from shared_model.data.split import LeaveOneOutSplit
from shared_model.data.stats import log_stats

from .conftest import require_dataset


def _assert_canonical(log: InteractionLog) -> None:
    assert np.all(np.diff(log.user) >= 0), "events must be grouped by user in ascending order"
    same_user = log.user[1:] == log.user[:-1]
    if log.time_unit == "order":
        assert np.all(np.diff(log.time)[same_user] == 1)
    else:
        dt = np.diff(log.time)[same_user]
        di = np.diff(log.item)[same_user]
        assert np.all((dt > 0) | ((dt == 0) & (di >= 0))), "events must be sorted by (timestamp, item id)"


@pytest.mark.parametrize("name", list(DATASETS))
def test_counts_match_provenance(shared_data, name):
    require_dataset(shared_data, name)
    log = load_dataset(name, shared_data)
    assert (log.num_users, log.num_items, log.num_events) == DATASETS[name].expected
    _assert_canonical(log)
    assert len(log.explanations) == log.num_events


def test_embedded_default_loads_without_shared_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TMEPSR_DATA_DIR", str(tmp_path / "nowhere"))
    log = load_dataset("movielens-latest-small")
    assert (log.num_users, log.num_items, log.num_events) == (610, 9724, 100836)
    _assert_canonical(log)
    assert log.item_meta.titles[int(np.searchsorted(log.item_ids, 1))] == "Toy Story (1995)"
    assert (log.explanations.lengths() > 0).mean() > 0.999  # a few movies list no genre
    tagged = [t for t in log.vocab.texts if t.startswith("tag: ")]
    assert len(tagged) > 100 and "Drama" in log.vocab.texts


def test_unknown_or_absent_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(KeyError, match="unknown dataset"):
        load_dataset("no-such-data")
    with pytest.raises(FileNotFoundError, match="movielens-100k"):
        load_dataset("movielens-100k", tmp_path)


def test_ml100k_ties_on_last_two_events(shared_data):
    """415 of 943 ML-100k users have their last two events in the same second."""
    require_dataset(shared_data, "movielens-100k")
    stats = log_stats(load_dataset("movielens-100k", shared_data))
    assert stats["eval_users_last_two_tied"] == 415
    assert stats["time_span"][0].startswith("1997-09-20") and stats["time_span"][1].startswith("1998-04-22")


@pytest.mark.parametrize(
    "name,eval_users",
    [
        ("movielens-1m-lrurec", 6040),
        ("amazon-beauty-sasrec-lrurec", 50498),
        ("amazon-video-games-sasrec-lrurec", 30901),
    ],
)
def test_lrurec_split_reproduced(shared_data, name, eval_users):
    """Our leave-one-out split gives exactly LRURec's val/test items and keeps the given order."""
    folder = require_dataset(shared_data, name)
    log = load_dataset(name, shared_data)
    split = LeaveOneOutSplit(log)
    assert len(split.eval_users) == eval_users
    raw = load_plain_pickle(folder / "dataset.pkl")
    dense_of_source = {s: d for s, d in raw["smap"].items()}
    for u in split.eval_users[:: max(1, len(split.eval_users) // 200)]:
        src_user = log.user_ids[u]
        items = [dense_of_source[s] for s in log.item_ids[log.user_items(u)]]
        assert items == raw["train"][src_user] + raw["val"][src_user] + raw["test"][src_user]
        assert items[-1] == raw["test"][src_user][0] and items[-2] == raw["val"][src_user][0]


def test_ml1m_genres_joined_through_smap(shared_data):
    require_dataset(shared_data, "movielens-1m-lrurec")
    log = load_dataset("movielens-1m-lrurec", shared_data)
    toy = int(np.searchsorted(log.item_ids, 1))
    assert log.item_ids[toy] == 1 and log.item_meta.titles[toy] == "Toy Story (1995)"
    names = {log.item_meta.attribute_names[a] for a in log.item_meta.attributes.row(toy)}
    assert names == {"Animation", "Children's", "Comedy"}


def test_beauty_5core_attributes_and_times(shared_data):
    """PROVENANCE examples: item 1 is OPI nail polish; timestamps are whole days in 2002-06-12..2014-07-23."""
    require_dataset(shared_data, "amazon-beauty-5core")
    log = load_dataset("amazon-beauty-5core", shared_data)
    item1 = int(np.searchsorted(log.item_ids, 1))
    assert log.item_meta.titles[item1] == "B004756YJA"
    names = {log.item_meta.attribute_names[a] for a in log.item_meta.attributes.row(item1)}
    assert names == {"OPI", "Makeup", "Nails", "Nail Polish"}
    assert np.all(log.time % 86400 == 0)
    assert len(log.vocab) == 637


def test_musical_instruments_review_phrases(shared_data):
    require_dataset(shared_data, "amazon-musical-instruments-5core")
    log = load_dataset("amazon-musical-instruments-5core", shared_data)
    coverage = (log.explanations.lengths() > 0).mean()
    assert 500 <= len(log.vocab) <= 5000 and coverage > 0.9
    assert "works great" in log.vocab.texts
    assert log.explanations.lengths().max() <= 3
