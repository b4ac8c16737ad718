"""Where datasets live: the embedded default inside the package, and the shared data folder."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

DATA_DIR_ENV = "TMEPSR_DATA_DIR"


def embedded_dir(name: str) -> Path:
    """Folder of a dataset shipped inside the package (only ``movielens-latest-small``)."""
    return Path(str(resources.files("shared_model.data") / "resources" / name))


def data_root(explicit: str | Path | None = None) -> Path | None:
    """The shared data folder: ``explicit``, else ``$TMEPSR_DATA_DIR``, else ``../shared/data`` next to the
    current directory or the source checkout; ``None`` when none of them exists."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    checkout = Path(__file__).resolve().parents[2]
    for candidate in (Path.cwd() / ".." / "shared" / "data", checkout / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None
