"""Bring-your-own data: RecBole atomic ``.inter`` files and plain CSV/Parquet event tables."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataFormatError
from .log import ExplanationVocab, InteractionLog, Ragged
from .readers import MAX_TIMESTAMP, parse_timestamp, read_csv_records

log = logging.getLogger(__name__)


def _field(header_name: str) -> str:
    return header_name.split(":", 1)[0]


def load_recbole_inter(path: str | Path, name: str | None = None) -> InteractionLog:
    """A RecBole atomic ``.inter`` file (tab-separated, header ``user_id:token item_id:token ... timestamp:float``).

    Without a ``timestamp`` column the file order is kept (order-only data).
    """
    path = Path(path)
    records = list(read_csv_records(path, (), delimiter="\t"))
    if not records:
        raise DataFormatError(path, "no events (a header and no rows)")
    header = list(records[0][1])
    fields = {_field(h): h for h in header}
    for needed in ("user_id", "item_id"):
        if needed not in fields:
            raise DataFormatError(path, f"missing column {needed}:token; header is {header}", line=1)
    has_time = "timestamp" in fields
    users = [r[fields["user_id"]] for _, r in records]
    items = [r[fields["item_id"]] for _, r in records]
    times = [parse_timestamp(r[fields["timestamp"]], path, line) for line, r in records] if has_time else None
    return InteractionLog.from_events(
        name or path.stem, users, items, times, "seconds" if has_time else "order"
    )


def load_event_table(path: str | Path, name: str | None = None) -> InteractionLog:
    """A CSV (optionally ``.gz``) or Parquet table with columns ``user,item,timestamp[,explanation]``.

    ``explanation`` (optional) holds explanation texts: several per event separated by ``|``, or a list
    column in Parquet. The vocabulary is the sorted set of texts. Timestamps are unix seconds. An event
    repeated exactly (same user, item and timestamp) counts once: the first row is kept and a warning says
    how many were dropped (an export that logged a click twice must not weigh it twice). Read column by column
    with pyarrow (CSV ids as strings, Parquet ids as stored), without a Python object per row.
    """
    path = Path(path)
    table, first_line = _read_table(path)
    users, user_codes = _ids(table["user"])
    items, item_codes = _ids(table["item"])
    times = _timestamps(table["timestamp"], path, first_line)
    explanations, vocab = None, None
    if "explanation" in table.column_names:
        explanations, vocab = _explanations(table["explanation"], path)
    del table
    keep = _first_occurrences(user_codes, item_codes, times, path)
    if keep is not None:
        users, items, times = users[keep], items[keep], times[keep]
        explanations = explanations.take(keep) if explanations is not None else None
    return InteractionLog.from_events(name or path.stem, users, items, times, "seconds", explanations, vocab)


def _read_table(path: Path) -> tuple[Any, int]:
    """The event table (one chunk per column) and the file line of its first row (CSV 2, Parquet row 1)."""
    import pyarrow as pa  # imported here: only bring-your-own tables need it
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataFormatError(path, "file not found")
    parquet = path.suffix == ".parquet"
    try:
        if parquet:
            table = pq.read_table(path)
        else:  # ids and times as text, as written (a BOM is skipped, .gz decompressed)
            types = {c: pa.string() for c in (*_COLUMNS, "explanation")}
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataFormatError(path, f"cannot read {'Parquet' if parquet else 'CSV'} ({exc})") from None
    missing = [c for c in _COLUMNS if c not in table.column_names]
    if missing:
        raise DataFormatError(path, f"missing column(s) {missing}; columns are {table.column_names}", line=1)
    if table.num_rows == 0:
        raise DataFormatError(path, "no events (a header and no rows)")
    table = table.combine_chunks()
    for column in _COLUMNS:
        nulls = table[column].is_null().to_numpy(zero_copy_only=False)
        if nulls.any():
            line = int(np.flatnonzero(nulls)[0]) + (1 if parquet else 2)
            raise DataFormatError(path, f"null {column}", line=line)
    return table, 1 if parquet else 2


_COLUMNS = ("user", "item", "timestamp")


def _ids(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """Source ids (strings share one object per distinct id; numbers as stored) and integer codes of them."""
    import pyarrow as pa

    array = column.combine_chunks()
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        encoded = array.dictionary_encode()
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        return encoded.dictionary.to_numpy(zero_copy_only=False)[codes], codes
    values = array.to_numpy(zero_copy_only=False)
    return values, values


def _timestamps(column: Any, path: Path, first_line: int) -> np.ndarray:
    """Unix seconds (int64); a value that is not a number in [0, 2**40) is an error naming its line."""
    import pyarrow as pa

    try:
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:  # some value is not a number as Arrow reads them: the readers' rule, line by line
        return np.array(
            [parse_timestamp(str(v), path, k + first_line) for k, v in enumerate(column.to_pylist())],
            dtype=np.int64,
        )
    bad = ~((values >= 0) & (values < MAX_TIMESTAMP))  # NaN is bad too
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        parse_timestamp(str(column[k].as_py()), path, k + first_line)  # raises, with the milliseconds hint
    return values.astype(np.int64)


def _explanations(column: Any, path: Path) -> tuple[Ragged, ExplanationVocab]:
    """Each event's explanation ids (texts split on ``|`` or a list column; empty texts dropped) and the
    sorted vocabulary."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = column.combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lists = column
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        lists = pc.split_pattern(column, "|")
    else:
        raise DataFormatError(path, f"explanation column must hold text or lists of text, not {column.type}")
    texts = pc.list_flatten(lists).cast(pa.string())
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    used = (
        pc.and_(pc.is_valid(texts), pc.not_equal(texts, "")).fill_null(False).to_numpy(zero_copy_only=False)
    )
    encoded = texts.filter(pa.array(used)).dictionary_encode()
    words = encoded.dictionary.to_pylist()
    rank = np.empty(len(words), dtype=np.int64)
    rank[np.argsort(np.array(words, dtype=object))] = np.arange(len(words))
    ids = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    ptr = np.zeros(len(column) + 1, dtype=np.int64)
    np.cumsum(np.bincount(parents[used], minlength=len(column)), out=ptr[1:])
    return Ragged(ptr, ids), ExplanationVocab(tuple(sorted(words)), f"explanation column of {path.name}")


def _first_occurrences(
    users: np.ndarray, items: np.ndarray, times: np.ndarray, path: Path
) -> np.ndarray | None:
    """Row indices without exact repeats (same user, item and timestamp; the first row kept), or None when
    there are none."""
    _, first = np.unique(np.stack([users, items, times]), axis=1, return_index=True)
    if len(first) == len(times):
        return None
    log.warning(
        "%s: %d repeated events (same user, item and timestamp) counted once", path, len(times) - len(first)
    )
    return np.sort(first)
