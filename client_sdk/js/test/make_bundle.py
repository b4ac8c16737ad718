"""Build the JavaScript client's test fixture: a signed bundle of a tiny random TME-PSR model on the embedded
movielens-latest-small dataset (as tests/test_runtime.py's ``env`` fixture), its key pair, and a few users'
events.

    python client_sdk/js/test/make_bundle.py OUT_DIR [--seed 0] [--top-k 20] [--users 3] [--int8]

Writes OUT_DIR/keys/{private,public} key files (passphrase "pw"), OUT_DIR/v1 (the bundle) and
OUT_DIR/fixture.json: {"public_key", "private_key", "passphrase", "bundle" (paths relative to OUT_DIR),
"users": [[[item id, unix seconds], ...], ...]}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root

from server.publish import build_bundle  # noqa: E402
from server.release import generate_keys, load_private_key  # noqa: E402
from shared_model.data import load_dataset  # noqa: E402
from tests.helpers import tiny_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--users", type=int, default=3)
    parser.add_argument("--int8", action="store_true", help="int8 weights (the int8-rows personal_init.bin)")
    args = parser.parse_args()
    out = args.out
    log = load_dataset("movielens-latest-small")
    private, public = generate_keys(out / "keys", "pw")
    key = load_private_key(private, "pw")
    model = tiny_model(log, args.seed)
    build_bundle(
        model, log, out / "v1", key, model_version="v1", top_k=args.top_k, int8=args.int8, check=False
    )
    users = []
    for user in range(args.users):
        lo, hi = int(log.user_ptr[user]), int(log.user_ptr[user + 1])
        users.append(
            [[str(log.item_ids[i]), int(t)] for i, t in zip(log.item[lo:hi], log.time[lo:hi], strict=True)]
        )
    info = {  # paths relative to OUT_DIR (the folder may be moved)
        "public_key": public.relative_to(out).as_posix(),
        "private_key": private.relative_to(out).as_posix(),
        "passphrase": "pw",
        "bundle": "v1",
        "users": users,
    }
    (out / "fixture.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
