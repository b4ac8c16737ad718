"""The command line of a benchmark measured on trained checkpoints: each checkpoint gives one JSON row, kept in
``results/<name>.json`` (a checkpoint measured again replaces its row) with a markdown table beside it, both
written after every checkpoint."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"

Row = dict[str, Any]


def run(
    argv: list[str] | None,
    description: str,
    name: str,
    measure: Callable[[str, str | None], Row],
    markdown: Callable[[list[Row]], str],
) -> None:
    """Parse ``CHECKPOINT ... [--data-dir D] [--threads N]``, measure each checkpoint, print its row and rewrite
    ``results/<name>.{json,md}``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = RESULTS / f"{name}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    for checkpoint in args.checkpoints:
        row = measure(checkpoint, args.data_dir)
        rows = [r for r in rows if r["checkpoint"] != row["checkpoint"]] + [row]
        print(json.dumps(row), flush=True)
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(rows, indent=2) + "\n")
        (RESULTS / f"{name}.md").write_text(markdown(rows))
