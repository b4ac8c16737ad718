"""Malformed input raises one clear error type naming the file and line; nothing is half-loaded."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil

import numpy as np
import pytest

from shared_model.data import DataFormatError, load_dataset, load_event_table, load_recbole_inter
from shared_model.data.amazon import load_amazon_musical_instruments
from shared_model.data.locate import embedded_dir
from shared_model.data.lrurec import load_lrurec_pickle
from shared_model.data.movielens import load_movielens_latest_small


@pytest.fixture()
def ml_copy(tmp_path):
    folder = tmp_path / "ml"
    shutil.copytree(embedded_dir("movielens-latest-small"), folder)
    return folder


def _rewrite_line(path, lineno, new):
    lines = path.read_text().splitlines()
    lines[lineno - 1] = new
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("line", "text", "error"),
    [
        (1, "userId,item,rating,timestamp", r"ratings.csv, line 1: missing column\(s\) \['movieId'\]"),
        (7, "1,abc,4.0,964982703", r"ratings.csv, line 7: movieId is not an integer: 'abc'"),
        (10, "1,3", r"line 10: expected 4 fields, found 2"),
    ],
    ids=["missing column", "non-numeric id", "wrong field count"],
)
def test_malformed_ratings_line(ml_copy, line, text, error):
    _rewrite_line(ml_copy / "ratings.csv", line, text)
    with pytest.raises(DataFormatError, match=error):
        load_movielens_latest_small(ml_copy)


@pytest.mark.parametrize("bad", ["yesterday", "-5", "nan", "inf"])
def test_bad_timestamp(ml_copy, bad):
    _rewrite_line(ml_copy / "ratings.csv", 3, f"1,3,4.0,{bad}")
    with pytest.raises(DataFormatError, match=r"ratings.csv, line 3: timestamp"):
        load_movielens_latest_small(ml_copy)


def test_truncated_gzip(tmp_path):
    records = [
        {
            "reviewerID": f"U{u}",
            "asin": f"I{i}",
            "unixReviewTime": 1_400_000_000 + 86400 * i,
            "reviewText": "works great",
        }
        for u in range(3)
        for i in range(4)
    ]
    data = gzip.compress("\n".join(map(str, records)).replace("'", '"').encode())
    target = tmp_path / "reviews_Musical_Instruments_5.json.gz"
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        DataFormatError, match=r"reviews_Musical_Instruments_5.json.gz: cannot read compressed"
    ):
        load_amazon_musical_instruments(tmp_path)


def test_bad_review_record_names_line(tmp_path):
    lines = ['{"reviewerID": "A", "asin": "B", "unixReviewTime": 1400000000}', '{"reviewerID": "A"}']
    (tmp_path / "reviews_Musical_Instruments_5.json.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    with pytest.raises(DataFormatError, match=r"line 2: bad review record"):
        load_amazon_musical_instruments(tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "dataset.pkl"
    path.write_bytes(
        pickle.dumps({"train": {1: [1, 2]}, "val": {}, "test": {}, "smap": {1: 1}, "x": _Evil()})
    )
    with pytest.raises(DataFormatError, match=r"dataset.pkl: not a plain-data pickle \(blocked global"):
        load_lrurec_pickle(path, "evil")


def test_pickle_with_numpy_array_is_refused(tmp_path):
    path = tmp_path / "dataset.pkl"
    path.write_bytes(pickle.dumps({"train": {1: np.arange(3)}, "val": {}, "test": {}, "smap": {}}))
    with pytest.raises(DataFormatError, match="blocked global"):
        load_lrurec_pickle(path, "np")


@pytest.mark.parametrize(
    "payload,message",
    [
        ([1, 2, 3], "expected a dict"),
        ({"train": {1: [5]}, "val": {}, "test": {}, "smap": {1: 1}}, "item 5 is not in smap"),
        (
            {"train": {1: [1]}, "val": {2: [1]}, "test": {}, "smap": {1: 1}},
            "users in val/test but not in train",
        ),
    ],
)
def test_pickle_with_wrong_structure(tmp_path, payload, message):
    path = tmp_path / "dataset.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(DataFormatError, match=message):
        load_lrurec_pickle(path, "bad")


def test_truncated_pickle(tmp_path):
    path = tmp_path / "dataset.pkl"
    path.write_bytes(pickle.dumps({"train": {1: [1, 2, 3]}, "smap": {1: 1}})[:-7])
    with pytest.raises(DataFormatError, match="not a plain-data pickle"):
        load_lrurec_pickle(path, "cut")


def test_recbole_inter_roundtrip_and_errors(tmp_path):
    path = tmp_path / "mine.inter"
    path.write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\ta\t5\t20\nu1\tb\t3\t10\nu2\ta\t1\t5\n"
    )
    log = load_recbole_inter(path)
    assert (log.num_users, log.num_items, log.num_events) == (2, 2, 3)
    assert list(log.item_ids[log.user_items(0)]) == ["b", "a"]  # sorted by time
    path.write_text("user_id:token\ttimestamp:float\nu1\t20\n")
    with pytest.raises(DataFormatError, match="missing column item_id"):
        load_recbole_inter(path)


def test_csv_and_parquet_event_tables(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {
        "user": [1, 1, 2],
        "item": [10, 11, 10],
        "timestamp": [5, 3, 7],
        "explanation": ["cheap|fast", "", "fast"],
    }
    csv = tmp_path / "events.csv"
    csv.write_text(
        "user,item,timestamp,explanation\n"
        + "".join(f"{u},{i},{t},{e}\n" for u, i, t, e in zip(*rows.values(), strict=True))
    )
    pq.write_table(pa.table(rows), tmp_path / "events.parquet")
    for path in (csv, tmp_path / "events.parquet"):
        log = load_event_table(path)
        assert log.vocab.texts == ("cheap", "fast")
        assert [log.explanations.row(e).tolist() for e in range(3)] == [
            [],
            [0, 1],
            [1],
        ]  # user 1 sorted by time
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataFormatError, match="broken.parquet: cannot read Parquet"):
        load_event_table(tmp_path / "broken.parquet")
    csv.write_text("user,item,timestamp\n1,10,soon\n")
    with pytest.raises(DataFormatError, match=r"events.csv, line 2: timestamp is not a number"):
        load_event_table(csv)


def test_event_table_edge_cases(tmp_path, caplog):
    """BOM, header-only, missing file, millisecond timestamps, exact repeats, a Parquet list column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv = tmp_path / "events.csv"
    csv.write_bytes("\ufeffuser,item,timestamp\n1,10,5\n1,11,6\n".encode())  # a spreadsheet's BOM
    assert load_event_table(csv).num_events == 2
    csv.write_text("user,item,timestamp\n")
    with pytest.raises(DataFormatError, match=r"events.csv: no events \(a header and no rows\)"):
        load_event_table(csv)
    for missing in (tmp_path / "nope.csv", tmp_path / "nope.parquet", tmp_path / "nope.inter"):
        with pytest.raises(DataFormatError, match="file not found"):
            load_dataset(str(missing))  # a path, not "unknown dataset"
    csv.write_text("user,item,timestamp\n1,10,1700000000000\n")
    with pytest.raises(DataFormatError, match=r"line 2: timestamp out of range .*milliseconds\?"):
        load_event_table(csv)
    csv.write_text("user,item,timestamp,explanation\n1,10,5,a\n1,10,5,b\n1,10,6,c\n2,10,5,d\n")
    log = load_event_table(csv)  # the repeat of (1, 10, 5) counts once: its first row is kept
    assert log.num_events == 3 and "1 repeated events" in caplog.text
    assert [log.vocab.texts[k] for e in range(3) for k in log.explanations.row(e)] == ["a", "c", "d"]
    rows = {"user": [1, 1], "item": [10, 11], "timestamp": [5, 6], "explanation": [["cheap", "fast"], []]}
    pq.write_table(pa.table(rows), tmp_path / "lists.parquet")
    log = load_event_table(tmp_path / "lists.parquet")
    assert log.vocab.texts == ("cheap", "fast") and log.explanations.row(0).tolist() == [0, 1]
    assert log.explanations.row(1).tolist() == []
