"""Where datasets live: the embedded default inside the package, and the shared data folder."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from importlib import metadata, resources
from pathlib import Path
from urllib.parse import unquote, urlparse

DATA_DIR_ENV = "TMEPSR_DATA_DIR"
# the --data-dir option's help, wherever a command reads datasets
DATA_DIR_HELP = f"shared data folder (default: ${DATA_DIR_ENV} or ../shared/data)"


def embedded_dir(name: str) -> Path:
    """Folder of a dataset shipped inside the package (only ``movielens-latest-small``). Under ``flwr run`` the
    code is imported from the Flower app bundle, which carries only code and configuration (Flower packs no
    data files); the dataset then comes from the installed package's own copy."""
    imported = Path(str(resources.files("shared_model.data") / "resources" / name))
    if imported.is_dir():
        return imported
    return next((p for p in _installed_copies(name) if p.is_dir()), imported)


def _installed_copies(name: str) -> Iterator[Path]:
    """Where the installed ``tme-psr`` distribution keeps ``name``: its files, and its source folder when it is
    an editable install."""
    for dist in metadata.distributions(name="tme-psr"):
        yield Path(str(dist.locate_file(f"shared_model/data/resources/{name}"))).absolute()
        url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
        if url.startswith("file://"):
            yield Path(unquote(urlparse(url).path)) / "shared_model" / "data" / "resources" / name


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
