"""Bring-your-own data: RecBole atomic ``.inter`` files and plain CSV/Parquet event tables."""

from __future__ import annotations

from pathlib import Path

from .errors import DataFormatError
from .log import ExplanationVocab, InteractionLog, Ragged
from .readers import parse_timestamp, read_csv_records


def _field(header_name: str) -> str:
    return header_name.split(":", 1)[0]


def load_recbole_inter(path: str | Path, name: str | None = None) -> InteractionLog:
    """A RecBole atomic ``.inter`` file (tab-separated, header ``user_id:token item_id:token ... timestamp:float``).

    Without a ``timestamp`` column the file order is kept (order-only data).
    """
    path = Path(path)
    records = list(read_csv_records(path, (), delimiter="\t"))
    header = list(records[0][1]) if records else []
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

    ``explanation`` (optional) holds explanation texts; several per event are separated by ``|``. The
    vocabulary is the sorted set of texts. Timestamps are unix seconds.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        rows = list(_parquet_records(path))
    else:
        rows = list(read_csv_records(path, ("user", "item", "timestamp")))
    has_expl = bool(rows) and "explanation" in rows[0][1]
    users = [r["user"] for _, r in rows]
    items = [r["item"] for _, r in rows]
    times = [parse_timestamp(str(r["timestamp"]), path, line) for line, r in rows]
    explanations, vocab = None, None
    if has_expl:
        per_event = [[t for t in str(r["explanation"] or "").split("|") if t] for _, r in rows]
        texts = sorted({t for ts in per_event for t in ts})
        index = {t: k for k, t in enumerate(texts)}
        explanations = Ragged.from_lists([[index[t] for t in ts] for ts in per_event])
        vocab = ExplanationVocab(tuple(texts), f"explanation column of {path.name}")
    return InteractionLog.from_events(name or path.stem, users, items, times, "seconds", explanations, vocab)


def _parquet_records(path: Path):
    import pyarrow.parquet as pq  # imported here: only Parquet input needs it

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
