"""Release signing: the server's Ed25519 key pair, and signing a bundle folder for devices.

The bundle format and its checks live in ``shared_model.protocol.bundle``; ``sign_bundle`` verifies its own
output with them, so a bundle it returns from is one a device accepts. Key files: ``bundle_signing_key.pem``
(PKCS8, encrypted with a passphrase, mode 0600; stays on the release machine) and ``bundle_signing_key.pub.pem``
(SubjectPublicKeyInfo; shipped with the app and pinned by devices).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared_model.files import atomic_write
from shared_model.protocol.bundle import (
    FORMAT_VERSION,
    MANIFEST,
    MODEL_VERSION_RE,
    REQUIRED_FIELDS,
    SIGNATURE,
    hash_file,
    is_regular_file,
    verify_bundle,
    walk_bundle,
)

PRIVATE_KEY_FILE = "bundle_signing_key.pem"
PUBLIC_KEY_FILE = "bundle_signing_key.pub.pem"


class KeyFileError(ValueError):
    """A private key file that cannot be used: not a PEM private key, not encrypted, or not Ed25519."""


class WrongPassphrase(KeyFileError):
    """The passphrase does not decrypt the private key (or the encrypted key file is damaged)."""


def generate_keys(out_dir: str | Path, passphrase: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair into ``out_dir``; return ``(private key path, public key path)``."""
    if not passphrase:
        raise ValueError("the passphrase must not be empty: it encrypts the release signing key")
    out = Path(out_dir)
    private_path, public_path = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    existing = [str(path) for path in (private_path, public_path) if path.exists() or path.is_symlink()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing} already exist; replace them with overwrite=True (tmepsr keys --overwrite) "
            "(devices that pin the old public key will then refuse new bundles)"
        )
    key = Ed25519PrivateKey.generate()
    encryption = serialization.BestAvailableEncryption(passphrase.encode("utf-8"))
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write(
        private_path, private_pem
    )  # the temp file is created 0600, so the key is never readable by others
    os.chmod(private_path, 0o600)
    atomic_write(public_path, public_pem)
    os.chmod(public_path, 0o644)
    return private_path, public_path


def load_private_key(path: str | Path, passphrase: str) -> Ed25519PrivateKey:
    """Decrypt the release signing key; WrongPassphrase or KeyFileError with the reason when it cannot."""
    pem = Path(path).read_bytes()
    try:
        key = serialization.load_pem_private_key(pem, passphrase.encode("utf-8"))
    except TypeError:  # cryptography's way of saying the key is not encrypted
        raise KeyFileError(f"{path}: the private key is not passphrase-protected; refusing it") from None
    except ValueError:
        if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in pem:
            raise WrongPassphrase(f"{path}: wrong passphrase (or a damaged key file)") from None
        raise KeyFileError(f"{path}: not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}, not an Ed25519 private key")
    return key


def sign_bundle(
    bundle_dir: str | Path,
    private_key: Ed25519PrivateKey,
    *,
    model_version: str,
    opset: int,
    extra: Mapping[str, Any] | None = None,
    created: datetime | None = None,
) -> dict[str, Any]:
    """Hash every file under ``bundle_dir``, write manifest.json and manifest.sig, check the result as a device
    would, and return the manifest as written. ``created`` (timezone-aware) defaults to now."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    extra = dict(extra or {})
    _check_release_fields(model_version, opset, extra)
    manifest = {
        **extra,
        "format_version": FORMAT_VERSION,
        "model_version": model_version,
        "opset": opset,
        "created": _utc_iso(created or datetime.now(UTC)),
        "files": _hash_files(root),
    }
    raw = _encode_manifest(manifest)
    (root / SIGNATURE).unlink(missing_ok=True)  # never leave a stale signature next to a new manifest
    atomic_write(root / MANIFEST, raw)
    atomic_write(root / SIGNATURE, private_key.sign(raw))
    return verify_bundle(root, private_key.public_key()).data


def _check_release_fields(model_version: str, opset: int, extra: dict[str, Any]) -> None:
    if not isinstance(model_version, str) or not MODEL_VERSION_RE.fullmatch(model_version):
        raise ValueError(f"model_version must match {MODEL_VERSION_RE.pattern}, got {model_version!r}")
    if type(opset) is not int or opset < 1:
        raise ValueError(f"opset must be a positive integer, got {opset!r}")
    reserved = sorted(set(extra) & set(REQUIRED_FIELDS))
    if reserved:
        raise ValueError(f"extra must not set the manifest's own fields {reserved}")


def _hash_files(root: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for name, path in walk_bundle(root):
        if not is_regular_file(path):
            raise ValueError(
                f"{path}: bundles hold regular files only (symlinks and special files are refused)"
            )
        files[name] = hash_file(path)
    return files


def _utc_iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("created must be timezone-aware")
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _encode_manifest(manifest: dict[str, Any]) -> bytes:
    """Deterministic bytes: sorted keys, UTF-8, no NaN, one trailing newline."""
    try:
        text = json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False)
        return (text + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:  # includes UnicodeEncodeError (lone surrogates)
        raise ValueError(f"the manifest (extra) is not JSON-serialisable: {exc}") from None
