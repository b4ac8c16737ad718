"""The JavaScript client (client_sdk/js) against the Python runtime on the same bundle: the same
recommendations event by event (onnxruntime-node), stores each writes the other reads, and the demo page in a
headless Chromium (onnxruntime-web) rendering what the Python runtime recommends.

Needs Node >= 20 (skipped, with the reason, without ``node`` on PATH) and the package's dependencies: a missing
``client_sdk/js/node_modules`` is a failure, fixed by ``npm ci`` in client_sdk/js. The browser check needs a
Chromium binary (``$CHROMIUM``, else ``chromium`` / ``chromium-browser`` on PATH) and skips without one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client_sdk.runtime import Recommender
from client_sdk.store import EncryptedStore

REPO = Path(__file__).resolve().parents[1]
JS = REPO / "client_sdk" / "js"
NODE = shutil.which("node")
KEY = bytes(range(32))
USERS, EVENTS_PER_USER = 80, 60  # ~4,500 events: 80 users' first 60 events
K = 10

pytestmark = [
    pytest.mark.slow,  # each builds or replays a bundle through node (10-30 s)
    pytest.mark.skipif(NODE is None, reason="node is not on PATH (the JavaScript client needs Node >= 20)"),
]


def _node(args: list[str], payload: dict | None = None, timeout: float = 300) -> dict:
    """Run a node script of the package with a JSON request on stdin; its JSON output."""
    proc = subprocess.run(
        [NODE, *args],
        input=json.dumps(payload) if payload is not None else None,
        capture_output=True,
        text=True,
        cwd=JS,
        timeout=timeout,
    )
    if proc.returncode:
        raise AssertionError(f"node {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def _fixture(root: Path, users: int, *options: str) -> dict:
    if not (JS / "node_modules" / "onnxruntime-node").is_dir():
        pytest.fail("client_sdk/js/node_modules is missing: run npm ci in client_sdk/js")
    subprocess.run(
        [sys.executable, str(JS / "test" / "make_bundle.py"), str(root), "--users", str(users), *options],
        check=True,
    )
    info = json.loads((root / "fixture.json").read_text())
    users = [events[:EVENTS_PER_USER] for events in info["users"]]
    return {
        "root": root,
        "bundle": root / info["bundle"],
        "public": root / info["public_key"],
        "users": users,
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return _fixture(tmp_path_factory.mktemp("js"), USERS)


def _view(recs) -> dict:
    return {
        "items": [r.item for r in recs],
        "scores": [r.score for r in recs],
        "heads": [r.head for r in recs],
        "explanation_ids": [list(r.explanation_ids) for r in recs],
    }


def _python_replay(env, tmp_path, explanations: int) -> list[list[dict]]:
    """Each user's recommend(K) after every event, from an empty history (sync_history([]) between users)."""
    out = []
    rec = Recommender.open(env["bundle"], env["public"], EncryptedStore(tmp_path / "py.store", key=KEY))
    try:
        for events in env["users"]:
            rec.sync_history([])
            rows = []
            for item, t in events:
                rec.record(item, t, save=False)
                rows.append(_view(rec.recommend(K, explanations=explanations)))
            out.append(rows)
    finally:
        rec.close()
    return out


def test_js_client_matches_the_python_runtime_event_by_event(env, tmp_path):
    _assert_parity(env, tmp_path, min_events=4000)


def test_js_client_matches_the_python_runtime_on_an_int8_bundle(tmp_path):
    """int8 bundles: the JS client decodes the int8-rows initial personal weights as the Python runtime does."""
    env = _fixture(tmp_path / "int8", 10, "--int8")
    assert json.loads((env["bundle"] / "manifest.json").read_text())["spec"]["int8"]
    _assert_parity(env, tmp_path, min_events=500)


def _assert_parity(env, tmp_path, min_events: int) -> None:
    spec = json.loads((env["bundle"] / "manifest.json").read_text())["spec"]
    explanations = spec["num_explanations_out"]
    assert explanations > 0, "the fixture model must have an explanation branch"
    want = _python_replay(env, tmp_path, explanations)
    request = {
        "command": "replay",
        "bundle": str(env["bundle"]),
        "public_key": str(env["public"]),
        "k": K,
        "explanations": explanations,
        "users": env["users"],
    }
    got = _node(["bin/replay.mjs"], request)["users"]
    assert len(got) == len(want) == len(env["users"])
    events = agree = 0
    max_diff = 0.0
    mismatches = []
    for user, (js_rows, py_rows) in enumerate(zip(got, want, strict=True)):
        assert len(js_rows) == len(py_rows)
        for n, (js, py) in enumerate(zip(js_rows, py_rows, strict=True)):
            events += 1
            if js["items"] != py["items"]:
                mismatches.append((user, n, js["items"], py["items"]))
                continue
            agree += 1
            assert js["heads"] == py["heads"], (user, n)
            assert js["explanation_ids"] == py["explanation_ids"], (user, n)
            max_diff = max(max_diff, *(abs(a - b) for a, b in zip(js["scores"], py["scores"], strict=True)))
    print(
        f"js/python parity: {agree}/{events} events with identical top-{K}, max |score diff| {max_diff:.3g}"
    )
    assert events >= min_events
    assert agree >= 0.999 * events, f"top-{K} differ on {events - agree} of {events} events: {mismatches[:3]}"
    assert max_diff <= 1e-4


def _python_store_view(env, path: Path, **key) -> tuple[list, dict, object]:
    rec = Recommender.open(env["bundle"], env["public"], EncryptedStore(path, **key))
    try:
        return rec.history, _view(rec.recommend(K, explanations=3)), EncryptedStore(path, **key).load()
    finally:
        rec.close()


def _assert_same_recs(js: dict, py: dict, atol: float = 1e-5) -> None:
    assert js["items"] == py["items"] and js["heads"] == py["heads"]
    assert js["explanation_ids"] == py["explanation_ids"]
    np.testing.assert_allclose(js["scores"], py["scores"], atol=atol)


@pytest.mark.parametrize(
    "key", [{"key": KEY}, {"passphrase": "correct horse"}], ids=["raw-key", "passphrase"]
)
def test_stores_written_by_one_client_are_read_by_the_other(env, tmp_path, key):
    events = env["users"][3]
    path = tmp_path / "u.store"
    rec = Recommender.open(env["bundle"], env["public"], EncryptedStore(path, **key))
    for item, t in events[:30]:
        rec.record(item, t, save=False)
    rec.save()
    py_recs, py_history, sha = _view(rec.recommend(K, explanations=3)), rec.history, rec.manifest.sha256
    rec.close()

    js_key = {"key": KEY.hex()} if "key" in key else key
    request = {
        "command": "store",
        "bundle": str(env["bundle"]),
        "public_key": str(env["public"]),
        "store": str(path),
        "events": events[30:40],
        "explanations": 3,
        **js_key,
    }
    js = _node(["bin/replay.mjs"], request)
    # the JS client read the Python store: same history, same recommendations (from the stored state)
    assert [tuple(e) for e in js["opened"]["history"]] == [tuple(e) for e in py_history]
    _assert_same_recs(js["opened"]["recommend"], py_recs)
    assert js["record"]["meta"]["bundle"] == sha

    # the Python runtime reads the store the JS client wrote: same history, state and recommendations
    history, recs, record = _python_store_view(env, path, **key)
    assert [tuple(e) for e in js["history"]] == [tuple(e) for e in history] and len(history) == 40
    _assert_same_recs(js["recommend"], recs)
    assert set(record.state) == set(js["record"]["state"])
    for name, array in js["record"]["state"].items():
        assert list(record.state[name].shape) == array["shape"] and record.state[name].dtype == np.float32
        np.testing.assert_array_equal(record.state[name].ravel(), np.array(array["data"], np.float32))
    assert record.meta == js["record"]["meta"]
    assert all(math.isfinite(s) for s in recs["scores"])


def _chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def test_demo_page_in_chromium_renders_what_the_python_runtime_recommends(env, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip(
            "no Chromium binary ($CHROMIUM, chromium or chromium-browser on PATH) for the demo page check"
        )
    history = env["users"][5][:50]
    request = {
        "bundle": str(env["bundle"]),
        "public_key": str(env["public"]),
        "history": history,
        "chromium": chromium,
    }
    (tmp_path / "request.json").write_text(json.dumps(request))
    page = _node(["bin/browser-check.mjs", str(tmp_path / "request.json")], timeout=240)

    rec = Recommender.open(env["bundle"], env["public"], EncryptedStore(tmp_path / "u.store", key=KEY))
    try:
        rec.sync_history([tuple(e) for e in history])  # the page loads the history the same way
        first = _view(rec.recommend(K, explanations=2))
        item, t = page["clicked"]
        assert item == page["first"][0]["item"]  # the click recorded the first recommendation
        rec.record(item, t)
        second = _view(rec.recommend(K, explanations=2))
        titles = dict(zip(rec.catalogue_ids, rec.catalogue_titles, strict=True))
    finally:
        rec.close()
    for shown, want in ((page["first"], first), (page["second"], second), (page["reloaded"], second)):
        _assert_same_recs(
            _shown(shown), want, atol=1e-4
        )  # onnxruntime-web (wasm) against onnxruntime (native)
        assert [r["title"] for r in shown] == [titles[i] for i in want["items"]]
        assert all(r["head_text"] == f"interest {r['head']}" for r in shown)
    assert any(r["why"].startswith("because: ") for r in page["first"])
    assert "verified" in page["status"]


def _shown(rows: list[dict]) -> dict:
    return {
        "items": [r["item"] for r in rows],
        "scores": [r["score"] for r in rows],
        "heads": [r["head"] for r in rows],
        "explanation_ids": [r["explanation_ids"] for r in rows],
    }


def test_the_packages_own_node_test_suite_passes(tmp_path):
    """``npm test`` (node's test runner: bundle tampering, the store, bad input, upgrades, the demo server), so
    the README's one test command covers the JavaScript package too."""
    if not (JS / "node_modules" / "onnxruntime-node").is_dir():
        pytest.fail("client_sdk/js/node_modules is missing: run npm ci in client_sdk/js")
    proc = subprocess.run(
        [NODE, "--test"],
        cwd=JS,
        env={**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout and "# skipped 0" in proc.stdout


def test_readme_javascript_example_runs(env, tmp_path):
    """The README's JavaScript example ("Integrate in an app") runs as written, on the fixture bundle (paths
    and the device key filled in) from inside the package, as an app importing ``tme-psr-client`` would."""
    import re

    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```js\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "README should have one JavaScript example"
    item = env["users"][0][0][0]
    code = (
        blocks[0]
        .replace('"bundles/v7"', json.dumps(str(env["bundle"])))
        .replace('"bundle_signing_key.pub.pem"', json.dumps(str(env["public"])))
        .replace('"user.store"', json.dumps(str(tmp_path / "user.store")))
        .replace('"318"', json.dumps(item))
    )
    script = JS / "test" / f".readme-example-{os.getpid()}.mjs"  # inside the package: self-reference by name
    script.write_text("const key = new Uint8Array(32).fill(7);\n" + code)
    try:
        proc = subprocess.run([NODE, str(script)], cwd=JS, capture_output=True, text=True, timeout=120)
    finally:
        script.unlink()
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == K and all(len(line.split(" ")) >= 3 for line in lines)
    assert (tmp_path / "user.store").exists()
