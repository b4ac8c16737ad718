"""The tmepsr command line: data list and stats, simulate, keys, export, recommend."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simulations.cli import main


def test_building_the_parser_loads_neither_torch_nor_flower():
    """Each layer's commands import what they drive only when they run: ``tmepsr --help`` stays light."""
    code = (
        "import sys\n"
        "from simulations.cli import build_parser\n"
        "build_parser().format_help()\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'flwr', 'onnxruntime'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


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


@pytest.mark.slow
def test_simulate_export_recommend_end_to_end(tmp_path, capfd, monkeypatch):
    """The main job's shape on a small file: simulate (Flower) -> signed bundle -> on-device recommendation;
    then the release path: tmepsr keys -> tmepsr export of the run -> tmepsr recommend through the runtime."""
    from shared_model.protocol.bundle import load_public_key, verify_bundle

    from .helpers import make_events

    data = make_events(tmp_path / "events.csv", users=4)
    run = tmp_path / "run"
    assert (
        main(
            [
                "simulate",
                "--dataset",
                str(data),
                "--num-rounds",
                "1",
                "--fraction-train",
                "1.0",
                "--max-len",
                "16",
                "--d-model",
                "16",
                "--local-epochs",
                "1",
                "--out-dir",
                str(run),
                "--cpus",
                "2",
            ]
        )
        == 0
    )
    out, err = capfd.readouterr()
    # quiet logs: our per-round lines, no Flower INFO lines, colour codes or deprecation notice off a terminal
    assert "round 1/1:" in out and not any(
        s in out + err for s in ("\x1b[", "INFO", "DEPRECATED", "Traceback")
    )
    assert (
        "Signed on-device bundle" in out and "never trained" not in out
    )  # the sample user is one who trained
    served = (
        "on-device runtime (onnxruntime, the population model",
        "on-device runtime (onnxruntime, its own adaptation",
    )
    assert any(text in out for text in served)
    assert " 1. " in out and "because: " in out and "[interest head " in out
    # every head that drove an item of the list, with what it follows in the user's own history
    own = next(line for line in out.splitlines() if line.startswith("Its interest heads and the history"))
    assert all(f"head {h} (" in own for h in set(re.findall(r"\[interest head (\d+)\]", out)))
    heads = next(line for line in out.splitlines() if line.startswith("Interest heads over the top-10s"))
    assert all(
        f"head {h} " in heads for h in range(4)
    )  # each head's share (and what it favours, if anything)
    verify_bundle(run / "bundle", load_public_key(run / "bundle_signing_key.pub.pem"))

    monkeypatch.setenv("TMEPSR_TEST_PASSPHRASE", "correct horse")
    keys = tmp_path / "keys"
    passphrase = ["--passphrase-env", "TMEPSR_TEST_PASSPHRASE"]
    assert main(["keys", "--out", str(keys), *passphrase]) == 0
    assert main(["keys", "--out", str(keys), *passphrase]) == 2  # no overwrite
    assert "already exist" in capfd.readouterr().err
    bundle = tmp_path / "bundle"
    export = ["export", "--checkpoint", str(run), "--key", str(keys / "bundle_signing_key.pem"), *passphrase]
    assert main([*export, "--out", str(bundle), "--int8"]) == 0
    assert "signed bundle tmepsr-round1" in capfd.readouterr().out
    monkeypatch.setenv("TMEPSR_TEST_PASSPHRASE", "wrong")
    assert main([*export, "--out", str(tmp_path / "b2")]) == 2
    assert "wrong passphrase" in capfd.readouterr().err
    recommend = ["recommend", "--bundle", str(bundle), "--user", "u1", "--dataset", str(data)]
    assert main([*recommend, "--public-key", str(keys / "bundle_signing_key.pub.pem"), "--k", "5"]) == 0
    out = capfd.readouterr().out
    assert (
        "user u1: 14 of 14 events replayed through the on-device runtime" in out
        and " 5. " in out
        and "because: " in out
    )
    assert main([*recommend, "--public-key", str(run / "bundle_signing_key.pub.pem")]) == 2
    assert "signature" in capfd.readouterr().err


@pytest.mark.parametrize("command", ["simulate", "train", "export", "recommend", "keys", "credentials"])
def test_every_help_text_renders(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_train_resume_continues_and_refuses_to_overwrite(tmp_path, capsys):
    from .helpers import make_events

    data = make_events(tmp_path / "events.csv", users=6)
    out = tmp_path / "run"
    args = [
        "train",
        "--dataset",
        str(data),
        "--model",
        "gru4rec",
        "--out",
        str(out),
        "--set",
        '{"d_model": 8}',
    ]
    assert main([*args, "--epochs", "1"]) == 0
    assert json.loads((out / "results.json").read_text())["stopped"] == "max_epochs"
    capsys.readouterr()
    assert main([*args, "--epochs", "3"]) == 2
    assert "train_state.pt holds a training run" in capsys.readouterr().err
    assert main([*args, "--epochs", "3", "--resume"]) == 0
    history = json.loads((out / "results.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]


@pytest.mark.parametrize(
    ("command", "option", "message"),
    [
        ("simulate", ["--local-lr", "-1"], "local_lr, server_lr and round_timeout must be > 0"),
        ("simulate", ["--max-len", "0"], "max_len and eval_every must be >= 1"),
        ("simulate", ["--eval-every", "0"], "max_len and eval_every must be >= 1"),
        ("simulate", ["--d-model", "30"], "d_model=30 must be a positive multiple of the preset's 4 heads"),
        (
            "simulate",
            ["--split", "bogus"],
            "invalid choice: 'bogus' (choose from 'population', 'card', 'heads-prior')",
        ),
        ("train", ["--epochs", "0"], "max_epochs, patience, eval_every and eval_batch_size must be >= 1"),
        ("train", ["--set", '{"bogus": 1}'], "unknown model settings ['bogus']; known: alpha"),
        ("train", ["--set", '{"max_len": 0}'], "max_len, d_model, num_heads and num_blocks must be >= 1"),
        ("train", ["--set", '{"d_model": "abc"}'], "d_model must be int, got 'abc'"),
        ("train", ["--set", "5"], "--set needs a JSON object like"),
        ("train", ["--set", '{"d_model": 64'], "--set is not valid JSON (Expecting ',' delimiter"),
        ("train", ["--device", "cuda"], "no CUDA device; use --device cpu"),
    ],
)
def test_bad_settings_are_refused_before_anything_runs(tmp_path, command, option, message):
    """A setting no run can use is an error at once (exit 2, one error line, no traceback), not failed rounds,
    an untrained model or a traceback; nothing is written. Through the installed `tmepsr` command."""
    if option[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    tmepsr = Path(sys.executable).parent / "tmepsr"
    done = subprocess.run(
        [str(tmepsr), command, *option, "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if ": error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


def test_keys_without_a_terminal_and_recommend_without_a_key_say_what_to_do(tmp_path, capsys, monkeypatch):
    """No terminal for the passphrase prompt (a script, CI): an error naming --passphrase-env, no key written;
    no pinned public key: an error naming the missing file, before any bundle is read."""

    def no_terminal(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr("getpass.getpass", no_terminal)
    assert main(["keys", "--out", str(tmp_path / "keys")]) == 2
    assert "--passphrase-env NAME" in capsys.readouterr().err
    assert not (tmp_path / "keys").exists()
    missing = tmp_path / "none.pub.pem"
    assert main(["recommend", "--bundle", str(tmp_path), "--public-key", str(missing), "--user", "1"]) == 2
    assert f"no public key at {missing}" in capsys.readouterr().err


def test_train_refuses_an_out_that_is_a_file(tmp_path, capsys):
    """Checked before training, so no trained model is lost at save time."""
    (tmp_path / "taken").write_text("")
    assert main(["train", "--out", str(tmp_path / "taken")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_recommend_refuses_a_dataset_whose_ids_name_other_items():
    """Replaying another catalogue's ids would feed the runtime colliding ids ("1" is another movie)."""
    from types import SimpleNamespace

    from client_sdk.cli import check_same_catalogue
    from shared_model.data import InteractionLog, ItemMeta

    log = InteractionLog.from_events(
        "ml-other", [0, 0], ["1", "2"], [1, 2], "seconds", item_meta=ItemMeta(titles=("Toy Story", "Jumanji"))
    )
    bundle = SimpleNamespace(
        manifest=SimpleNamespace(data={"dataset": "mine"}),
        catalogue_ids=["1", "2", "3"],
        catalogue_titles=["Toy Story", "GoldenEye", "Heat"],
    )
    with pytest.raises(ValueError, match="1 shared item ids name other items .*'Jumanji' here, 'GoldenEye'"):
        check_same_catalogue(log, bundle)
    bundle.catalogue_titles[1] = "Jumanji"
    check_same_catalogue(log, bundle)  # the same items: fine


def test_a_long_run_prints_about_fifty_round_lines_and_every_noteworthy_round():
    from server.app import _printed

    rows = [{"round": r} for r in range(1, 451)]
    for r in (50, 100):
        rows[r - 1]["val"] = {"ndcg@10": 0.1}
    rows[76]["rejected"] = 1  # round 77
    rows[132]["failed_users"] = 2  # round 133
    printed = [row["round"] for row in rows if _printed(row, 450)]
    assert printed == sorted({1, 77, 133, *range(10, 451, 10)})
    assert all(_printed({"round": r}, 30) for r in range(1, 31))  # a short run: every round
