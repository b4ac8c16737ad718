"""``tmepsr data``: the known datasets and where they are found, a dataset's statistics."""

from __future__ import annotations

import argparse
import json

from .locate import DATA_DIR_HELP, data_root
from .registry import DATASETS, load_dataset
from .stats import log_stats


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``data list`` and ``data stats`` on the ``tmepsr`` subparsers."""
    data = sub.add_parser("data", help="datasets: list them, print statistics")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p_list = data_sub.add_parser("list", help="known datasets, where they are found, whether present")
    p_list.add_argument("--data-dir", help=DATA_DIR_HELP)
    p_list.set_defaults(func=_list)
    p_stats = data_sub.add_parser("stats", help="statistics of a dataset (a known name or a file path)")
    p_stats.add_argument("name", help="dataset name from 'tmepsr data list', or a .inter/.csv/.parquet file")
    p_stats.add_argument("--data-dir", help=DATA_DIR_HELP)
    p_stats.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p_stats.set_defaults(func=_stats)


def _list(args: argparse.Namespace) -> int:
    root = data_root(args.data_dir)
    print(f"shared data folder: {root or 'not found (set TMEPSR_DATA_DIR or --data-dir)'}")
    print(f"{'dataset':36} {'present':8} {'time':8} {'explanations':30} location")
    for spec in DATASETS.values():
        folder = spec.locate(args.data_dir)
        where = "embedded in the package" if folder and spec.embedded and root is None else (folder or "-")
        print(f"{spec.name:36} {'yes' if folder else 'no':8} {spec.time:8} {spec.explanations:30} {where}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    stats = log_stats(load_dataset(args.name, args.data_dir))
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    seq = stats["sequence_length"]
    span = " .. ".join(stats["time_span"]) if stats["time_span"] else "order only (no timestamps)"
    rows = [
        ("dataset", stats["name"]),
        ("users / items / events", f"{stats['users']:,} / {stats['items']:,} / {stats['events']:,}"),
        ("time", f"{stats['time']}: {span}"),
        (
            "sequence length",
            f"min {seq['min']}, mean {seq['mean']}, median {seq['median']:g}, "
            f"p90 {seq['p90']:g}, max {seq['max']}",
        ),
        ("users with val+test events", f"{stats['eval_users']:,}"),
        (
            "explanation vocabulary",
            f"{stats['explanation_vocab']:,} ids, {stats['explanation_coverage']:.1%} of events labelled",
        ),
        ("explanation rule", stats["explanation_rule"]),
    ]
    if "eval_users_last_two_tied" in stats:
        rows.append(
            ("last two events tied", f"{stats['eval_users_last_two_tied']:,} users (broken by item id)")
        )
    for key, value in rows:
        print(f"{key:28} {value}")
    return 0
