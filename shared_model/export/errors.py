"""The export's error."""

from __future__ import annotations


class ExportError(RuntimeError):
    """The model cannot be exported, or an exported graph fails a check."""
