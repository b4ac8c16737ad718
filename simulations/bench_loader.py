"""Benchmark: peak memory and time of loading a bring-your-own event table (``load_event_table``), as a
multiple of the file's size, for CSV and Parquet of the same events.

Each load runs in a fresh Python process; memory is its peak resident set after the load minus its resident
set after the imports (``ru_maxrss``), so what the loader allocates is measured, not the interpreter.

Run: ``python -m simulations.bench_loader [--rows 1000000]``; writes ``simulations/results/bench_loader.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"

_CHILD = """
import json, resource, sys, time
from shared_model.data import load_event_table
import pyarrow.parquet, pyarrow.csv  # imported before the baseline: the loader's own allocations are measured
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
log = load_event_table(sys.argv[1])
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"events": int(log.num_events), "seconds": seconds, "peak_bytes": (peak - base) * 1024}))
"""


def write_events(folder: Path, rows: int, seed: int = 0) -> dict[str, Path]:
    """A CSV and a Parquet file of ``rows`` events (5% of users' ids, 2% items, one or two labels each)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    users = rng.integers(0, max(rows // 20, 1), rows)
    items = rng.integers(0, max(rows // 50, 1), rows)
    times = 1_500_000_000 + rng.integers(0, 10**8, rows)
    labels = np.array(["action", "comedy|drama", "sci-fi", "romance|comedy", "thriller"])[
        rng.integers(0, 5, rows)
    ]
    table = pa.table({"user": users, "item": items, "timestamp": times, "explanation": labels})
    paths = {"csv": folder / "events.csv", "parquet": folder / "events.parquet"}
    pacsv.write_csv(table, paths["csv"])
    pq.write_table(table, paths["parquet"])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, path in write_events(Path(tmp), args.rows).items():
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, check=True
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            size = path.stat().st_size
            rows.append(
                {
                    "format": fmt,
                    "rows": args.rows,
                    "file_bytes": size,
                    **result,
                    "peak_vs_file": result["peak_bytes"] / size,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_loader.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    lines = [
        "| format | events | file MB | load s | peak memory MB | x file size |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['format']} | {r['events']:,} | {r['file_bytes'] / 2**20:.1f} | {r['seconds']:.1f} | "
        f"{r['peak_bytes'] / 2**20:.0f} | {r['peak_vs_file']:.1f} |"
        for r in rows
    ]
    (RESULTS / "bench_loader.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
