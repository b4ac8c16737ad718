"""The torch-free on-device runtime: bundle verification on open and upgrade, record/recommend against the torch
model, the store round trip, personal weights from the store, and the defined behaviour for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client_sdk.errors import DeviceRuntimeError
from client_sdk.runtime import IncompatibleStore, OutOfOrderEvent, Recommender, RuntimeInputError, UnknownItem
from client_sdk.store import DeviceRecord, EncryptedStore, StoreError, StoreInUse, _write_v1
from server.publish import build_bundle
from server.release import generate_keys, load_private_key, sign_bundle
from shared_model.data import load_dataset
from shared_model.partition import split_state
from shared_model.protocol.bundle import BundleError, BundleFormatError, BundleSignatureError, BundleTampered
from shared_model.top_k import recommend

from .helpers import make_events, tiny_model

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    log = load_dataset(str(make_events(root / "events.csv", users=6, events=12, items=30)))
    private, public = generate_keys(root / "keys", "pw")
    key = load_private_key(private, "pw")
    model = tiny_model(log, 0)
    build_bundle(model, log, root / "v1", key, model_version="v1", top_k=20, check=False)
    return {"root": root, "log": log, "key": key, "public": public, "model": model}


def _open(env, tmp_path, bundle="v1", **kw) -> Recommender:
    return Recommender.open(
        env["root"] / bundle, env["public"], EncryptedStore(tmp_path / "u.store", key=KEY), **kw
    )


def _replay(rec: Recommender, log, user: int) -> None:
    lo, hi = log.user_ptr[user], log.user_ptr[user + 1]
    for item, t in zip(log.item[lo:hi], log.time[lo:hi], strict=True):
        rec.record(log.item_ids[item], int(t), save=False)
    rec.save()


def test_runtime_matches_the_torch_model_and_survives_a_restart(env, tmp_path):
    log, model = env["log"], env["model"]
    rec = _open(env, tmp_path)
    _replay(rec, log, 2)
    got = rec.recommend(10)
    want = recommend(model, log, 2, k=10)
    assert [r.item for r in got] == [w["item"] for w in want]
    np.testing.assert_allclose([r.score for r in got], [w["score"] for w in want], atol=1e-4)
    assert [r.head for r in got] == [w["head"] for w in want]
    assert [r.explanations for r in got] == [w["explanations"] for w in want]
    texts = rec._loaded.explanations  # the ids index the bundle catalogue's explanation vocabulary
    assert all([texts[e] for e in r.explanation_ids] == r.explanations for r in got)
    wide = rec.recommend(15)  # wider than the step graph's ranking: from the rank graph
    assert [r.item for r in wide] == [w["item"] for w in recommend(model, log, 2, k=15)]
    assert [(r.item, r.head, r.explanations) for r in wide[:10]] == [
        (r.item, r.head, r.explanations) for r in got
    ]
    rec.close()
    again = _open(
        env, tmp_path
    )  # states (the explanation-history counts too), history and seen items from the store
    assert again.history == rec.history
    assert [(r.item, r.explanations) for r in again.recommend(10)] == [(r.item, r.explanations) for r in got]
    assert set(again._states) == {"lru_state", "time_state", "explanation_history"}
    again.sync_history(rec.history)  # the sequence encoder graph gives the states the step graph rolled
    np.testing.assert_allclose([r.score for r in again.recommend(10)], [r.score for r in got], atol=1e-4)
    assert [r.explanations for r in again.recommend(10)] == [r.explanations for r in got]


def test_personal_weights_come_from_the_store(env, tmp_path):
    """The device's own time encoder / LRU / heads override the bundle's initial values."""
    log = env["log"]
    other = tiny_model(log, 1)
    shared, _ = split_state(env["model"], "card")
    _, personal = split_state(other, "card")
    from shared_model.partition import load_parts

    load_parts(other, shared)  # the bundle's shared arrays with the device's personal weights
    EncryptedStore(tmp_path / "u.store", key=KEY).save(
        DeviceRecord(np.zeros(0, np.int64), np.zeros(0, np.int64), {}, personal, {})
    )
    rec = _open(env, tmp_path)
    _replay(rec, log, 1)
    want = recommend(other, log, 1, k=5)
    assert [r.item for r in rec.recommend(5)] == [w["item"] for w in want]
    np.testing.assert_allclose([r.score for r in rec.recommend(5)], [w["score"] for w in want], atol=1e-4)


def test_store_from_an_older_format_and_from_a_simulation_is_reencoded(env, tmp_path):
    log = env["log"]
    lo, hi = log.user_ptr[3], log.user_ptr[4]
    _write_v1(tmp_path / "u.store", DeviceRecord(log.item[lo:hi], log.time[lo:hi], {}, {}, {}), KEY)
    rec = _open(env, tmp_path)
    assert len(rec.history) == hi - lo
    assert [r.item for r in rec.recommend(5)] == [w["item"] for w in recommend(env["model"], log, 3, k=5)]


def test_bad_events_have_defined_behaviour(env, tmp_path):
    log = env["log"]
    rec = _open(env, tmp_path)
    cold = rec.recommend(5)  # empty history: the zero state still ranks every item
    assert len(cold) == 5 and all(np.isfinite(r.score) for r in cold)
    first = log.item_ids[0]
    assert rec.record(first, 1_000)
    with pytest.raises(UnknownItem, match="not in the bundle's catalogue"):
        rec.record("no-such-item", 2_000)
    with pytest.raises(OutOfOrderEvent, match="before the last recorded event"):
        rec.record(log.item_ids[1], 999)
    assert not rec.record(first, 1_000)  # the same event again is ignored
    assert rec.history == [(str(first), 1_000)]
    assert first not in {r.item for r in rec.recommend(20)}
    unmasked, masked = rec.recommend(20, exclude_seen=False), rec.recommend(20)
    assert all(a.score >= b.score for a, b in zip(unmasked, masked, strict=True))  # ranks over a superset
    with pytest.raises(RuntimeInputError, match="k must be"):
        rec.recommend(21)
    with pytest.raises(RuntimeInputError, match="k must be"):
        rec.recommend("5")
    second = log.item_ids[1]
    for bad, message in [
        (1_700_000_000_000, "milliseconds"),
        (-5, r"\[0, 2\*\*40\)"),
        (2**62, r"2\*\*40"),
        (float("nan"), "nan"),
        (1_500.5, "whole"),
        ("1500", "number of unix seconds"),
    ]:
        with pytest.raises(RuntimeInputError, match=message):
            rec.record(second, bad)
    assert rec.history == [(str(first), 1_000)]  # nothing recorded
    assert rec.record(second, 1_500.0) and rec.history[-1] == (str(second), 1_500)  # a whole float is fine
    rec.close()
    with pytest.raises(RuntimeInputError, match="on_backwards"):
        _open(env, tmp_path, on_backwards="bogus")
    lenient = _open(env, tmp_path, on_unknown="ignore", on_backwards="clamp")
    assert not lenient.record("no-such-item", 3_000)
    assert lenient.record(log.item_ids[2], 10)  # clamped to the last event's time
    assert lenient.history[-1] == (str(log.item_ids[2]), 1_500)
    with pytest.raises(OutOfOrderEvent):
        lenient.sync_history([(log.item_ids[0], 5), (log.item_ids[1], 4)])
    for bad in (1_500.9, -5, 1_700_000_000_000):  # the same timestamp rules as record()
        with pytest.raises(RuntimeInputError, match="whole unix seconds"):
            lenient.sync_history([(log.item_ids[0], 5), (log.item_ids[1], bad)])
    assert len(lenient.history) == 3  # nothing changed


def test_tampered_or_foreign_bundles_are_refused_and_the_old_one_stays(env, tmp_path):
    log = env["log"]
    rec = _open(env, tmp_path)
    _replay(rec, log, 0)
    before = rec.recommend(5)
    bad = tmp_path / "bad"
    shutil.copytree(env["root"] / "v1", bad)
    with (bad / "step.onnx").open("r+b") as fh:
        fh.seek(200)
        byte = fh.read(1)
        fh.seek(200)
        fh.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BundleTampered):
        rec.upgrade(bad, env["public"])
    assert rec.recommend(5) == before and rec.manifest.model_version == "v1"
    other_private, other_public = generate_keys(tmp_path / "other", "pw2")
    with pytest.raises(BundleSignatureError):
        rec.upgrade(env["root"] / "v1", other_public)
    with pytest.raises(BundleError):
        Recommender.open(bad, env["public"], EncryptedStore(tmp_path / "x.store", key=KEY))
    old_spec = tmp_path / "old-spec"  # signed, but with a graph contract this SDK does not run
    shutil.copytree(env["root"] / "v1", old_spec)
    manifest = json.loads((old_spec / "manifest.json").read_text())
    (old_spec / "manifest.json").unlink()
    extra = {k: manifest[k] for k in ("catalogue", "dataset")} | {"spec": manifest["spec"] | {"format": 2}}
    sign_bundle(old_spec, env["key"], model_version="v0", opset=18, extra=extra)
    with pytest.raises(BundleFormatError, match="re-export"):
        rec.upgrade(old_spec, env["public"])
    assert rec.recommend(5) == before


@pytest.mark.slow
def test_upgrade_to_a_grown_catalogue_keeps_the_history(env, tmp_path):
    root = env["root"]
    grown_csv = root / "grown.csv"
    extra = "\n".join(f"u0,z{i},{1_700_000_000 + i},new" for i in range(3))
    grown_csv.write_text((root / "events.csv").read_text() + extra + "\n")
    grown = load_dataset(str(grown_csv))
    assert list(grown.item_ids[: env["log"].num_items]) == list(env["log"].item_ids)  # old ids are a prefix
    if not (root / "v2").exists():
        build_bundle(
            tiny_model(grown, 0), grown, root / "v2", env["key"], model_version="v2", top_k=20, check=False
        )
    rec = _open(env, tmp_path)
    _replay(rec, env["log"], 4)
    history = rec.history
    rec.upgrade(root / "v2", env["public"])
    assert rec.manifest.model_version == "v2" and rec.history == history
    assert rec.catalogue_ids == [str(i) for i in grown.item_ids] and rec.catalogue_ids[-1] == "z2"
    rec.record("z1", 1_800_000_000)
    rec.close()
    reopened = _open(env, tmp_path, bundle="v2")
    assert reopened.history[-1] == ("z1", 1_800_000_000)
    reopened.close()
    with pytest.raises(IncompatibleStore):  # v1 does not know z1: the stored history does not fit
        _open(env, tmp_path, bundle="v1")


def test_a_store_has_one_writer_and_no_event_is_lost(env, tmp_path):
    """A second Recommender on an open store is refused (it would save over the first one's events); after
    close() the next one sees every event, and the closed one cannot save."""
    items = env["log"].item_ids
    first = _open(env, tmp_path)
    first.record(items[0], 1_000)
    with pytest.raises(StoreInUse, match="another writer"):
        _open(env, tmp_path)
    code = (  # another process is refused too
        "import sys; from client_sdk.store import EncryptedStore, StoreInUse\n"
        f"try: EncryptedStore({str(tmp_path / 'u.store')!r}, key=bytes(32)).writer_lock()\n"
        "except StoreInUse: sys.exit(3)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 3
    first.record(items[1], 2_000)
    first.close()
    with pytest.raises(StoreError, match="closed"):
        first.save()
    with _open(env, tmp_path) as second:
        assert second.history == [(str(items[0]), 1_000), (str(items[1]), 2_000)]
        second.record(items[2], 3_000)
    with _open(env, tmp_path) as third:
        assert len(third.history) == 3


def test_one_error_type_covers_bundle_store_and_input_refusals(env, tmp_path):
    """An app catches DeviceRuntimeError for each kind of refusal (the kinds stay distinguishable)."""
    refusals = []
    with _open(env, tmp_path) as rec:
        for attempt in (lambda: rec.record("no-such-item", 1), lambda: rec.recommend(0)):
            with pytest.raises(DeviceRuntimeError) as caught:
                attempt()
            refusals.append(caught.value)
        with pytest.raises(DeviceRuntimeError) as caught:
            _open(env, tmp_path)  # the store is in use
        refusals.append(caught.value)
    (tmp_path / "u.store").write_bytes(b"not a store")
    with pytest.raises(DeviceRuntimeError) as caught:
        _open(env, tmp_path)
    refusals.append(caught.value)
    with pytest.raises(DeviceRuntimeError) as caught:
        Recommender.open(
            tmp_path, env["public"], EncryptedStore(tmp_path / "x.store", key=KEY)
        )  # not a bundle
    refusals.append(caught.value)
    kinds = [UnknownItem, RuntimeInputError, StoreInUse, StoreError, BundleError]
    assert [isinstance(e, k) for e, k in zip(refusals, kinds, strict=True)] == [True] * 5
    assert isinstance(refusals[0], ValueError)  # input errors stay ValueErrors too


@pytest.mark.parametrize("module", ["client_sdk.runtime", "client_sdk.bundle_slot", "client_sdk.store"])
def test_device_modules_import_neither_torch_nor_flwr(module):
    code = (
        "import sys\n"
        "for name in ('torch', 'flwr'):\n"
        "    sys.modules[name] = None  # any import of them now fails\n"
        f"import {module}\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'flwr') and sys.modules[m] is not None]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_the_benchmarks_breakdown_times_every_phase_of_the_step_graph_on_the_runtimes_events(env):
    from simulations.bench_runtime import PHASES, _events, breakdown

    items, times = _events(env["log"], 30)
    # breakdown raises if the whole-graph cut ranks any event differently from the runtime's own step graph
    out = breakdown(str(env["root"] / "v1"), str(env["public"]), items, times)
    assert out["events"] == 30
    assert list(out["cut_median_us"]) == list(PHASES)
    assert all(us > 0 for us in out["cut_median_us"].values())
    adds = list(out["phase_adds_us"].values())[: len(PHASES)]
    assert abs(sum(adds) - out["cut_median_us"]["explanations"]) < 1e-6  # the whole graph
    assert out["record_recommend_median_us"] > 0 and out["step_graph_median_us"] > 0
