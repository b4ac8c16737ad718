"""The device's slot of installed bundles: install a verified copy, switch to it atomically, keep the last
ones, and re-verify the current bundle each time it is loaded (the bundle contract:
:mod:`shared_model.protocol.bundle`)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared_model.files import atomic_write, fsync_dir
from shared_model.protocol.bundle import (
    MANIFEST,
    MODEL_VERSION_RE,
    SIGNATURE,
    BundleError,
    BundleFormatError,
    BundleTampered,
    Manifest,
    verify_bundle,
)

_SHORT_HASH_RE = re.compile(r"[0-9a-f]{12}")
_CHUNK = 2**20


class BundleSlot:
    """The bundles installed on a device, and which one is current.

    Layout of ``root``::

        CURRENT                          the current bundle's folder name and a newline (replaced atomically)
        <model_version>-<12 hex>/        one installed bundle; the hex is the start of its manifest's sha256
        .install-*/ .old-*/              leftovers of an interrupted install, removed by ``prune``

    Every bundle is verified against the pinned key when installed and each time ``current`` loads it. Not
    locked against concurrent installers in other processes.
    """

    POINTER = "CURRENT"

    def __init__(self, root: str | Path, public_key: Ed25519PublicKey):
        self.root = Path(root)
        self.public_key = public_key

    def install(self, src_dir: str | Path) -> Manifest:
        """Verify ``src_dir``, copy it in, verify the copy and make it current. On any error the current
        bundle is unchanged and the error propagates."""
        source = verify_bundle(src_dir, self.public_key)
        dest = self.root / f"{source.model_version}-{source.sha256[:12]}"
        if not self._is_intact(dest, source.sha256):
            self._copy_in(source, dest)
        atomic_write(self.root / self.POINTER, f"{dest.name}\n".encode())
        return Manifest(root=dest, data=source.data, sha256=source.sha256)

    def current(self) -> Manifest | None:
        """The current bundle, re-verified; None if nothing is installed. Raises if it was tampered with."""
        pointer = self.root / self.POINTER
        if not pointer.exists():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        if not _is_bundle_dir_name(name):
            raise BundleFormatError(f"{pointer}: invalid bundle name {name!r}")
        return verify_bundle(self.root / name, self.public_key)

    def prune(self, keep: int = 2) -> list[str]:
        """Remove all but the current bundle and the ``keep - 1`` latest other ones, and install leftovers;
        return the removed folder names."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        pointer = self.root / self.POINTER
        current = pointer.read_text(encoding="utf-8").strip() if pointer.exists() else None
        folders = [entry for entry in self.root.iterdir() if entry.is_dir() and not entry.is_symlink()]
        leftovers = [entry for entry in folders if entry.name.startswith((".install-", ".old-"))]
        others = [entry for entry in folders if _is_bundle_dir_name(entry.name) and entry.name != current]
        others.sort(key=lambda entry: (entry.stat().st_mtime_ns, entry.name), reverse=True)
        removed = leftovers + others[keep - 1 if current else keep :]
        for entry in removed:
            shutil.rmtree(entry)
        return [entry.name for entry in removed]

    def _is_intact(self, dest: Path, sha256: str) -> bool:
        """Whether ``dest`` already holds this exact bundle, unmodified (reinstalling is then a no-op copy)."""
        try:
            return dest.is_dir() and verify_bundle(dest, self.public_key).sha256 == sha256
        except BundleError:
            return False

    def _copy_in(self, source: Manifest, dest: Path) -> None:
        """Copy into a temp folder, verify the copy, then rename it to ``dest`` (replacing a damaged one)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".install-", dir=self.root))
        try:
            for name in [MANIFEST, SIGNATURE, *source.files]:
                _copy_synced(source.root / name, tmp / name)
            copy = verify_bundle(tmp, self.public_key)
            if copy.sha256 != source.sha256:
                raise BundleTampered(f"{source.root}: the bundle changed while it was being installed")
            for dirpath, _, _ in os.walk(tmp):
                fsync_dir(Path(dirpath))
            _replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _is_bundle_dir_name(name: str) -> bool:
    version, sep, short = name.rpartition("-")
    return bool(sep and MODEL_VERSION_RE.fullmatch(version) and _SHORT_HASH_RE.fullmatch(short))


def _copy_synced(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as fin, dst.open("xb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)
        fout.flush()
        os.fsync(fout.fileno())


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``; a folder already at ``dest`` is moved aside first and then removed."""
    old = dest.with_name(f".old-{uuid.uuid4().hex}") if dest.exists() else None
    if old is not None:
        dest.rename(old)
    tmp.rename(dest)
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
