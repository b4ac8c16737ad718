"""The tmepsr command line: data list and data stats."""

from __future__ import annotations

import json

from simulations.cli import main


def test_data_stats_embedded_default(capsys):
    assert main(["data", "stats", "movielens-latest-small"]) == 0
    out = capsys.readouterr().out
    assert "610 / 9,724 / 100,836" in out and "1996-03-29" in out and "explanation vocabulary" in out


def test_data_stats_json(capsys):
    assert main(["data", "stats", "movielens-latest-small", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["sequence_length"]["min"] == 20 and stats["sequence_length"]["max"] == 2698
    assert stats["eval_users"] == 610


def test_data_list_names_every_dataset(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("movielens-latest-small", "movielens-1m-lrurec", "amazon-musical-instruments-5core"):
        assert name in out


def test_own_file_and_errors(tmp_path, capsys):
    path = tmp_path / "mine.csv"
    path.write_text("user,item,timestamp\n1,a,10\n1,b,20\n1,c,30\n")
    assert main(["data", "stats", str(path)]) == 0
    assert "1 / 3 / 3" in capsys.readouterr().out
    path.write_text("user,item,timestamp\n1,a,later\n")
    assert main(["data", "stats", str(path)]) == 2
    assert "mine.csv, line 2: timestamp is not a number" in capsys.readouterr().err
    assert main(["data", "stats", "nope"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
