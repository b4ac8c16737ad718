"""Bring-your-own data: RecBole atomic ``.inter`` files and plain CSV/Parquet event tables."""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import DataFormatError
from .log import ExplanationVocab, InteractionLog, Ragged
from .readers import parse_timestamp, read_csv_records

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
    """A CSV or Parquet table with columns ``user,item,timestamp[,explanation]``.

    ``explanation`` (optional) holds explanation texts: several per event separated by ``|``, or a list
    column in Parquet. The vocabulary is the sorted set of texts. Timestamps are unix seconds. An event
    repeated exactly (same user, item and timestamp) counts once: the first row is kept and a warning says
    how many were dropped (an export that logged a click twice must not weigh it twice).
    """
    path = Path(path)
    if path.suffix == ".parquet":
        rows = list(_parquet_records(path))
    else:
        rows = list(read_csv_records(path, ("user", "item", "timestamp")))
    if not rows:
        raise DataFormatError(path, "no events (a header and no rows)")
    rows = _without_repeats(rows, path)
    has_expl = "explanation" in rows[0][1]
    users = [r["user"] for _, r in rows]
    items = [r["item"] for _, r in rows]
    times = [parse_timestamp(str(r["timestamp"]), path, line) for line, r in rows]
    explanations, vocab = None, None
    if has_expl:
        per_event = [_labels(r["explanation"]) for _, r in rows]
        texts = sorted({t for ts in per_event for t in ts})
        index = {t: k for k, t in enumerate(texts)}
        explanations = Ragged.from_lists([[index[t] for t in ts] for ts in per_event])
        vocab = ExplanationVocab(tuple(texts), f"explanation column of {path.name}")
    return InteractionLog.from_events(name or path.stem, users, items, times, "seconds", explanations, vocab)


def _labels(value: object) -> list[str]:
    """Explanation texts of one event: a ``|``-separated string or a list (a Parquet list column)."""
    texts = value if isinstance(value, list | tuple) else str(value or "").split("|")
    return [str(t) for t in texts if t]


def _without_repeats(rows: list[tuple[int, dict]], path: Path) -> list[tuple[int, dict]]:
    """The rows with exact repeats of an earlier event (same user, item and timestamp) dropped."""
    seen: set[tuple[str, str, str]] = set()
    kept = []
    for line, row in rows:
        key = (str(row["user"]), str(row["item"]), str(row["timestamp"]).strip())
        if key not in seen:
            seen.add(key)
            kept.append((line, row))
    if len(kept) < len(rows):
        log.warning("%s: %d repeated events (same user, item and timestamp) counted once", path,
                    len(rows) - len(kept))  # fmt: skip
    return kept


def _parquet_records(path: Path):
    import pyarrow.parquet as pq  # imported here: only Parquet input needs it

    if not path.is_file():
        raise DataFormatError(path, "file not found")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise DataFormatError(path, f"cannot read Parquet ({exc})") from None
    missing = [c for c in ("user", "item", "timestamp") if c not in table.column_names]
    if missing:
        raise DataFormatError(path, f"missing column(s) {missing}; columns are {table.column_names}")
    for k, row in enumerate(table.to_pylist()):
        if any(row[c] is None for c in ("user", "item", "timestamp")):
            raise DataFormatError(path, "null user, item or timestamp", line=k + 1)
        yield k + 1, row
