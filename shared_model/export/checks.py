"""Checks of exported graphs with ONNX's and onnxruntime's own tools."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx
import onnxruntime as ort

from .errors import ExportError


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """onnxruntime's converter prints progress and its sessions log optimizer notes: keep errors only."""
    ort.set_default_logger_severity(3)
    tools_log = logging.getLogger("ort_format_model.utils")
    level = tools_log.level
    tools_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tools_log.setLevel(level)
        ort.set_default_logger_severity(2)


def check_graphs(paths: Sequence[str | Path]) -> None:
    """Raise :class:`ExportError` unless every graph passes ``onnx.checker`` (full check), onnxruntime's
    mobile usability analysis and conversion to the ORT format (onnxruntime's own tools)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort
    from onnxruntime.tools.mobile_helpers import usability_checker

    logger = logging.getLogger("tmepsr.export.mobile")
    logger.setLevel(logging.WARNING)
    for path in map(Path, paths):
        steps = {
            "onnx.checker": lambda p=path: onnx.checker.check_model(p, full_check=True),
            "mobile usability": lambda p=path: usability_checker.analyze_model(p, logger=logger),
        }
        for what, run in steps.items():
            try:
                run()
            except Exception as exc:
                raise ExportError(f"{path.name} fails the {what} check: {exc}") from exc
        with tempfile.TemporaryDirectory() as tmp, _quiet_onnxruntime():
            try:
                convert_onnx_models_to_ort(path, Path(tmp), [OptimizationStyle.Fixed])
            except Exception as exc:
                raise ExportError(f"{path.name} does not convert to the ORT format: {exc}") from exc
            if not any(Path(tmp).rglob("*.ort")):
                raise ExportError(f"{path.name} does not convert to the ORT format (no .ort file written)")
