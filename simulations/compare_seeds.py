"""Paired comparison of two federated benchmark runs over seeds: per seed, a variant's validation and test
NDCG@10 relative to a baseline trained with the same seed, then the mean gap, its spread and standard error.

A latest-small run's final NDCG@10 moves by several percent between seeds (each round samples another cohort
and the 610 evaluation events are few), so a gap between two runs means something only paired by seed and
averaged over several. Seed ``S``'s results are read from ``simulations/results/<name>-seedS_runs.jsonl``
(seed 0: ``<name>_runs.jsonl``, the benchmark's default ``--name``/``--seed`` convention), the last federated
row of each file. Writes ``<out>.json`` and ``<out>.md``::

    python -m simulations.compare_seeds --base federated-dense-rerun \\
        --variant federated-int8-vectors --seeds 0 1 2 3 --out sparse-vs-dense
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
STAGES = ("val", "test")


def run_name(name: str, seed: int) -> str:
    """The benchmark's ``--name`` for ``seed``: the bare name for seed 0, ``<name>-seed<S>`` otherwise."""
    return name if seed == 0 else f"{name}-seed{seed}"


def recorded_rows(name: str, kind: str, results: Path = RESULTS) -> list[dict[str, Any]]:
    """The rows of ``kind`` ("federated", "centralized", ...) in ``<name>_runs.jsonl``, in recorded order."""
    path = results / f"{name}_runs.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such benchmark result (run simulations.bench_federated --name {name})"
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    found = [r for r in rows if r["kind"] == kind]
    if not found:
        raise ValueError(f"{path} holds no {kind} run")
    return found


def final_row(name: str, results: Path = RESULTS) -> dict[str, Any]:
    """The last federated row of ``<name>_runs.jsonl``."""
    return recorded_rows(name, "federated", results)[-1]


def compare(base: str, variant: str, seeds: list[int], results: Path = RESULTS) -> dict[str, Any]:
    """Per seed NDCG@10 of both runs and the variant's relative gap; per stage the gap of the seeds' mean
    NDCG@10 (the headline), and the mean, sample std and standard error of the per-seed gaps (std and standard
    error need two seeds or more)."""
    per_seed = []
    for seed in seeds:
        b, v = final_row(run_name(base, seed), results), final_row(run_name(variant, seed), results)
        if b["config"]["seed"] != v["config"]["seed"]:
            raise ValueError(
                f"seed {seed}: the runs used seeds {b['config']['seed']} and {v['config']['seed']}"
            )
        row: dict[str, Any] = {"seed": seed}
        for stage in STAGES:
            base_ndcg, var_ndcg = b[stage]["ndcg@10"], v[stage]["ndcg@10"]
            row[stage] = {"base": base_ndcg, "variant": var_ndcg, "gap": var_ndcg / base_ndcg - 1.0}
        per_seed.append(row)
    summary = {}
    for stage in STAGES:
        gaps = [r[stage]["gap"] for r in per_seed]
        std = statistics.stdev(gaps) if len(gaps) > 1 else float("nan")
        means = {k: statistics.fmean(r[stage][k] for r in per_seed) for k in ("base", "variant")}
        summary[stage] = {
            **means,
            "gap_of_means": means["variant"] / means["base"] - 1.0,
            "mean_gap": statistics.fmean(gaps),
            "std": std,
            "se": std / len(gaps) ** 0.5,
        }
    variant_row = final_row(run_name(variant, seeds[0]), results)
    return {
        "base": base,
        "variant": variant,
        "variant_label": variant_row["variant"],
        "upload_bytes_per_device": variant_row.get("upload_bytes_per_device"),
        "seeds": per_seed,
        "summary": summary,
    }


def to_markdown(result: dict[str, Any]) -> str:
    """A per-seed table and the mean row."""
    lines = [
        f"`{result['variant']}` ({result['variant_label']}) against `{result['base']}`, paired by seed: NDCG@10 and"
        " the variant's relative gap.",
        "",
        "| seed | val base | val variant | val gap | test base | test variant | test gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["seeds"]:
        cells = [f"{r[s][k]:.4f}" for s in STAGES for k in ("base", "variant")]
        lines.append(
            f"| {r['seed']} | {cells[0]} | {cells[1]} | {r['val']['gap']:+.1%} | {cells[2]} | {cells[3]} |"
            f" {r['test']['gap']:+.1%} |"
        )
    s = result["summary"]
    means = [f"{s[st][k]:.4f}" for st in STAGES for k in ("base", "variant")]
    lines.append(
        f"| mean | {means[0]} | {means[1]} | **{s['val']['gap_of_means']:+.1%}** | {means[2]} | {means[3]} |"
        f" **{s['test']['gap_of_means']:+.1%}** |"
    )
    lines.append(
        "| per-seed gaps: mean (std, standard error) | | | "
        + " | | | ".join(f"{s[st]['mean_gap']:+.1%} ({s[st]['std']:.1%}, {s[st]['se']:.1%})" for st in STAGES)
        + " |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the baseline's benchmark --name (seed 0's)")
    parser.add_argument("--variant", required=True, help="the variant's benchmark --name (seed 0's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--out", required=True, help="writes simulations/results/<out>.json and .md")
    args = parser.parse_args(argv)
    result = compare(args.base, args.variant, args.seeds)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
