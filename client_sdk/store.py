"""Encrypted, atomic, versioned on-device store: a user's history, recurrent state and personal weights.

File layout (integers big-endian)::

    MAGIC b"TMEPSR-STORE\\0" | u16 format version | u8 kdf (0 raw key, 1 scrypt) | 16-byte salt | 12-byte nonce
    AES-256-GCM ciphertext of the payload, with the whole header as associated data

The payload (format 3) is UTF-8 JSON, readable from any language: ``items`` and ``times`` (integer lists),
``state`` and ``weights`` (name -> ``{"dtype", "shape", "data"}``, data the base64 of the row-major little-endian
bytes) and ``meta`` (an object); ``docs/BUNDLE.md`` (section 6) specifies it for other clients. Formats 1 and 2
held an ``np.savez`` archive (never pickle; format 1 without the state arrays); they are still read (format 1 with
an empty state) and the next save writes format 3. Imports neither torch nor flwr.

One writer at a time: :meth:`EncryptedStore.writer_lock` takes an exclusive advisory lock on ``<store>.lock``
(``flock`` on POSIX, ``msvcrt.locking`` on Windows; per open file, so a second writer in the same process is
refused too) and :class:`~client_sdk.runtime.Recommender` holds it while open: two writers each saving what they
loaded would silently drop the other's events.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from shared_model.files import atomic_write
from shared_model.protocol.errors import DeviceRuntimeError

MAGIC = b"TMEPSR-STORE\0"
KDF_RAW, KDF_SCRYPT = 0, 1
KEY_SIZE, SALT_SIZE, NONCE_SIZE, TAG_SIZE = 32, 16, 12, 16
_HEADER = struct.Struct(f">{len(MAGIC)}sHB{SALT_SIZE}s{NONCE_SIZE}s")
_NO_SALT = bytes(SALT_SIZE)


class StoreError(DeviceRuntimeError):
    """Base class of every error reading a store file."""


class WrongKeyOrTampered(StoreError):
    """Authentication failed: wrong key or passphrase, or the file was modified."""


class CorruptStore(StoreError):
    """Truncated, not a store file, or a malformed header or payload."""


class StoreInUse(StoreError):
    """Another writer (a second Recommender, another process) holds the store's lock."""


class UnsupportedStoreVersion(StoreError):
    """The file was written by a newer format version than this code understands."""


@dataclass(eq=False)
class DeviceRecord:
    """What one device keeps: its event history, recurrent state, personal weights and metadata."""

    items: np.ndarray  # int64 (n,) dense item ids, in event order
    times: np.ndarray  # int64 (n,) unix seconds
    state: dict[str, np.ndarray]  # recurrent state tensors, e.g. "lru", "time"
    weights: dict[str, np.ndarray]  # personal parameters by name
    meta: dict[str, Any]  # JSON-serialisable: bundle/model version, user id, round, ...


def key_from_passphrase(passphrase: str, salt: bytes) -> bytes:
    """Derive a 32-byte key from a passphrase with scrypt (n=2**15, r=8, p=1)."""
    return Scrypt(salt=salt, length=KEY_SIZE, n=2**15, r=8, p=1).derive(passphrase.encode("utf-8"))


class _Header(NamedTuple):
    version: int
    kdf: int
    salt: bytes
    nonce: bytes

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, self.version, self.kdf, self.salt, self.nonce)


class EncryptedStore:
    """One AES-256-GCM encrypted file, keyed by a raw 32-byte key or by a passphrase (scrypt, salt in header)."""

    FORMAT_VERSION = 3

    def __init__(self, path: str | Path, key: bytes | None = None, passphrase: str | None = None):
        if (key is None) == (passphrase is None):
            raise ValueError("give exactly one of key and passphrase")
        if key is not None and (not isinstance(key, bytes) or len(key) != KEY_SIZE):
            raise ValueError(f"key must be {KEY_SIZE} bytes")
        if passphrase is not None and not passphrase:
            raise ValueError("passphrase must not be empty")
        self.path = Path(path)
        self._key = key
        self._passphrase = passphrase
        self._derived: tuple[bytes, bytes] | None = None  # (salt, key) of the last scrypt derivation

    def exists(self) -> bool:
        """Whether the store file exists (it may still fail to load)."""
        return self.path.is_file()

    def load(self) -> DeviceRecord:
        """Read, authenticate and decode the file; FileNotFoundError if it does not exist."""
        blob = self.path.read_bytes()
        header = _parse_header(blob, self.path)
        key = self._key_for(header)
        try:
            payload = AESGCM(key).decrypt(header.nonce, blob[_HEADER.size :], blob[: _HEADER.size])
        except InvalidTag:
            raise WrongKeyOrTampered(
                f"{self.path}: wrong key or passphrase, or the file was modified"
            ) from None
        return _decode_payload(payload, header.version, self.path)

    def save(self, record: DeviceRecord) -> None:
        """Validate, encrypt and atomically replace the file; nothing is written if validation fails."""
        payload = _encode_payload(record)
        kdf, salt = (KDF_RAW, _NO_SALT) if self._passphrase is None else (KDF_SCRYPT, self._salt_for_save())
        header = _Header(self.FORMAT_VERSION, kdf, salt, os.urandom(NONCE_SIZE))
        atomic_write(self.path, _seal(header, self._key_for(header), payload))

    def writer_lock(self) -> WriterLock:
        """Take this store's writer lock (held until :meth:`WriterLock.release`); :class:`StoreInUse` if another
        writer holds it."""
        return WriterLock(self.path.with_name(self.path.name + ".lock"))

    def update(self, fn: Callable[[DeviceRecord], DeviceRecord]) -> DeviceRecord:
        """Load, apply ``fn`` and save its result (under :meth:`writer_lock`); returns the saved record."""
        lock = self.writer_lock()
        try:
            record = fn(self.load())
            self.save(record)
        finally:
            lock.release()
        return record

    def _key_for(self, header: _Header) -> bytes:
        if header.kdf == KDF_RAW:
            if self._key is None:
                raise WrongKeyOrTampered(
                    f"{self.path}: the header says a raw key protects the file, but a passphrase was given"
                )
            return self._key
        if self._passphrase is None:
            raise WrongKeyOrTampered(
                f"{self.path}: the header says a passphrase protects the file, but a raw key was given"
            )
        if self._derived is None or self._derived[0] != header.salt:
            self._derived = (header.salt, key_from_passphrase(self._passphrase, header.salt))
        return self._derived[1]

    def _salt_for_save(self) -> bytes:
        """The salt already in use (derived, or in the file's header); a fresh one for a new file."""
        if self._derived is not None:
            return self._derived[0]
        with contextlib.suppress(OSError, StoreError):
            with self.path.open("rb") as fh:
                header = _parse_header(fh.read(_HEADER.size), self.path)
            if header.kdf == KDF_SCRYPT:
                return header.salt
        return os.urandom(SALT_SIZE)


class WriterLock:
    """An exclusive, non-blocking advisory lock on ``path``, released by :meth:`release` or when the object is
    garbage-collected (its file closes); the lock file itself is left in place (removing it would race)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a+b")  # noqa: SIM115 (held open: the lock lives as long as the file)
        try:
            _lock(self._file)
        except OSError:
            self._file.close()
            raise StoreInUse(
                f"{path.with_suffix('')}: another writer has this store open (close that Recommender first)"
            ) from None

    def release(self) -> None:
        """Release the lock (idempotent)."""
        self._file.close()


def _lock(fh: Any) -> None:
    if os.name == "nt":
        import msvcrt

        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _parse_header(blob: bytes, path: Path) -> _Header:
    if len(blob) < _HEADER.size:
        raise CorruptStore(f"{path}: {len(blob)} bytes is shorter than a store header ({_HEADER.size} bytes)")
    magic, version, kdf, salt, nonce = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptStore(f"{path}: not a tme-psr store (bad magic)")
    if version > EncryptedStore.FORMAT_VERSION:
        raise UnsupportedStoreVersion(
            f"{path}: format version {version} is newer than this code reads ({EncryptedStore.FORMAT_VERSION})"
        )
    if version < 1:
        raise CorruptStore(f"{path}: invalid format version {version}")
    if kdf not in (KDF_RAW, KDF_SCRYPT):
        raise CorruptStore(f"{path}: unknown key derivation {kdf}")
    return _Header(version, kdf, salt, nonce)


def _seal(header: _Header, key: bytes, payload: bytes) -> bytes:
    head = header.pack()
    return head + AESGCM(key).encrypt(header.nonce, payload, head)


ARRAY_DTYPES = ("float32", "float64", "int32", "int64", "bool")  # what a format-3 payload may hold
MAX_JSON_INT = 2**53  # items and times are below it: exact as a JavaScript number
_PAYLOAD_KEYS = {"items", "times", "state", "weights", "meta"}


def _encode_payload(record: DeviceRecord) -> bytes:
    """The format-3 payload: UTF-8 JSON (``docs/BUNDLE.md``, section 6)."""
    items = _int64_vector("items", record.items)
    times = _int64_vector("times", record.times)
    for name, values in (("items", items), ("times", times)):
        if len(values) and not (values.min() >= 0 and values.max() < MAX_JSON_INT):
            raise ValueError(f"{name} must be in [0, 2**53) (exact in every language's JSON numbers)")
    if len(items) != len(times):
        raise ValueError(f"items ({len(items)}) and times ({len(times)}) differ in length")
    payload = {"items": items.tolist(), "times": times.tolist(), "meta": json.loads(_meta_json(record.meta))}
    for group in ("state", "weights"):
        payload[group] = {
            name: _array_json(_finite_array(group, name, value))
            for name, value in getattr(record, group).items()
        }
    return json.dumps(payload, separators=(",", ":")).encode()


def _array_json(arr: np.ndarray) -> dict[str, Any]:
    little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    data = base64.b64encode(np.ascontiguousarray(little).tobytes()).decode("ascii")
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": data}


def _decode_payload(payload: bytes, version: int, path: Path) -> DeviceRecord:
    if version < 3:
        return _decode_npz_payload(payload, version, path)
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptStore(f"{path}: unreadable payload ({exc})") from None
    if not isinstance(data, dict) or set(data) != _PAYLOAD_KEYS:
        raise CorruptStore(f"{path}: the payload must be an object with exactly {sorted(_PAYLOAD_KEYS)}")
    items, times = (_json_int_vector(data[key], key, path) for key in ("items", "times"))
    if items.shape != times.shape:
        raise CorruptStore(f"{path}: items/times are not two int64 vectors of the same length")
    if not isinstance(data["meta"], dict):
        raise CorruptStore(f"{path}: meta is not a JSON object")
    groups = {}
    for group in ("state", "weights"):
        if not isinstance(data[group], dict):
            raise CorruptStore(f"{path}: {group} is not a JSON object")
        groups[group] = {
            name: _json_array(value, f"{group}[{name!r}]", path) for name, value in data[group].items()
        }
    return DeviceRecord(items, times, groups["state"], groups["weights"], data["meta"])


def _json_int_vector(values: Any, name: str, path: Path) -> np.ndarray:
    if not isinstance(values, list) or not all(type(v) is int and 0 <= v < MAX_JSON_INT for v in values):
        raise CorruptStore(f"{path}: {name} is not a list of integers in [0, 2**53)")
    return np.array(values, dtype=np.int64)


def _json_array(value: Any, label: str, path: Path) -> np.ndarray:
    """One ``{"dtype", "shape", "data"}`` entry as an array; CorruptStore unless well-formed and finite."""
    valid = (
        isinstance(value, dict)
        and set(value) == {"dtype", "shape", "data"}
        and value["dtype"] in ARRAY_DTYPES
        and isinstance(value["shape"], list)
        and all(type(n) is int and n >= 0 for n in value["shape"])
        and isinstance(value["data"], str)
    )
    if not valid:
        raise CorruptStore(f"{path}: {label} is not a {{dtype in {ARRAY_DTYPES}, shape, data}} array")
    try:
        raw = base64.b64decode(value["data"], validate=True)
    except ValueError:
        raise CorruptStore(f"{path}: {label} data is not base64") from None
    dtype = np.dtype(value["dtype"]).newbyteorder("<")
    if len(raw) != dtype.itemsize * int(np.prod(value["shape"], dtype=np.int64)):
        raise CorruptStore(f"{path}: {label} has {len(raw)} bytes of data, not what its shape needs")
    arr = np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="), copy=True).reshape(value["shape"])
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise CorruptStore(f"{path}: {label} contains NaN or Inf")
    return arr


def _decode_npz_payload(payload: bytes, version: int, path: Path) -> DeviceRecord:
    """Formats 1 and 2: an ``np.savez`` archive (format 1 without state arrays)."""
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        meta = json.loads(str(arrays.pop("meta")))
        items, times = arrays.pop("items"), arrays.pop("times")
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CorruptStore(f"{path}: unreadable payload ({exc})") from None
    if items.dtype != np.int64 or times.dtype != np.int64 or items.shape != times.shape or items.ndim != 1:
        raise CorruptStore(f"{path}: items/times are not two int64 vectors of the same length")
    if not isinstance(meta, dict):
        raise CorruptStore(f"{path}: meta is not a JSON object")
    groups: dict[str, dict[str, np.ndarray]] = {"state": {}, "weights": {}}
    for key, value in arrays.items():
        group, _, name = key.partition("/")
        if group not in groups or not name or (group == "state" and version == 1):
            raise CorruptStore(f"{path}: unexpected payload entry {key!r}")
        groups[group][name] = value
    return DeviceRecord(items=items, times=times, state=groups["state"], weights=groups["weights"], meta=meta)


def _int64_vector(name: str, values: Any) -> np.ndarray:
    """``values`` as a 1-D int64 array; integral floats are accepted, fractions, NaN and overflow are not."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.unsignedinteger):
        if arr.size and arr.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name} has values beyond int64")
    elif np.issubdtype(arr.dtype, np.floating):
        in_range = (arr >= -(2.0**63)) & (arr < 2.0**63)
        if not np.all(np.isfinite(arr) & in_range & (arr == np.round(arr))):
            raise ValueError(
                f"{name} must hold whole numbers within int64 (found fractions, NaN or overflow)"
            )
    elif not np.issubdtype(arr.dtype, np.signedinteger):
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _finite_array(group: str, name: Any, value: Any) -> np.ndarray:
    label = f"{group}[{name!r}]"
    if not isinstance(name, str) or not name:
        raise ValueError(f"{label}: names must be non-empty strings")
    arr = np.asarray(value)
    if arr.dtype.name not in ARRAY_DTYPES:
        raise ValueError(f"{label} must have a dtype in {ARRAY_DTYPES}, got {arr.dtype}")
    if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
        raise ValueError(f"{label} contains NaN or Inf")
    return arr


def _meta_json(meta: Mapping[str, Any]) -> str:
    try:
        text = json.dumps(meta, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta is not JSON-serialisable: {exc}") from None
    if not isinstance(meta, dict) or json.loads(text) != meta:
        raise ValueError("meta must be a dict that survives a JSON round trip (str keys, lists not tuples)")
    return text


def _write_v1(path: str | Path, record: DeviceRecord, key: bytes) -> None:
    """Write ``record`` (without its state) as a format-1 file with a raw key: fixtures for upgrade tests."""
    arrays = {f"weights/{name}": np.asarray(value) for name, value in record.weights.items()}
    arrays["items"], arrays["times"] = record.items, record.times
    arrays["meta"] = np.array(_meta_json(record.meta))
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    header = _Header(1, KDF_RAW, _NO_SALT, os.urandom(NONCE_SIZE))
    atomic_write(Path(path), _seal(header, key, buf.getvalue()))
