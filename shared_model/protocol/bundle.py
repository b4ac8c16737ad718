"""The signed on-device bundle, the contract between the server that writes it and the devices that verify it.

A bundle is a directory::

    manifest.json   UTF-8 JSON object, sorted keys (written by ``server.release.sign_bundle``)
    manifest.sig    the raw 64-byte Ed25519 signature of the exact bytes of manifest.json
    <files>         every other regular file (ONNX graphs, JSON side files...), subfolders allowed

The manifest holds ``format_version`` (int, currently 4; ``docs/BUNDLE.md`` is the written contract), ``model_version`` (str: letters, digits, ``._+-``),
``opset`` (int), ``created`` (ISO-8601 UTC), ``files`` (``{posix relative name: {"sha256": hex, "bytes": int}}``
for every file except manifest.json and manifest.sig) and any extra JSON fields of the release (item-id map,
titles, explanation texts, graph spec...).

Trust model: a device pins the server's Ed25519 public key (shipped with the app). The signature covers the
manifest, and the manifest covers every other file by size and sha256, so one signature check plus the hashes
authenticate the whole bundle; unlisted files and symlinks are refused. ``verify_bundle`` checks the signature
before parsing anything, then the files; nothing is read from a bundle that fails. A file checked once can still
be replaced on disk later: ``Manifest.read`` re-checks a file's bytes as it returns them, and ``BundleSlot.current``
(``client_sdk.bundle_slot``) re-verifies the installed bundle each time it is loaded. There is no rollback protection beyond what the app
enforces with ``model_version``: any bundle signed by the pinned key is accepted. Imports neither torch nor flwr.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import DeviceRuntimeError

CATALOGUE = "catalogue.json.gz"  # the item ids, titles and explanation texts: gzip-compressed JSON
# older bundles (1: self-contained graphs, 2: personal initializers, 3: no history state) are refused
FORMAT_VERSION = 4
MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
REQUIRED_FIELDS = ("format_version", "model_version", "opset", "created", "files")
SIGNATURE_SIZE = 64
MAX_MANIFEST_BYTES = 256 * 2**20  # read whole before its signature is checked, so bounded
MODEL_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 2**20


class BundleError(DeviceRuntimeError):
    """Base class of every error verifying or installing a bundle."""


class BundleSignatureError(BundleError):
    """The signature is missing, malformed or does not match the manifest and the pinned key."""


class BundleTampered(BundleError):
    """A file differs from the signed manifest: changed, truncated, missing, unlisted, or not a regular file."""


class BundleFormatError(BundleError):
    """Not a bundle, a malformed manifest, or a format version this code does not read."""


@dataclass(frozen=True)
class Manifest:
    """A verified bundle: its folder, the parsed manifest (treat as read-only) and the manifest's sha256."""

    root: Path
    data: dict[str, Any]
    sha256: str  # of the manifest bytes; identifies the whole bundle, since the manifest hashes every file

    @property
    def format_version(self) -> int:
        return self.data["format_version"]

    @property
    def model_version(self) -> str:
        return self.data["model_version"]

    @property
    def opset(self) -> int:
        return self.data["opset"]

    @property
    def created(self) -> datetime:
        return datetime.fromisoformat(self.data["created"])

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.data["files"]

    def path(self, name: str) -> Path:
        """The path of a listed file; BundleFormatError if the bundle has no such file."""
        if name not in self.files:
            raise BundleFormatError(
                f"{self.root}: the bundle has no file {name!r} (it has {sorted(self.files)})"
            )
        return self.root / name

    def read(self, name: str) -> bytes:
        """A listed file's bytes, checked against the manifest as they are read (safe against later swaps)."""
        path = self.path(name)
        data = path.read_bytes()
        _check_digest(path, self.files[name], len(data), hashlib.sha256(data).hexdigest())
        return data


def load_public_key(source: Ed25519PublicKey | str | Path | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM bytes or text, or from the path of a PEM file (a key object is returned
    as is)."""
    if isinstance(source, Ed25519PublicKey):
        return source
    is_text = isinstance(source, str) and source.lstrip().startswith("-----BEGIN")
    if isinstance(source, bytes) or is_text:
        pem, label = (source.encode() if is_text else source), "the given PEM"
    else:
        if not Path(source).is_file():
            raise FileNotFoundError(
                f"no public key at {source}: pass the pinned Ed25519 key (the .pub.pem that `tmepsr keys` wrote)"
            )
        pem, label = Path(source).read_bytes(), str(source)
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise BundleSignatureError(f"{label} is not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleSignatureError(f"{label} is a {type(key).__name__}, not an Ed25519 public key")
    return key


def verify_bundle(bundle_dir: str | Path, public_key: Ed25519PublicKey) -> Manifest:
    """Check the signature, then the manifest, then every file's size and sha256; return the manifest."""
    if not isinstance(public_key, Ed25519PublicKey):
        raise TypeError(f"public_key must be an Ed25519PublicKey, got {type(public_key).__name__}")
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleFormatError(f"{root}: not a bundle directory")
    raw = _read_signed_manifest(root, public_key)
    data = _parse_manifest(raw, root)
    _check_files(root, data["files"])
    return Manifest(root=root, data=data, sha256=hashlib.sha256(raw).hexdigest())


def _parse_manifest(raw: bytes, root: Path) -> dict[str, Any]:
    """Decode and validate manifest bytes (the signature must already be checked)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleFormatError(f"{root}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BundleFormatError(f"{root}: {MANIFEST} is not a JSON object")
    _check_format_version(data.get("format_version"), root)
    missing = [field for field in REQUIRED_FIELDS if field not in data]
    if missing:
        raise BundleFormatError(f"{root}: {MANIFEST} lacks {missing}")
    _check_fields(data, root)
    return data


def walk_bundle(bundle_dir: Path) -> Iterator[tuple[str, Path]]:
    """Every entry under the folder that is not a real directory (files, symlinks...), by posix relative name,
    except manifest.json and manifest.sig at the top. Shared with ``server.release``."""
    for dirpath, dirnames, filenames in os.walk(bundle_dir):
        base = Path(dirpath)
        linked_dirs = [name for name in dirnames if (base / name).is_symlink()]  # listed, never followed
        for entry in sorted([*filenames, *linked_dirs]):
            name = (base / entry).relative_to(bundle_dir).as_posix()
            if name not in (MANIFEST, SIGNATURE):
                yield name, bundle_dir / name


def is_regular_file(path: Path) -> bool:
    """A regular file, not a symlink (to one) nor a device, FIFO or socket."""
    return not path.is_symlink() and path.is_file()


def hash_file(path: Path) -> dict[str, Any]:
    """The manifest entry of a file: ``{"sha256": hex, "bytes": size}``, read in chunks."""
    digest, size = _hash_file(path)
    return {"sha256": digest, "bytes": size}


def _read_signed_manifest(root: Path, public_key: Ed25519PublicKey) -> bytes:
    manifest, signature = root / MANIFEST, root / SIGNATURE
    if not is_regular_file(manifest):
        raise BundleFormatError(f"{root}: no {MANIFEST} (not a bundle)")
    if not is_regular_file(signature):
        raise BundleSignatureError(f"{root}: no {SIGNATURE} (the bundle is not signed)")
    if manifest.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleFormatError(f"{root}: {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    sig = signature.read_bytes()
    if len(sig) != SIGNATURE_SIZE:
        raise BundleSignatureError(f"{root}: {SIGNATURE} has {len(sig)} bytes, an Ed25519 signature has 64")
    raw = manifest.read_bytes()
    try:
        public_key.verify(sig, raw)
    except InvalidSignature:
        raise BundleSignatureError(
            f"{root}: the signature does not match {MANIFEST} and the pinned key "
            "(the manifest was modified, or another key signed it)"
        ) from None
    return raw


def _check_format_version(version: Any, root: Path) -> None:
    if type(version) is not int or version < 1:
        raise BundleFormatError(f"{root}: format_version must be a positive integer, got {version!r}")
    if version < FORMAT_VERSION:
        raise BundleFormatError(
            f"{root}: bundle format version {version} is older than this code reads ({FORMAT_VERSION}); "
            "re-export the bundle with this SDK (tmepsr export)"
        )
    if version > FORMAT_VERSION:
        raise BundleFormatError(
            f"{root}: bundle format version {version} is newer than this code reads ({FORMAT_VERSION}); "
            "update the SDK"
        )


def _check_fields(data: dict[str, Any], root: Path) -> None:
    model_version, opset, created, files = (
        data[key] for key in ("model_version", "opset", "created", "files")
    )
    if not isinstance(model_version, str) or not MODEL_VERSION_RE.fullmatch(model_version):
        raise BundleFormatError(
            f"{root}: invalid model_version {model_version!r} (want {MODEL_VERSION_RE.pattern})"
        )
    if type(opset) is not int or opset < 1:
        raise BundleFormatError(f"{root}: opset must be a positive integer, got {opset!r}")
    try:
        datetime.fromisoformat(created)
    except (TypeError, ValueError):
        raise BundleFormatError(f"{root}: created is not an ISO-8601 time: {created!r}") from None
    if not isinstance(files, dict):
        raise BundleFormatError(f"{root}: files must be an object of name -> {{sha256, bytes}}")
    for name, entry in files.items():
        _check_file_entry(name, entry, root)


def _check_file_entry(name: str, entry: Any, root: Path) -> None:
    parts = name.split("/")
    if name in (MANIFEST, SIGNATURE) or "\\" in name or any(part in ("", ".", "..") for part in parts):
        raise BundleFormatError(f"{root}: invalid file name {name!r} in the manifest")
    valid = (
        isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and _SHA256_RE.fullmatch(entry["sha256"])
        and type(entry.get("bytes")) is int
        and entry["bytes"] >= 0
    )
    if not valid:
        raise BundleFormatError(
            f"{root}: files[{name!r}] must be {{'sha256': 64 hex digits, 'bytes': int >= 0}}"
        )


def _check_files(root: Path, files: dict[str, dict[str, Any]]) -> None:
    present = dict(walk_bundle(root))
    unlisted = sorted(set(present) - set(files))
    if unlisted:
        raise BundleTampered(f"{root}: files not in the signed manifest: {unlisted}")
    missing = sorted(set(files) - set(present))
    if missing:
        raise BundleTampered(f"{root}: files listed in the manifest are missing: {missing}")
    for name, entry in files.items():
        _check_file(present[name], entry)


def _check_file(path: Path, entry: dict[str, Any]) -> None:
    if not is_regular_file(path):
        raise BundleTampered(f"{path}: not a regular file (symlinks and special files are refused)")
    digest, size = _hash_file(path)
    _check_digest(path, entry, size, digest)


def _check_digest(path: Path, entry: dict[str, Any], size: int, digest: str) -> None:
    if size != entry["bytes"]:
        raise BundleTampered(
            f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
        )
    if digest != entry["sha256"]:
        raise BundleTampered(f"{path}: sha256 differs from the signed manifest (the file was modified)")


def _hash_file(path: Path) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size
