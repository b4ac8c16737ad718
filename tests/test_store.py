"""Encrypted device store: roundtrips, authentication, corruption, versions, atomic saves, validation, imports."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from client_sdk.store import (
    MAGIC,
    CorruptStore,
    DeviceRecord,
    EncryptedStore,
    StoreError,
    UnsupportedStoreVersion,
    WrongKeyOrTampered,
    _write_v1,
    key_from_passphrase,
)

KEY = bytes(range(32))
HEADER_SIZE = len(MAGIC) + 2 + 1 + 16 + 12
REPO = Path(__file__).resolve().parents[1]


def make_record(n: int = 50) -> DeviceRecord:
    rng = np.random.default_rng(0)
    return DeviceRecord(
        items=rng.integers(0, 10_000, n, dtype=np.int64),
        times=np.sort(rng.integers(1_600_000_000, 1_700_000_000, n, dtype=np.int64)),
        state={
            "lru": rng.normal(size=(2, 4, 8, 2)).astype(np.float32),
            "time": rng.normal(size=16).astype(np.float32),
        },
        weights={
            "user.embedding": rng.normal(size=(3, 5)),
            "head/bias": np.array(-0.0, dtype=np.float32),
            "gate": np.array([True, False]),
            "quantized": rng.integers(-128, 127, (4,), dtype=np.int32),
            "counts": rng.integers(0, 2**40, (2, 2), dtype=np.int64),
            "empty": np.zeros((0, 3), dtype=np.float32),
        },
        meta={"user_id": "u-42", "bundle_version": 3, "round": 7, "tags": ["a", "b"], "lr": 0.01},
    )


def assert_same(a: DeviceRecord, b: DeviceRecord, *, state: bool = True) -> None:
    for name in ("items", "times"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == np.int64 and np.array_equal(x, y)
    pairs = [(a.weights, b.weights)] + ([(a.state, b.state)] if state else [])
    for left, right in pairs:
        assert left.keys() == right.keys()
        for name in left:
            assert left[name].dtype == right[name].dtype and left[name].shape == right[name].shape
            assert left[name].tobytes() == right[name].tobytes()
    assert a.meta == b.meta


def saved(tmp_path: Path, record: DeviceRecord | None = None) -> EncryptedStore:
    store = EncryptedStore(tmp_path / "device.store", key=KEY)
    store.save(record or make_record())
    return store


def test_roundtrip_keeps_arrays_dtypes_and_meta(tmp_path: Path) -> None:
    record = make_record()
    store = saved(tmp_path, record)
    assert store.exists()
    assert_same(EncryptedStore(store.path, key=KEY).load(), record)
    assert store.path.read_bytes()[: len(MAGIC)] == MAGIC
    assert b"u-42" not in store.path.read_bytes()


def test_empty_history_roundtrips(tmp_path: Path) -> None:
    record = DeviceRecord(
        items=np.array([], np.int64), times=np.array([], np.int64), state={}, weights={}, meta={}
    )
    assert_same(saved(tmp_path, record).load(), record)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    store = EncryptedStore(tmp_path / "absent.store", key=KEY)
    assert not store.exists()
    with pytest.raises(FileNotFoundError):
        store.load()


def test_constructor_checks_key_arguments(tmp_path: Path) -> None:
    path = tmp_path / "x.store"
    for kwargs in ({}, {"key": KEY, "passphrase": "pw"}, {"key": KEY[:16]}, {"passphrase": ""}):
        with pytest.raises(ValueError):
            EncryptedStore(path, **kwargs)


def test_passphrase_roundtrip_reuses_salt_and_rejects_wrong_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "pw.store"
    store = EncryptedStore(path, passphrase="correct horse")
    record = make_record()
    store.save(record)
    first = path.read_bytes()
    store.save(record)
    second = path.read_bytes()
    assert first[len(MAGIC) + 2] == 1  # kdf: scrypt
    assert first[len(MAGIC) + 3 : len(MAGIC) + 19] == second[len(MAGIC) + 3 : len(MAGIC) + 19] != bytes(16)
    assert_same(EncryptedStore(path, passphrase="correct horse").load(), record)
    with pytest.raises(WrongKeyOrTampered, match="pw.store"):
        EncryptedStore(path, passphrase="wrong horse").load()
    with pytest.raises(WrongKeyOrTampered, match="passphrase"):
        EncryptedStore(path, key=KEY).load()


def test_wrong_raw_key(tmp_path: Path) -> None:
    store = saved(tmp_path)
    with pytest.raises(WrongKeyOrTampered, match="device.store"):
        EncryptedStore(store.path, key=bytes(32)).load()


def test_scrypt_is_deterministic_per_salt() -> None:
    salt = bytes(16)
    key = key_from_passphrase("pässphrase", salt)
    assert len(key) == 32
    assert key == key_from_passphrase("pässphrase", salt)
    assert key != key_from_passphrase("pässphrase", b"\1" * 16)


def test_nonce_differs_between_saves(tmp_path: Path) -> None:
    store = saved(tmp_path)
    first = store.path.read_bytes()
    store.save(store.load())
    second = store.path.read_bytes()
    assert first[HEADER_SIZE - 12 : HEADER_SIZE] != second[HEADER_SIZE - 12 : HEADER_SIZE]
    assert first[HEADER_SIZE:] != second[HEADER_SIZE:]


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return saved(tmp_path_factory.mktemp("orig"), make_record(5)).path.read_bytes()


@settings(max_examples=30, deadline=None)
@given(data=st.data(), flip=st.integers(1, 255))
def test_any_flipped_byte_is_refused(
    original: bytes, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, flip: int
) -> None:
    position = data.draw(
        st.one_of(st.integers(0, HEADER_SIZE - 1), st.integers(HEADER_SIZE, len(original) - 1)),
        label="position",
    )
    tampered = bytearray(original)
    tampered[position] ^= flip
    path = tmp_path_factory.mktemp("flip") / "device.store"
    path.write_bytes(bytes(tampered))
    with pytest.raises((WrongKeyOrTampered, CorruptStore, UnsupportedStoreVersion)):
        EncryptedStore(path, key=KEY).load()


@pytest.mark.parametrize(
    ("position", "error"),
    [
        (0, CorruptStore),  # magic
        (len(MAGIC), UnsupportedStoreVersion),  # version, high byte
        (len(MAGIC) + 2, WrongKeyOrTampered),  # kdf 0 -> 1: asks for a passphrase
        (len(MAGIC) + 5, WrongKeyOrTampered),  # salt
        (HEADER_SIZE - 1, WrongKeyOrTampered),  # nonce
        (HEADER_SIZE, WrongKeyOrTampered),  # first ciphertext byte
        (-1, WrongKeyOrTampered),  # tag
    ],
)
def test_header_fields_are_authenticated(tmp_path: Path, original: bytes, position: int, error: type) -> None:
    tampered = bytearray(original)
    tampered[position] ^= 1
    path = tmp_path / "device.store"
    path.write_bytes(bytes(tampered))
    with pytest.raises(error):
        EncryptedStore(path, key=KEY).load()


def test_header_swapped_between_saves_is_refused(tmp_path: Path) -> None:
    store = saved(tmp_path)
    first = store.path.read_bytes()
    store.save(make_record())
    second = store.path.read_bytes()
    store.path.write_bytes(first[:HEADER_SIZE] + second[HEADER_SIZE:])
    with pytest.raises(WrongKeyOrTampered):
        store.load()


@pytest.mark.parametrize("keep", [0, 5, len(MAGIC), HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 10, -16, -1])
def test_truncated_file_is_refused(tmp_path: Path, original: bytes, keep: int) -> None:
    path = tmp_path / "device.store"
    path.write_bytes(original[:keep])
    with pytest.raises((CorruptStore, WrongKeyOrTampered)):
        EncryptedStore(path, key=KEY).load()
    if keep < HEADER_SIZE and keep >= 0:
        with pytest.raises(CorruptStore, match="shorter than a store header"):
            EncryptedStore(path, key=KEY).load()


def test_not_a_store_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"just some text that is long enough to fill a whole store header, and then some")
    with pytest.raises(CorruptStore, match="notes.txt.*bad magic"):
        EncryptedStore(path, key=KEY).load()


def test_newer_version_is_unsupported(tmp_path: Path, original: bytes) -> None:
    path = tmp_path / "device.store"
    path.write_bytes(
        MAGIC + (EncryptedStore.FORMAT_VERSION + 1).to_bytes(2, "big") + original[len(MAGIC) + 2 :]
    )
    with pytest.raises(UnsupportedStoreVersion, match="format version 4"):
        EncryptedStore(path, key=KEY).load()


def test_v1_file_loads_without_state_and_is_upgraded_on_save(tmp_path: Path) -> None:
    record = make_record()
    path = tmp_path / "old.store"
    _write_v1(path, record, KEY)
    assert int.from_bytes(path.read_bytes()[len(MAGIC) : len(MAGIC) + 2], "big") == 1
    store = EncryptedStore(path, key=KEY)
    old = store.load()
    assert old.state == {}
    assert_same(old, record, state=False)
    old.state = record.state
    store.save(old)
    assert int.from_bytes(path.read_bytes()[len(MAGIC) : len(MAGIC) + 2], "big") == 3
    assert_same(store.load(), record)


@pytest.mark.parametrize("fail", ["replace", "fsync"])
def test_crash_mid_write_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: str
) -> None:
    record = make_record()
    store = saved(tmp_path, record)
    before = store.path.read_bytes()

    def crash(*args: object) -> None:
        raise OSError("simulated crash")

    newer = make_record()
    newer.meta["round"] = 8
    monkeypatch.setattr(os, fail, crash)
    try:
        with pytest.raises(OSError, match="simulated crash"):
            store.save(newer)
    finally:
        monkeypatch.undo()
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "device.store"]
        for name in leftovers:
            (tmp_path / name).unlink()
    assert leftovers == []
    assert store.path.read_bytes() == before
    assert_same(store.load(), record)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.weights.__setitem__("user.embedding", np.array([1.0, np.nan])), "user.embedding.*NaN"),
        (lambda r: r.state.__setitem__("lru", np.array([np.inf], np.float32)), "lru.*Inf"),
        (lambda r: r.weights.__setitem__("names", np.array(["a", "b"])), "names.*dtype in"),
        (lambda r: r.weights.__setitem__("half", np.zeros(2, np.float16)), "half.*dtype in"),
        (lambda r: r.state.__setitem__("lru", np.zeros(2, np.complex64)), "lru.*dtype in"),
        (lambda r: setattr(r, "times", r.times[:-1]), "differ in length"),
        (lambda r: setattr(r, "items", r.items.astype(np.float64) + 0.5), "items.*whole numbers"),
        (lambda r: setattr(r, "items", np.full(len(r.times), np.nan)), "items.*whole numbers"),
        (lambda r: setattr(r, "items", r.items.reshape(-1, 1)), "items must be 1-D"),
        (lambda r: setattr(r, "items", -r.items), "items must be in \\[0, 2\\*\\*53\\)"),
        (lambda r: setattr(r, "times", np.array([2**64 - 1] * len(r.items), np.uint64)), "times.*int64"),
        (lambda r: r.meta.__setitem__("when", object()), "meta"),
        (lambda r: r.meta.__setitem__("pair", (1, 2)), "meta"),
    ],
)
def test_invalid_record_is_refused_and_old_file_kept(tmp_path: Path, change, message: str) -> None:
    store = saved(tmp_path)
    before = store.path.read_bytes()
    bad = make_record()
    change(bad)
    with pytest.raises(ValueError, match=message):
        store.save(bad)
    assert store.path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["device.store"]


def test_integer_like_inputs_are_cast_to_int64(tmp_path: Path) -> None:
    record = DeviceRecord(
        items=[3, 1, 2], times=np.array([10.0, 20.0, 30.0]), state={}, weights={}, meta={"v": 1}
    )
    loaded = saved(tmp_path, record).load()
    assert loaded.items.dtype == loaded.times.dtype == np.int64
    assert loaded.items.tolist() == [3, 1, 2] and loaded.times.tolist() == [10, 20, 30]


def test_update_loads_modifies_and_saves(tmp_path: Path) -> None:
    store = saved(tmp_path)

    def add_event(record: DeviceRecord) -> DeviceRecord:
        record.items = np.append(record.items, 99)
        record.times = np.append(record.times, record.times[-1] + 60)
        record.meta["round"] += 1
        return record

    returned = store.update(add_event)
    loaded = store.load()
    assert loaded.items[-1] == 99 and loaded.meta["round"] == 8
    assert_same(loaded, returned)


def test_store_errors_share_a_base() -> None:
    for error in (WrongKeyOrTampered, CorruptStore, UnsupportedStoreVersion):
        assert issubclass(error, StoreError)


def test_payload_is_portable_json(tmp_path: Path) -> None:
    """A reader in another language needs only AES-GCM, JSON and base64 (docs/BUNDLE.md, section 6)."""
    record = make_record()
    blob = saved(tmp_path, record).path.read_bytes()
    header, ciphertext = blob[:HEADER_SIZE], blob[HEADER_SIZE:]
    payload = json.loads(AESGCM(KEY).decrypt(header[-12:], ciphertext, header))
    assert payload["items"] == record.items.tolist() and payload["times"] == record.times.tolist()
    assert payload["meta"] == record.meta
    lru = payload["state"]["lru"]
    assert lru["dtype"] == "float32" and lru["shape"] == [2, 4, 8, 2]
    decoded = np.frombuffer(base64.b64decode(lru["data"]), "<f4").reshape(lru["shape"])
    assert np.array_equal(decoded, record.state["lru"])


def _seal_payload(path: Path, payload: bytes) -> None:
    header = MAGIC + (3).to_bytes(2, "big") + bytes(1 + 16) + os.urandom(12)
    path.write_bytes(header + AESGCM(KEY).encrypt(header[-12:], payload, header))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff not utf-8", "unreadable payload"),
        (b"[1, 2]", "exactly"),
        (b'{"items": [1], "times": [], "state": {}, "weights": {}, "meta": {}}', "same length"),
        (b'{"items": [1.5], "times": [1], "state": {}, "weights": {}, "meta": {}}', "integers in"),
        (b'{"items": [-1], "times": [1], "state": {}, "weights": {}, "meta": {}}', "integers in"),
        (
            b'{"items": [1], "times": [9007199254740992], "state": {}, "weights": {}, "meta": {}}',
            "integers in",
        ),
        (b'{"items": [], "times": [], "state": {}, "weights": {}, "meta": []}', "meta"),
        (
            b'{"items": [], "times": [], "state": {"s": {"dtype": "float16", "shape": [1], "data": "AAA="}},'
            b' "weights": {}, "meta": {}}',
            "dtype in",
        ),
        (
            b'{"items": [], "times": [], "state": {"s": {"dtype": "float32", "shape": [2], "data": "AAAAAA=="}},'
            b' "weights": {}, "meta": {}}',
            "bytes of data",
        ),
        (
            b'{"items": [], "times": [], "state": {"s": {"dtype": "float32", "shape": [1], "data": "AADAfw=="}},'
            b' "weights": {}, "meta": {}}',
            "NaN",
        ),
    ],
)
def test_malformed_payload_is_corrupt(tmp_path: Path, payload: bytes, message: str) -> None:
    """Authentic (right key) but malformed payloads, as a buggy client in another language could write."""
    path = tmp_path / "foreign.store"
    _seal_payload(path, payload)
    with pytest.raises(CorruptStore, match=message):
        EncryptedStore(path, key=KEY).load()
