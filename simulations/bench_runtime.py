"""On-device runtime benchmark: single-thread onnxruntime latency of one ``record`` +
``recommend(10)`` through :class:`client_sdk.runtime.Recommender` (median and p99 over 1,000 real events, the
store not written per event), the JavaScript client on onnxruntime-node on the same bundle and events
(``client_sdk/js/bin/bench.mjs``, one thread; the ratio), torch eager doing the same work in the same run (the
ratio), bundle size fp32 and int8, the int8 weights' effect (top-10 overlap, Recall@10) and the peak memory of the
runtime process.

Catalogues: ``movielens-1m-lrurec`` (3,416 items; a trained model when ``--checkpoint`` is given, e.g. the scale
benchmark's run folder) and ``amazon-beauty-sasrec-lrurec`` (57,289 items; latency only, untrained weights).
The runtime is measured in a subprocess that imports neither torch nor flwr.
Run: ``python -m simulations.bench_runtime [--checkpoint runs/bench_scale]``; writes
``simulations/results/bench_runtime.{json,md}``. ``--compare A B KEY`` instead times two bundles of one catalogue
against each other (a graph change), interleaved event by event in one process, and prints JSON;
``--breakdown BUNDLE KEY`` prints where one bundle's step graph spends its time, phase by phase.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
JS_CLIENT = Path(__file__).parents[1] / "client_sdk" / "js"
CATALOGUES = ("movielens-1m-lrurec", "amazon-beauty-sasrec-lrurec")


def _events(log: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real events (the users' histories one after another) with non-decreasing timestamps."""
    items = log.item[:n]
    gaps = np.diff(log.time[:n], prepend=log.time[0]).clip(min=0)
    return items, 1_600_000_000 + np.cumsum(gaps)


def _percentiles(seconds: list[float]) -> dict[str, float]:
    us = np.array(seconds) * 1e6
    return {"median_us": float(np.median(us)), "p99_us": float(np.percentile(us, 99))}


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe(bundle: str, public_key: str, events: str) -> None:
    """(Subprocess) time record + recommend(10) per event through the runtime; print JSON."""
    before = _peak_rss_mb()
    from client_sdk.runtime import Recommender
    from client_sdk.store import EncryptedStore

    data = np.load(events)
    with tempfile.TemporaryDirectory() as tmp:
        store = EncryptedStore(Path(tmp) / "user.store", key=bytes(32))
        t0 = time.perf_counter()
        rec = Recommender.open(bundle, public_key, store)
        open_s = time.perf_counter() - t0
        ids = rec.catalogue_ids  # the catalogue's source ids, to feed real events
        seconds = []
        for item, t in zip(data["items"], data["times"], strict=True):
            t0 = time.perf_counter()
            rec.record(ids[item], int(t), save=False)
            rec.recommend(10)
            seconds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rec.save()
        save_s = time.perf_counter() - t0
        import torch_free_check  # noqa: F401  (see main: a module that fails if torch or flwr were imported)
    print(
        json.dumps(
            {
                **_percentiles(seconds),
                "open_s": open_s,
                "save_ms": save_s * 1e3,
                "peak_rss_mb": _peak_rss_mb(),
                "rss_before_imports_mb": before,
            }
        )
    )


def _timed_event(rec: Any, item: str, t: int) -> tuple[float, float, np.ndarray]:
    """Seconds of one ``record`` + ``recommend(10)``, seconds of the runtime's step graph run again at once,
    alone (the graph's share of the total), and the event's top items (copied before that second run, which
    overwrites the outputs)."""
    t0 = time.perf_counter()
    rec.record(item, t, save=False)
    rec.recommend(10)
    t1 = time.perf_counter()
    step = rec._loaded.step
    ranked = step.outputs["top_items"].copy()
    t2 = time.perf_counter()
    step.run()
    return t1 - t0, time.perf_counter() - t2, ranked


def compare(bundles: list[str], public_key: str, items: np.ndarray, times: np.ndarray) -> dict[str, Any]:
    """(In this process) record + recommend(10) per event through one runtime per bundle, the bundles taking
    turns event by event (so that a busy or throttled machine slows them alike): median microseconds of each and
    of its step graph's run alone, and B / A."""
    from client_sdk.runtime import Recommender
    from client_sdk.store import EncryptedStore

    with tempfile.TemporaryDirectory() as tmp:
        recs = [
            Recommender.open(b, public_key, EncryptedStore(Path(tmp) / f"{n}.store", key=bytes(32)))
            for n, b in enumerate(bundles)
        ]
        ids = recs[0].catalogue_ids
        if any(r.catalogue_ids != ids for r in recs):
            raise SystemExit("the bundles to compare must have the same catalogue")
        seconds: list[list[float]] = [[] for _ in recs]
        steps: list[list[float]] = [[] for _ in recs]
        for item, t in zip(items, times, strict=True):
            for rec, total, step in zip(recs, seconds, steps, strict=True):
                event_s, step_s, _ = _timed_event(rec, ids[item], int(t))
                total.append(event_s)
                step.append(step_s)
    out = {
        b: {"record_recommend": _percentiles(s), "step_run": _percentiles(g)}
        for b, s, g in zip(bundles, seconds, steps, strict=True)
    }
    first, second = (out[b]["record_recommend"]["median_us"] for b in bundles)
    return {"events": len(items), "bundles": out, "b_over_a": second / first}


# the step graph's phases, in order: each cut keeps the outputs of its phase and of every phase before it
PHASES = {
    "recurrent step": ("state",),
    "ranking (top items and scores)": ("top_items", "top_scores"),
    "driving heads": ("top_heads",),
    "explanations": ("top_explanations",),
}


def breakdown(bundle: str, public_key: str, items: np.ndarray, times: np.ndarray) -> dict[str, Any]:
    """(In this process) where a step's time goes: the bundle's step graph cut after each of :data:`PHASES`
    (``onnx.utils.Extractor``: the subgraph computing the recurrent states and the outputs so far; a phase the
    graph has no output of, e.g. explanations without a branch, is left out), each cut run after every event on
    the runtime's own inputs of that event, bound once as the runtime binds its step, the cuts taking turns event
    by event. Median microseconds of record + recommend(10), of the runtime's step graph run again alone, of each
    cut, and what each phase adds to the one before; the rest of the total (the Python API, and the caches the
    event's first run finds cold) is the total minus the step graph run again."""
    import onnx
    import onnxruntime as ort
    from onnx.utils import Extractor

    from client_sdk.runtime import Recommender
    from client_sdk.store import EncryptedStore
    from shared_model.graph_io import session

    with tempfile.TemporaryDirectory() as tmp:
        rec = Recommender.open(bundle, public_key, EncryptedStore(Path(tmp) / "s.store", key=bytes(32)))
        step = rec._loaded.step
        graph = onnx.load(str(Path(bundle) / rec._loaded.spec["graphs"]["step"]["file"]))
        extractor = Extractor(graph)
        inputs = [i.name for i in graph.graph.input]
        states = [o.name for o in graph.graph.output if o.name.startswith("next_")]
        here = {name: np.zeros_like(a) for name, a in step.inputs.items()}  # this event's inputs, copied
        values = here | rec._loaded.personal["step"]
        present = {o.name for o in graph.graph.output}
        cuts, outputs = {}, list(states)
        for phase, names in PHASES.items():
            if not present.intersection(names):
                continue
            outputs += [n for n in names if n in present]
            sess = session(extractor.extract_model(inputs, outputs).SerializeToString(), batch=1)
            binding, kept = sess.io_binding(), []
            for value in sess.get_inputs():
                kept.append(ort.OrtValue.ortvalue_from_numpy(values[value.name]))
                binding.bind_ortvalue_input(value.name, kept[-1])
            for value in sess.get_outputs():
                binding.bind_output(value.name)
            sess.run_with_iobinding(binding)  # allocates the outputs once
            cuts[phase] = (sess, binding, kept)
        whole_graph, whole_binding, _ = cuts[list(cuts)[-1]]  # checked against the runtime's ranking
        top_index = [value.name for value in whole_graph.get_outputs()].index("top_items")
        ids = rec.catalogue_ids
        total: list[float] = []
        whole: list[float] = []
        seconds: dict[str, list[float]] = {phase: [] for phase in cuts}
        for item, t in zip(items, times, strict=True):
            for name, array in here.items():  # the inputs the runtime's step will read for this event
                array[...] = step.inputs[name]
            here["item"][0], here["timestamp"][0] = item, int(t)
            here["exclude"][0, item] = True
            event_s, step_s, ranked = _timed_event(rec, ids[item], int(t))
            total.append(event_s)
            whole.append(step_s)
            for phase, (sess, binding, _) in cuts.items():
                t0 = time.perf_counter()
                sess.run_with_iobinding(binding)
                seconds[phase].append(time.perf_counter() - t0)
            cut_ranked = whole_binding.get_outputs()[top_index].numpy()
            if not np.array_equal(cut_ranked, ranked):  # the cuts must run on the event the runtime ran
                raise RuntimeError("the whole-graph cut ranked differently from the runtime's step graph")
        rec.close()
    medians = {phase: _percentiles(s)["median_us"] for phase, s in seconds.items()}
    added, before = {}, 0.0
    for phase, us in medians.items():
        added[phase], before = us - before, us
    total_us, step_us = _percentiles(total)["median_us"], _percentiles(whole)["median_us"]
    return {
        "events": len(items),
        "record_recommend_median_us": total_us,
        "step_graph_median_us": step_us,
        "cut_median_us": medians,
        "phase_adds_us": added | {"Python API and cold caches (total - step graph)": total_us - step_us},
    }


def _js_probe(
    bundle: Path, public: Path, log: Any, items: np.ndarray, times: np.ndarray, work: Path
) -> dict[str, float] | None:
    """The same events through the JavaScript client on onnxruntime-node (``client_sdk/js/bin/bench.mjs``, one
    thread); None, with a note, when node or the package's node_modules are missing."""
    if shutil.which("node") is None or not (JS_CLIENT / "node_modules").is_dir():
        print("JavaScript client not measured: needs node and `npm ci` in client_sdk/js")
        return None
    events = work / f"{log.name}-events.json"
    if not events.exists():  # once per catalogue: the fp32 and int8 bundles replay the same events
        events.write_text(
            json.dumps({"items": [str(log.item_ids[i]) for i in items], "times": times.tolist()})
        )
    out = subprocess.run(
        ["node", "bin/bench.mjs", str(bundle), str(public), str(events)],
        cwd=JS_CLIENT,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def _torch_eager(model: Any, items: np.ndarray, times: np.ndarray) -> dict[str, float]:
    """The same work in torch eager on one thread: step, scores with seen items masked, top-10, heads,
    explanations of the ten."""
    import torch

    torch.set_num_threads(1)
    seen = torch.zeros(1, model.cfg.num_items, dtype=torch.bool)
    lru, tstate = model.initial_state(1)
    seconds = []
    with torch.no_grad():
        for item, t in zip(items.tolist(), times.tolist(), strict=True):
            t0 = time.perf_counter()
            seen[0, item] = True
            y, lru, tstate = model.step(torch.tensor([item]), torch.tensor([t]), lru, tstate)
            top = model.item_scores(y).masked_fill(seen, -torch.inf).topk(10)
            model.head_contributions(y, top.indices).argmax(-1)
            if model.explanation is not None:
                model.explanation_scores(y.expand(10, -1), top.indices[0]).topk(2)
            seconds.append(time.perf_counter() - t0)
    return _percentiles(seconds)


def run_catalogue(
    name: str, args: argparse.Namespace, work: Path, private: Any, public: Path
) -> dict[str, Any]:
    from server.publish import build_bundle, model_from_checkpoint
    from shared_model.build import build_model
    from shared_model.data import load_dataset
    from shared_model.data.split import LeaveOneOutSplit
    from shared_model.export import export_model
    from shared_model.training import model_config_for
    from simulations.exported_graphs import int8_effect

    if args.checkpoint and name == "movielens-1m-lrurec":
        model, log, version = model_from_checkpoint(args.checkpoint)
        trained = True
    else:
        log = load_dataset(name)
        model, version, trained = (
            build_model(model_config_for(log, max_len=50, d_model=64)),
            "untrained",
            False,
        )
    model.eval()
    row: dict[str, Any] = {"catalogue": name, "items": log.num_items, "trained": trained, "model": version}
    items, times = _events(log, args.events)
    np.savez(work / f"{name}-events.npz", items=items, times=times)
    for kind in ("fp32", "int8"):
        bundle = work / f"{name}-{kind}"
        manifest = build_bundle(
            model, log, bundle, private, model_version=f"bench-{kind}", int8=kind == "int8"
        )
        row[f"bundle_bytes_{kind}"] = sum(f["bytes"] for f in manifest.files.values())
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "simulations.bench_runtime",
                "--probe",
                str(bundle),
                str(public),
                str(work / f"{name}-events.npz"),
            ],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(work)},
        )
        row[f"runtime_{kind}"] = json.loads(out.stdout.strip().splitlines()[-1])
        row[f"js_{kind}"] = _js_probe(bundle, public, log, items, times, work)
    if row["js_fp32"]:
        row["js_vs_python"] = row["js_fp32"]["median_us"] / row["runtime_fp32"]["median_us"]
    row["torch_eager"] = _torch_eager(model, items, times)
    row["speedup_vs_torch"] = row["torch_eager"]["median_us"] / row["runtime_fp32"]["median_us"]
    if trained:
        users = np.flatnonzero(np.diff(log.user_ptr) >= 3)[: args.int8_users]
        with tempfile.TemporaryDirectory() as tmp:
            candidates = LeaveOneOutSplit(log).explanation_candidates
            fp32 = export_model(model, Path(tmp) / "fp32", explanation_candidates=candidates)
            int8 = export_model(model, Path(tmp) / "int8", explanation_candidates=candidates, int8=True)
            row["int8_effect"] = int8_effect(fp32, int8, log, users)
    return row


def summarise(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| catalogue | items | trained | runtime fp32 median / p99 (us) | int8 median (us) | JS (node) fp32 median (us) "
        "| JS / Python | torch eager median (us) | x torch | bundle fp32 / int8 (KB) | int8 top-10 overlap "
        "| Recall@10 fp32 / int8 | runtime peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fx = r.get("int8_effect", {})
        lines.append(
            f"| {r['catalogue']} | {r['items']:,} | {'yes' if r['trained'] else 'no'} "
            f"| {r['runtime_fp32']['median_us']:.0f} / {r['runtime_fp32']['p99_us']:.0f} "
            f"| {r['runtime_int8']['median_us']:.0f} "
            f"| {r['js_fp32']['median_us'] if r.get('js_fp32') else float('nan'):.0f} "
            f"| {r.get('js_vs_python', float('nan')):.2f} | {r['torch_eager']['median_us']:.0f} "
            f"| {r['speedup_vs_torch']:.1f} | {r['bundle_bytes_fp32'] / 1e3:.0f} / {r['bundle_bytes_int8'] / 1e3:.0f} "
            f"| {fx.get('top10_overlap', float('nan')):.3f} "
            f"| {fx.get('recall@10_fp32', float('nan')):.4f} / {fx.get('recall@10_int8', float('nan')):.4f} "
            f"| {r['runtime_fp32']['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--probe", nargs=3, metavar=("BUNDLE", "PUBLIC_KEY", "EVENTS"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--compare",
        nargs=3,
        metavar=("BUNDLE_A", "BUNDLE_B", "PUBLIC_KEY"),
        help="A/B latency of two bundles of one catalogue (e.g. a graph change), interleaved event by event on"
        " the first --catalogues' events; prints JSON",
    )
    parser.add_argument(
        "--breakdown",
        nargs=2,
        metavar=("BUNDLE", "PUBLIC_KEY"),
        help="where the step graph's time goes in one bundle (per phase, interleaved) on the first --catalogues'"
        " events; prints JSON",
    )
    parser.add_argument("--checkpoint", help="trained ML-1M checkpoint (model.pt or a federated run folder)")
    parser.add_argument("--catalogues", nargs="+", default=list(CATALOGUES))
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--int8-users", type=int, default=2000, help="users for the int8 effect")
    parser.add_argument("--name", default="bench_runtime")
    args = parser.parse_args(argv)
    if args.probe:
        probe(*args.probe)
        return
    from server.release import generate_keys, load_private_key
    from shared_model.data import DATASETS, load_dataset

    if args.compare or args.breakdown:
        items, times = _events(load_dataset(args.catalogues[0]), args.events)
        if args.compare:
            *bundles, public = args.compare
            print(json.dumps(compare(bundles, public, items, times), indent=2))
        else:
            print(json.dumps(breakdown(*args.breakdown, items, times), indent=2))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "torch_free_check.py").write_text(
            "import sys\nassert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'flwr')]\n"
        )
        private_path, public = generate_keys(work / "keys", "bench")
        private = load_private_key(private_path, "bench")
        for name in args.catalogues:
            if DATASETS[name].locate(None) is None:
                print(f"skipping {name}: dataset not found (see tmepsr data list)")
                continue
            rows.append(run_catalogue(name, args, work, private, public))
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
            (RESULTS / f"{args.name}.md").write_text(summarise(rows))
    print(summarise(rows))


if __name__ == "__main__":
    main()
