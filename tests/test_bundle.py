"""Signed bundles: release keys, signing, verification, every tamper case, the device slot, and imports."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

import client_sdk.bundle_slot as bundle_module
from client_sdk.bundle_slot import BundleSlot
from server.release import (
    KeyFileError,
    WrongPassphrase,
    generate_keys,
    load_private_key,
    sign_bundle,
)
from shared_model.protocol.bundle import (
    MANIFEST,
    SIGNATURE,
    BundleError,
    BundleFormatError,
    BundleSignatureError,
    BundleTampered,
    load_public_key,
    verify_bundle,
)

REPO = Path(__file__).resolve().parents[1]
KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
CREATED = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
EXTRA = {
    "item_ids": {"1": 0, "32": 1, "318": 2},
    "item_titles": ["Toy Story (1995)", "Twelve Monkeys (1995)", "Shawshank Redemption, The (1994)"],
    "explanations": ["Comedy", "Sci-Fi", "Drama"],
}
MODEL_FILES = ("step.onnx", "encoder.onnx", "assets/explanations.json")


def make_bundle(folder: Path, version: str = "v1", key: Ed25519PrivateKey = KEY, seed: int = 0) -> Path:
    """A signed bundle of random 'ONNX' bytes (the same for the same seed) and a JSON file in a subfolder."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    (folder / "step.onnx").write_bytes(rng.randbytes(4096))
    (folder / "encoder.onnx").write_bytes(rng.randbytes(3000))
    (folder / "assets").mkdir()
    (folder / "assets" / "explanations.json").write_text(json.dumps({"texts": EXTRA["explanations"]}))
    sign_bundle(folder, key, model_version=version, opset=18, extra=EXTRA, created=CREATED)
    return folder


def resign(folder: Path, raw: bytes, key: Ed25519PrivateKey = KEY) -> None:
    """Replace manifest.json with ``raw`` and sign it properly, to reach the checks after the signature."""
    (folder / MANIFEST).write_bytes(raw)
    (folder / SIGNATURE).write_bytes(key.sign(raw))


def edit_manifest(folder: Path, change: Callable[[dict], None]) -> bytes:
    data = json.loads((folder / MANIFEST).read_bytes())
    change(data)
    return json.dumps(data).encode()


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle")


# --- release keys -------------------------------------------------------------------------------------------


def test_generate_keys_writes_an_encrypted_private_key_readable_by_owner_only(tmp_path: Path) -> None:
    private_path, public_path = generate_keys(tmp_path / "keys", "correct horse")
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in private_path.read_bytes()
    key = load_private_key(private_path, "correct horse")
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert load_public_key(public_path).public_bytes(*raw) == key.public_key().public_bytes(*raw)


def test_wrong_passphrase_is_refused_clearly(tmp_path: Path) -> None:
    private_path, _ = generate_keys(tmp_path, "correct horse")
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        load_private_key(private_path, "battery staple")


def test_generate_keys_refuses_to_overwrite_and_empty_passphrases(tmp_path: Path) -> None:
    private_path, public_path = generate_keys(tmp_path, "pw")
    before = private_path.read_bytes(), public_path.read_bytes()
    with pytest.raises(FileExistsError, match=r"overwrite=True \(tmepsr keys --overwrite\)"):
        generate_keys(tmp_path, "pw")
    assert (private_path.read_bytes(), public_path.read_bytes()) == before
    generate_keys(tmp_path, "pw2", overwrite=True)
    assert public_path.read_bytes() != before[1]
    load_private_key(private_path, "pw2")
    with pytest.raises(ValueError, match="empty"):
        generate_keys(tmp_path / "other", "")


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        (b"not a key", "not a PEM private key"),
        (
            KEY.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            "not passphrase-protected",
        ),
        (
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pw"),
            ),
            "not an Ed25519 private key",
        ),
    ],
)
def test_load_private_key_refuses_unusable_keys(tmp_path: Path, pem: bytes, message: str) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(pem)
    with pytest.raises(KeyFileError, match=message):
        load_private_key(path, "pw")


RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_load_public_key_accepts_pem_bytes_and_refuses_other_keys(tmp_path: Path) -> None:
    pem = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert isinstance(load_public_key(pem), type(KEY.public_key()))
    as_text = load_public_key(pem.decode())  # PEM text (e.g. from an app's config) is a key, not a path
    assert as_text.public_bytes(*RAW) == KEY.public_key().public_bytes(*RAW)
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(BundleSignatureError, match="not an Ed25519 public key"):
        load_public_key(ec_pem)
    (tmp_path / "junk.pem").write_bytes(b"junk")
    with pytest.raises(BundleSignatureError, match="not a PEM public key"):
        load_public_key(tmp_path / "junk.pem")


# --- signing and verifying ----------------------------------------------------------------------------------


def test_sign_and_verify_round_trip(bundle: Path) -> None:
    manifest = verify_bundle(bundle, KEY.public_key())
    assert manifest.format_version == 4 and manifest.model_version == "v1" and manifest.opset == 18
    assert manifest.created == CREATED
    assert (
        manifest.data["item_titles"] == EXTRA["item_titles"]
        and manifest.data["item_ids"] == EXTRA["item_ids"]
    )
    assert sorted(manifest.files) == sorted(MODEL_FILES)
    for name in MODEL_FILES:
        content = (bundle / name).read_bytes()
        assert manifest.files[name] == {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}
        assert manifest.path(name) == bundle / name
        assert manifest.read(name) == content
    assert manifest.sha256 == hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()
    with pytest.raises(BundleFormatError, match="no file 'missing.onnx'"):
        manifest.path("missing.onnx")


def test_manifest_bytes_are_deterministic(bundle: Path) -> None:
    first = (bundle / MANIFEST).read_bytes()
    returned = sign_bundle(bundle, KEY, model_version="v1", opset=18, extra=EXTRA, created=CREATED)
    assert (bundle / MANIFEST).read_bytes() == first
    assert returned == json.loads(first)
    assert list(json.loads(first)) == sorted(json.loads(first))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model_version": "../escape"}, "model_version"),
        ({"model_version": ""}, "model_version"),
        ({"opset": 0}, "opset"),
        ({"extra": {"files": {}}}, "own fields"),
        ({"extra": {"score": float("nan")}}, "JSON"),
        ({"extra": {"when": datetime.now(UTC)}}, "JSON"),
        ({"created": datetime(2025, 1, 1)}, "timezone"),
    ],
)
def test_sign_bundle_refuses_bad_release_fields(bundle: Path, kwargs: dict, message: str) -> None:
    args = {"model_version": "v2", "opset": 18, "extra": EXTRA, **kwargs}
    before = (bundle / MANIFEST).read_bytes()
    with pytest.raises(ValueError, match=message):
        sign_bundle(bundle, KEY, **args)
    assert (bundle / MANIFEST).read_bytes() == before


def test_sign_bundle_refuses_symlinks(bundle: Path) -> None:
    (bundle / "link.onnx").symlink_to(bundle / "step.onnx")
    with pytest.raises(ValueError, match="symlinks"):
        sign_bundle(bundle, KEY, model_version="v1", opset=18)


def flip_byte(folder: Path) -> None:
    path = folder / "step.onnx"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(folder: Path) -> None:
    path = folder / "encoder.onnx"
    path.write_bytes(path.read_bytes()[:-1])


def add_file(name: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"extra")

    return change


def symlink_listed_file(folder: Path) -> None:
    shutil.copy(folder / "step.onnx", folder.parent / "outside.onnx")
    (folder / "step.onnx").unlink()
    (folder / "step.onnx").symlink_to(folder.parent / "outside.onnx")


def change_title(folder: Path) -> None:
    text = (folder / MANIFEST).read_text(encoding="utf-8")
    (folder / MANIFEST).write_text(text.replace("Twelve Monkeys", "Thirteen Monkeys"), encoding="utf-8")


def resigned(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda folder: resign(folder, edit_manifest(folder, change))


TAMPER_CASES = {
    "flipped byte in a model file": (flip_byte, BundleTampered, "sha256"),
    "truncated model file": (truncate, BundleTampered, "truncated"),
    "missing model file": (lambda f: (f / "encoder.onnx").unlink(), BundleTampered, "missing"),
    "extra unlisted file": (add_file("evil.onnx"), BundleTampered, "not in the signed manifest"),
    "extra file in a subfolder": (
        add_file("assets/more/evil.py"),
        BundleTampered,
        "not in the signed manifest",
    ),
    "listed file replaced by a symlink": (symlink_listed_file, BundleTampered, "not a regular file"),
    "changed title, old signature": (change_title, BundleSignatureError, "does not match"),
    "signed by another key": (
        lambda f: resign(f, (f / MANIFEST).read_bytes(), OTHER_KEY),
        BundleSignatureError,
        "does not match",
    ),
    "missing signature": (lambda f: (f / SIGNATURE).unlink(), BundleSignatureError, "not signed"),
    "garbled signature": (lambda f: (f / SIGNATURE).write_bytes(b"garbage"), BundleSignatureError, "64"),
    "empty signature": (lambda f: (f / SIGNATURE).write_bytes(b""), BundleSignatureError, "64"),
    "missing manifest": (lambda f: (f / MANIFEST).unlink(), BundleFormatError, "not a bundle"),
    "format version 99": (
        resigned(lambda d: d.update(format_version=99)),
        BundleFormatError,
        "version 99 is newer than this code reads \\(4\\)",
    ),
    "format version 3 (no explanation history)": (
        resigned(lambda d: d.update(format_version=3)),
        BundleFormatError,
        "version 3 is older than this code reads \\(4\\); re-export",
    ),
    "format version as string": (
        resigned(lambda d: d.update(format_version="1")),
        BundleFormatError,
        "positive",
    ),
    "malformed JSON": (lambda f: resign(f, b'{"format_version": 1,'), BundleFormatError, "not valid JSON"),
    "JSON but not an object": (lambda f: resign(f, b"[1, 2]"), BundleFormatError, "not a JSON object"),
    "missing field": (resigned(lambda d: d.pop("opset")), BundleFormatError, "lacks \\['opset'\\]"),
    "file name escaping the bundle": (
        resigned(lambda d: d["files"].update({"../outside.onnx": d["files"]["step.onnx"]})),
        BundleFormatError,
        "invalid file name",
    ),
    "malformed file entry": (
        resigned(lambda d: d["files"]["step.onnx"].update(bytes=-1)),
        BundleFormatError,
        "must be",
    ),
    "bad model_version": (
        resigned(lambda d: d.update(model_version="a/b")),
        BundleFormatError,
        "model_version",
    ),
}


@pytest.mark.parametrize("case", list(TAMPER_CASES))
def test_tampered_bundle_is_refused_with_the_right_error(bundle: Path, case: str) -> None:
    change, error, message = TAMPER_CASES[case]
    change(bundle)
    with pytest.raises(error, match=message):
        verify_bundle(bundle, KEY.public_key())


def test_signature_is_checked_before_anything_else(bundle: Path) -> None:
    flip_byte(bundle)
    (bundle / MANIFEST).write_bytes(b"not json")
    with pytest.raises(BundleSignatureError):
        verify_bundle(bundle, KEY.public_key())


def test_read_rechecks_a_file_replaced_after_verification(bundle: Path) -> None:
    manifest = verify_bundle(bundle, KEY.public_key())
    flip_byte(bundle)
    with pytest.raises(BundleTampered):
        manifest.read("step.onnx")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("pristine") / "bundle")


@settings(max_examples=40, deadline=None)
@given(data=st.data(), flip=st.integers(1, 255))
def test_any_flipped_byte_in_any_file_is_detected(
    pristine: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, flip: int
) -> None:
    name = data.draw(st.sampled_from([MANIFEST, SIGNATURE, *MODEL_FILES]), label="file")
    folder = tmp_path_factory.mktemp("flip") / "bundle"
    shutil.copytree(pristine, folder)
    content = bytearray((folder / name).read_bytes())
    content[data.draw(st.integers(0, len(content) - 1), label="position")] ^= flip
    (folder / name).write_bytes(bytes(content))
    expected = BundleSignatureError if name in (MANIFEST, SIGNATURE) else BundleTampered
    with pytest.raises(expected):
        verify_bundle(folder, KEY.public_key())


# --- the device slot ----------------------------------------------------------------------------------------


def slot_dirs(root: Path) -> list[str]:
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir())


def test_slot_installs_and_switches_bundles(tmp_path: Path) -> None:
    slot = BundleSlot(tmp_path / "slot", KEY.public_key())
    assert slot.current() is None
    v1 = slot.install(make_bundle(tmp_path / "v1"))
    assert v1.root.parent == slot.root and v1.root.name == f"v1-{v1.sha256[:12]}"
    assert (slot.root / "CURRENT").read_text() == f"{v1.root.name}\n"
    assert slot.current() == v1
    v2 = slot.install(make_bundle(tmp_path / "v2", "v2", seed=2))
    assert slot.current() == v2 and v2.model_version == "v2"
    assert slot_dirs(slot.root) == sorted([v1.root.name, v2.root.name])


def test_failed_install_keeps_the_previous_bundle(tmp_path: Path) -> None:
    slot = BundleSlot(tmp_path / "slot", KEY.public_key())
    v1 = slot.install(make_bundle(tmp_path / "v1"))
    bad = make_bundle(tmp_path / "v2", "v2", seed=2)
    flip_byte(bad)
    with pytest.raises(BundleTampered):
        slot.install(bad)
    with pytest.raises(BundleSignatureError):
        slot.install(make_bundle(tmp_path / "v3", "v3", key=OTHER_KEY))
    assert slot.current() == v1
    assert slot_dirs(slot.root) == [v1.root.name]


def test_install_interrupted_while_copying_keeps_the_previous_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slot = BundleSlot(tmp_path / "slot", KEY.public_key())
    v1 = slot.install(make_bundle(tmp_path / "v1"))
    copy = bundle_module._copy_synced
    calls = []

    def failing_copy(src: Path, dst: Path) -> None:
        calls.append(src)
        if len(calls) == 3:
            raise OSError("disk full")
        copy(src, dst)

    monkeypatch.setattr(bundle_module, "_copy_synced", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        slot.install(make_bundle(tmp_path / "v2", "v2", seed=2))
    assert slot.current() == v1
    assert slot_dirs(slot.root) == [v1.root.name]


def test_bundle_tampered_after_install_is_detected_and_repaired_by_reinstalling(tmp_path: Path) -> None:
    slot = BundleSlot(tmp_path / "slot", KEY.public_key())
    source = make_bundle(tmp_path / "v1")
    installed = slot.install(source)
    flip_byte(installed.root)
    with pytest.raises(BundleTampered):
        slot.current()
    assert slot.install(source) == installed
    assert slot.current() == installed
    assert slot_dirs(slot.root) == [installed.root.name]


def test_current_refuses_a_garbled_pointer(tmp_path: Path) -> None:
    slot = BundleSlot(tmp_path / "slot", KEY.public_key())
    slot.install(make_bundle(tmp_path / "v1"))
    (slot.root / "CURRENT").write_text("../../etc\n")
    with pytest.raises(BundleFormatError, match="invalid bundle name"):
        slot.current()


def test_prune_keeps_current_and_latest(tmp_path: Path) -> None:
    slot = BundleSlot(tmp_path / "slot", KEY.public_key())
    names = []
    for i, version in enumerate(["v1", "v2", "v3"]):
        names.append(slot.install(make_bundle(tmp_path / version, version, seed=i + 1)).root.name)
        os.utime(slot.root / names[-1], ns=(i * 10**9, i * 10**9))
    slot.install(make_bundle(tmp_path / "v1b", "v1", seed=1))  # identical to v1: switches back to it
    (slot.root / ".install-stale").mkdir()
    assert sorted(slot.prune(keep=2)) == sorted([".install-stale", names[1]])
    assert slot_dirs(slot.root) == sorted([names[0], names[2]])
    assert slot.current().root.name == names[0]
    with pytest.raises(ValueError):
        slot.prune(keep=0)


# --- errors and imports -------------------------------------------------------------------------------------


def test_bundle_errors_share_a_base() -> None:
    for error in (BundleSignatureError, BundleTampered, BundleFormatError):
        assert issubclass(error, BundleError)
