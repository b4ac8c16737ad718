"""``tmepsr recommend``: replay a dataset user's history through the on-device runtime (a signed bundle, a
throw-away encrypted store) and print the recommendations with their explanations."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from shared_model.data.locate import DATA_DIR_HELP

if TYPE_CHECKING:
    from shared_model.data import InteractionLog

    from .runtime import Recommender


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``recommend`` on the ``tmepsr`` subparsers."""
    p_rec = sub.add_parser("recommend", help="replay a dataset user's history through the on-device runtime")
    p_rec.add_argument("--bundle", required=True, help="signed bundle folder (tmepsr export)")
    p_rec.add_argument(
        "--public-key", default="keys/bundle_signing_key.pub.pem", help="the pinned public key"
    )
    p_rec.add_argument("--user", required=True, help="the user's id in the dataset")
    p_rec.add_argument("--k", type=int, default=10)
    p_rec.add_argument("--dataset", help="dataset to replay from (default: the bundle's)")
    p_rec.add_argument("--data-dir", help=DATA_DIR_HELP)
    p_rec.set_defaults(func=_recommend)


def check_same_catalogue(log: InteractionLog, rec: Recommender) -> None:
    """Refuse to replay a dataset whose item ids name other items than the bundle's catalogue (ids that merely
    collide, e.g. MovieLens 100k's "1" vs latest-small's "1"): compared by title where both have titles."""
    if log.name == rec.manifest.data.get("dataset") or not log.item_meta.titles:
        return
    mine = dict(zip(map(str, log.item_ids), log.item_meta.titles, strict=True))
    theirs = dict(zip(rec.catalogue_ids, rec.catalogue_titles, strict=True))
    differ = [(i, title, theirs[i]) for i, title in mine.items() if i in theirs and title != theirs[i]]
    if differ:
        i, a, b = differ[0]
        raise ValueError(
            f"{log.name} is not the catalogue of this bundle ({rec.manifest.data.get('dataset')}): "
            f"{len(differ)} shared item ids name other items (e.g. {i}: {a!r} here, {b!r} in the "
            "bundle)"
        )


def _recommend(args: argparse.Namespace) -> int:
    import os
    import tempfile
    from dataclasses import asdict
    from pathlib import Path

    from shared_model.data import load_dataset
    from shared_model.top_k import format_recommendations, recent_titles

    from .runtime import Recommender
    from .store import EncryptedStore

    with tempfile.TemporaryDirectory() as tmp:
        store = EncryptedStore(Path(tmp) / "device.store", key=os.urandom(32))
        rec = Recommender.open(args.bundle, args.public_key, store, on_unknown="ignore")
        log = load_dataset(args.dataset or rec.manifest.data["dataset"], args.data_dir)
        check_same_catalogue(log, rec)
        users = {str(u): n for n, u in enumerate(log.user_ids)}
        if args.user not in users:
            raise ValueError(
                f"user {args.user!r} is not in {log.name} (ids like {', '.join(map(str, log.user_ids[:3]))})"
            )
        user = users[args.user]
        lo, hi = log.user_ptr[user], log.user_ptr[user + 1]
        known = sum(
            rec.record(log.item_ids[i], int(t), save=False)
            for i, t in zip(log.item[lo:hi], log.time[lo:hi], strict=True)
        )
        print(
            f"user {args.user}: {known} of {hi - lo} events replayed through the on-device runtime "
            f"(bundle {rec.manifest.model_version}, its initial personal weights); "
            f"most recent: {recent_titles(log, user)}"
        )
        print(format_recommendations([asdict(r) for r in rec.recommend(args.k)]))
    return 0
