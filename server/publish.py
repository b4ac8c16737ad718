"""Building the signed on-device bundle from a training checkpoint: export the graphs, write
the catalogue (item ids, titles, explanation texts), check the graphs, sign the manifest.

A federated server checkpoint holds only the shared arrays; the bundle then carries the run's initial personal
values (every device overrides them with its own weights from its store). A centralized checkpoint's
weights are a population model: they are the initial values of devices that have not trained yet.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared_model.data import InteractionLog, load_dataset
from shared_model.data.split import LeaveOneOutSplit
from shared_model.export import OPSET, check_graphs, export_model
from shared_model.protocol.bundle import CATALOGUE, Manifest, verify_bundle
from shared_model.sequence_model import SequenceModel

from .release import sign_bundle


def model_from_checkpoint(
    path: str | Path, dataset: str | None = None, data_dir: str | None = None
) -> tuple[SequenceModel, InteractionLog, str]:
    """The model, its dataset's log and a version label from a checkpoint: a centralized ``model.pt`` or a
    federated run folder / ``server_checkpoint.npz``. ``dataset`` overrides the dataset the checkpoint names."""
    path = Path(path)
    if path.suffix == ".pt":
        from shared_model.training import load_checkpoint

        model, extra = load_checkpoint(path)
        log = load_dataset(dataset or extra["dataset"], data_dir)
        return model, log, f"{extra.get('preset', 'model')}-centralized"
    from server.checkpoint import load_server_checkpoint
    from shared_model.config import FederatedConfig
    from shared_model.partition import load_parts
    from shared_model.training import model_for_run

    folder = path.parent if path.suffix == ".npz" else path
    loaded = load_server_checkpoint(folder)
    if loaded is None:
        raise FileNotFoundError(f"no model.pt or server_checkpoint.npz at {path}")
    shared, server_round, _, config = loaded
    cfg = FederatedConfig.from_run_config(config)
    log = load_dataset(dataset or cfg.dataset, data_dir if data_dir is not None else cfg.data_dir or None)
    model = model_for_run(cfg, log)
    load_parts(model, shared)
    return model, log, f"{cfg.preset}-round{server_round}"


def catalogue(log: InteractionLog) -> dict[str, Any]:
    """Item ids (as the app knows them), titles and explanation texts, by dense id."""
    ids = [str(i) for i in log.item_ids]
    return {
        "item_ids": ids,
        "titles": list(log.item_meta.titles) if log.item_meta.titles else ids,
        "explanations": list(log.vocab.texts),
    }


def build_bundle(
    model: SequenceModel,
    log: InteractionLog,
    out_dir: str | Path,
    private_key: Ed25519PrivateKey,
    *,
    model_version: str,
    int8: bool = False,
    top_k: int = 50,
    check: bool = True,
) -> Manifest:
    """Export, check and sign a bundle into the new folder ``out_dir``; returns its verified manifest."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".bundle-") as tmp:
        work = Path(tmp) / "bundle"
        candidates = LeaveOneOutSplit(log).explanation_candidates if len(log.vocab) else None
        graphs = export_model(model, work, top_k=top_k, explanation_candidates=candidates, int8=int8)
        if check:
            check_graphs(graphs.graph_paths)
        text = json.dumps(catalogue(log), ensure_ascii=False).encode()
        (work / CATALOGUE).write_bytes(gzip.compress(text, mtime=0))  # titles compress ~3x
        sign_bundle(
            work,
            private_key,
            model_version=model_version,
            opset=OPSET,
            extra={"spec": graphs.spec, "catalogue": CATALOGUE, "dataset": log.name},
        )
        if out.exists():
            out.rmdir()
        shutil.move(str(work), out)
    public = private_key.public_key()
    return verify_bundle(out, public)
