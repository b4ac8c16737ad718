"""The known datasets: where each is found, how it loads, and the counts its PROVENANCE.md states."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .amazon import load_amazon_beauty_5core, load_amazon_musical_instruments
from .generic import load_event_table, load_recbole_inter
from .locate import data_root, embedded_dir
from .log import InteractionLog
from .lrurec import load_lrurec_pickle
from .movielens import load_movielens_1m_lrurec, load_movielens_100k, load_movielens_latest_small

DEFAULT_DATASET = "movielens-latest-small"


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset known to tme-psr. ``expected`` = (users, items, events) as its PROVENANCE.md counts them."""

    name: str
    loader: Callable[[Path], InteractionLog]
    expected: tuple[int, int, int]
    time: str
    explanations: str
    embedded: bool = False

    def locate(self, data_dir: str | Path | None = None) -> Path | None:
        """The folder to load from: the shared data folder if it has this dataset, else the embedded copy."""
        root = data_root(data_dir)
        if root is not None and (root / self.name).is_dir():
            return root / self.name
        return embedded_dir(self.name) if self.embedded else None


def _lrurec(name: str) -> Callable[[Path], InteractionLog]:
    return lambda folder: load_lrurec_pickle(folder / "dataset.pkl", name)


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            "movielens-latest-small",
            load_movielens_latest_small,
            (610, 9724, 100836),
            "seconds",
            "user tags, else genre",
            embedded=True,
        ),
        DatasetSpec("movielens-100k", load_movielens_100k, (943, 1682, 100000), "seconds", "genre"),
        DatasetSpec("movielens-1m-lrurec", load_movielens_1m_lrurec, (6040, 3416, 999611), "order", "genre"),
        DatasetSpec(
            "amazon-beauty-sasrec-lrurec",
            _lrurec("amazon-beauty-sasrec-lrurec"),
            (52204, 57289, 394908),
            "order",
            "none",
        ),
        DatasetSpec(
            "amazon-beauty-5core",
            load_amazon_beauty_5core,
            (22363, 12101, 198502),
            "days",
            "brand/category attribute",
        ),
        DatasetSpec(
            "amazon-musical-instruments-5core",
            load_amazon_musical_instruments,
            (1429, 900, 10261),
            "days",
            "review phrases (EXTRA-style)",
        ),
        DatasetSpec(
            "amazon-video-games-sasrec-lrurec",
            _lrurec("amazon-video-games-sasrec-lrurec"),
            (31013, 23715, 287107),
            "order",
            "none",
        ),
    )
}


def load_dataset(name: str, data_dir: str | Path | None = None) -> InteractionLog:
    """Load a known dataset by name (see ``tmepsr data list``), or a user's own ``.inter`` / ``.csv`` /
    ``.parquet`` file by path, into an :class:`InteractionLog`."""
    path = Path(name)
    own_file = path.suffix in (".inter", ".csv", ".parquet", ".gz") or path.parent != Path(".")
    if name not in DATASETS and (path.is_file() or own_file):  # a path: a missing file says so
        return load_recbole_inter(path) if path.suffix == ".inter" else load_event_table(path)
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    folder = spec.locate(data_dir)
    if folder is None:
        where = data_root(data_dir)
        raise FileNotFoundError(
            f"dataset {name!r} not found (looked in {where or 'no data folder'}); set TMEPSR_DATA_DIR or "
            "pass --data-dir to the folder that holds it"
        )
    return spec.loader(folder)
