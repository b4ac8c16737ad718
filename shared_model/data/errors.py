"""The one error type raised for malformed input data."""

from __future__ import annotations

from pathlib import Path


class DataFormatError(ValueError):
    """A data file is malformed. The message names the file and, where known, the line or record.

    Loaders raise it before returning anything, so a failed load never leaves a half-built log behind.
    """

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")
