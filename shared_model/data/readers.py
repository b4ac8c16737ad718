"""Low-level, defensive file readers shared by every dataset loader.

Each reader turns I/O and parsing problems (missing columns, non-numeric ids, truncated gzip, unsafe
pickles) into a :class:`DataFormatError` that names the file and the line or record.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import pickle
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DataFormatError


def read_text_lines(path: Path) -> list[str]:
    """All lines of a text or ``.gz`` file; a truncated or corrupt gzip raises :class:`DataFormatError`."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise DataFormatError(path, "file not found") from None
    except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataFormatError(path, f"cannot read compressed data ({exc})") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (spreadsheet exports) is not part of the header
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.splitlines()


def read_csv_records(
    path: Path, required: tuple[str, ...], delimiter: str = ","
) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line_number, row)`` for a CSV file with a header; checks the header has ``required``."""
    lines = read_text_lines(path)
    if not lines:
        raise DataFormatError(path, "empty file (no header)")
    reader = csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter)
    header = [h.strip() for h in next(reader)]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataFormatError(path, f"missing column(s) {missing}; header is {header}", line=1)
    for lineno, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataFormatError(path, f"expected {len(header)} fields, found {len(row)}", line=lineno)
        yield lineno, dict(zip(header, row, strict=True))


def parse_int(value: str, path: Path, line: int | None, what: str) -> int:
    """``int(value)`` or a :class:`DataFormatError` naming ``what`` and where."""
    try:
        return int(value.strip())
    except (ValueError, AttributeError):
        raise DataFormatError(path, f"{what} is not an integer: {value!r}", line=line) from None


MAX_TIMESTAMP = 2**40  # unix seconds accepted (year 36,812); millisecond timestamps of today exceed it


def milliseconds_hint(value: float) -> str:
    """A hint when an out-of-range timestamp looks like milliseconds ('' otherwise)."""
    return (
        " (milliseconds? timestamps are unix seconds)"
        if MAX_TIMESTAMP <= value < 1000 * MAX_TIMESTAMP
        else ""
    )


def parse_timestamp(value: str, path: Path, line: int | None) -> int:
    """Unix seconds from an integer or float string; negative or non-finite values are rejected."""
    try:
        ts = float(value.strip())
    except (ValueError, AttributeError):
        raise DataFormatError(path, f"timestamp is not a number: {value!r}", line=line) from None
    if not (0 <= ts < MAX_TIMESTAMP):
        raise DataFormatError(
            path, f"timestamp out of range [0, 2**40): {value!r}{milliseconds_hint(ts)}", line=line
        )
    return int(ts)


def read_json(path: Path) -> Any:
    """A JSON document; syntax errors name the line."""
    lines = read_text_lines(path)
    try:
        return json.loads("\n".join(lines))
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, f"invalid JSON ({exc.msg})", line=exc.lineno) from None


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global: only dicts, lists, tuples, sets, numbers and strings load."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"blocked global {module}.{name}")


def load_plain_pickle(path: Path) -> Any:
    """Load a pickle that may contain plain data only (never code or class instances)."""
    try:
        with open(path, "rb") as fh:
            return _PlainDataUnpickler(fh).load()
    except FileNotFoundError:
        raise DataFormatError(path, "file not found") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise DataFormatError(path, f"not a plain-data pickle ({exc})") from None
