"""Data layer: dataset loaders -> one canonical :class:`InteractionLog`, explanation vocabularies, the
leave-one-out split and per-user partitions."""

from .errors import DataFormatError
from .generic import load_event_table, load_recbole_inter
from .log import ExplanationVocab, InteractionLog, ItemMeta, Ragged
from .registry import DATASETS, DEFAULT_DATASET, DatasetSpec, load_dataset

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "DataFormatError",
    "DatasetSpec",
    "ExplanationVocab",
    "InteractionLog",
    "ItemMeta",
    "Ragged",
    "load_dataset",
    "load_event_table",
    "load_recbole_inter",
]
