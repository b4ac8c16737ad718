"""End to end through Flower's deployment engine (``tests/local_deployment.py``): a real ``flower-superlink`` and
three real ``flower-supernode`` processes on 127.0.0.1 run the project's ServerApp/ClientApp for two rounds, with
TLS and SuperNode authentication, and the simulation engine on a two-node Ray cluster."""

from __future__ import annotations

import http.client
import json
import math
import re
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from server.checkpoint import load_server_checkpoint
from server.credentials import generate_credentials, supernode_args
from shared_model.config import FederatedConfig

from .helpers import make_events, small_federation
from .local_deployment import (
    CONNECTION,
    DEADLINE_S,
    NODES,
    LocalDeployment,
    copy_app,
    executable,
    finite,
    free_ports,
    poll,
    run_to_completion,
    start_federation,
    tail,
)

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="finds the processes it started through /proc"),
    pytest.mark.slow,
]


def test_deployment_engine_runs_two_rounds(tmp_path):
    deadline = time.monotonic() + DEADLINE_S
    dataset = make_events(tmp_path / "events.csv", users=NODES)
    out_dir = tmp_path / "server-out"
    overrides = {
        "dataset": str(dataset),
        "num-rounds": 2,
        "fraction-train": 1.0,
        "eval-every": 1,
        "users-per-node": 1,
        "max-len": 16,
        "d-model": 16,
        "round-timeout": 120.0,
        "out-dir": str(out_dir),
    }
    app_dir = copy_app(tmp_path / "app")
    link_port, *node_ports = free_ports(1 + NODES)
    dep = LocalDeployment(tmp_path / "deployment")
    dep.write_cli_config(link_port)
    try:
        stores = start_federation(dep, link_port, node_ports, deadline)
        run_to_completion(dep, app_dir, overrides, deadline)

        history = json.loads((out_dir / "metrics.json").read_text())
        assert [row["round"] for row in history] == [1, 2]
        for row in history:
            assert (row["sampled"], row["valid"], row["rejected"], row["failed"]) == (NODES, NODES, 0, 0), row
            assert row["aggregated"] and row["upload_bytes_per_device"] > 0, row
            assert "val" in row and finite(row["val"]) and math.isfinite(row["train_loss"]), row
        assert "test" in history[-1] and finite(history[-1]["test"])
        assert 0 <= history[-1]["test"]["ndcg@10"] <= 1

        assert (out_dir / "server_checkpoint.npz").is_file()
        shared, last_round, _, run_config = load_server_checkpoint(out_dir)
        assert last_round == 2 and all(np.isfinite(v).all() for v in shared.values())
        # The --run-config overrides reached the ServerApp with their values and types.
        assert run_config == FederatedConfig.from_run_config(overrides).to_run_config()
        # Each node trained its own user (node config reached every node); personal weights stayed there.
        per_node = [sorted(p.name for p in store.glob("user-*.store")) for store in stores]
        assert all(len(names) == 1 for names in per_node), per_node
        assert len({names[0] for names in per_node}) == NODES, per_node
        # An explicit SuperLink address: `flwr` must not have started its local SuperLink daemon.
        assert not (dep.cli_home / "local-superlink").exists()
    finally:
        leftover = dep.stop_all()
        if leftover:
            print("processes left running after cleanup:\n" + "\n".join(leftover), file=sys.stderr)
    assert not leftover, leftover


def test_flwr_run_on_the_local_simulation_federation(tmp_path):
    """`flwr run .` as the README says, from a fresh Flower home: the local SuperLink that `flwr` starts runs
    Flower's simulation runtime with its default federation (2 SuperNodes, each hosting half the users). The
    app bundle carries no data (Flower packs code and configuration only), so the embedded dataset comes from
    the installed package; the ServerApp waits for the federation's own size; nothing is installed at run
    time (FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1: the app runs in this environment)."""
    deadline = time.monotonic() + DEADLINE_S
    out_dir = tmp_path / "server-out"
    overrides = {
        "num-rounds": 1,
        "eval-every": 1,
        "adapt-epochs": 0,
        "max-len": 16,
        "d-model": 16,
        "out-dir": str(out_dir),
    }
    app_dir = copy_app(tmp_path / "app")
    assert not list(app_dir.rglob("*.csv"))  # the app itself holds no data
    dep = LocalDeployment(tmp_path / "deployment")
    (dep.cli_home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )
    try:
        run_to_completion(dep, app_dir, overrides, deadline, connection="local")
        link_log = (dep.cli_home / "local-superlink" / "superlink.log").read_text()
        assert f"127.0.0.1:{dep.local_link_port}" in link_log  # the deployment's own local SuperLink ran it
        history = json.loads((out_dir / "metrics.json").read_text())
        assert [row["round"] for row in history] == [1]
        row = history[0]
        assert row["aggregated"] and row["failed"] == 0 and row["evaluated_users"] == 610, row
        assert finite(row["val"]) and finite(row["test"]), row
        home_bytes = sum(f.stat().st_size for f in dep.cli_home.rglob("*") if f.is_file())
        assert home_bytes < 100 * 2**20, (
            f"{home_bytes / 2**20:.0f} MB under FLWR_HOME: a runtime environment?"
        )
    finally:
        leftover = dep.stop_all()
    assert not leftover, leftover


def ray_node_recording_app(record_dir: Path):
    """The real ClientApp, recording the Ray node each message runs on (one file per node id)."""
    from client_sdk.flower_client import make_client_app

    def record(msg, context, call_next):
        import ray

        (record_dir / ray.get_runtime_context().get_node_id()).touch()
        return call_next(msg, context)

    return make_client_app([record])


def test_simulation_on_a_two_node_ray_cluster(tmp_path):
    """`tmepsr simulate --ray-address` (run_simulation's ray_address) on a Ray cluster of two nodes started
    as separate processes with `ray start` on 127.0.0.1 (a head and a worker, one CPU each): the run
    completes and its devices ran on both nodes."""
    from simulations.simulate import run_simulation

    deadline = time.monotonic() + DEADLINE_S
    dep = LocalDeployment(tmp_path / "deployment")
    port, client_port = free_ports(2)
    ray = executable("ray")
    common = [
        "--num-cpus",
        "1",
        "--object-store-memory",
        str(100 * 2**20),
        "--node-ip-address",
        "127.0.0.1",
        "--disable-usage-stats",
    ]
    records = tmp_path / "ray-nodes"
    records.mkdir()
    try:
        dep.spawn(
            "ray-head",
            [
                ray,
                "start",
                "--head",
                "--port",
                str(port),
                "--ray-client-server-port",
                str(client_port),
                "--include-dashboard",
                "false",
                *common,
            ],
            may_exit=True,
        )
        poll("the Ray head", deadline, lambda: dep.procs["ray-head"].poll() is not None, dep, every=1.0)
        assert dep.procs["ray-head"].returncode == 0, tail(dep.logs["ray-head"])
        dep.spawn("ray-worker", [ray, "start", "--address", f"127.0.0.1:{port}", *common], may_exit=True)
        poll("the Ray worker", deadline, lambda: dep.procs["ray-worker"].poll() is not None, dep, every=1.0)
        assert dep.procs["ray-worker"].returncode == 0, tail(dep.logs["ray-worker"])

        cfg = small_federation(tmp_path, users=8, eval_every=2)
        history = run_simulation(
            cfg, ray_address=f"127.0.0.1:{port}", client_app=ray_node_recording_app(records)
        )["history"]
        assert [row["round"] for row in history] == [1, 2]
        assert all(row["valid"] == 8 and row["aggregated"] for row in history), history
        assert history[-1]["evaluated_users"] == 8
        assert len(list(records.iterdir())) == 2, "the devices ran on one Ray node only"
    finally:
        leftover = dep.stop_all()  # (`ray start` recorded the cluster in the deployment's own Ray temp dir)
    assert not leftover, leftover


def _https_error(url: str, context: ssl.SSLContext | None) -> BaseException | None:
    """What stops ``url`` (None when it answers)."""
    try:
        with urllib.request.urlopen(url, timeout=5, context=context):
            return None
    except (OSError, http.client.HTTPException) as exc:
        return exc.reason if isinstance(exc, urllib.error.URLError) else exc


def test_tls_and_supernode_auth_admit_only_registered_nodes(tmp_path):
    """TLS on the SuperLink with SuperNode authentication (keys from ``server.credentials``): the registered
    nodes run a round over HTTPS; a node with its own unregistered key pair is refused and never gets work; a
    client without the CA, or one speaking plain HTTP, cannot talk to the SuperLink at all."""
    deadline = time.monotonic() + DEADLINE_S
    nodes = 2
    tls, keys = generate_credentials(
        tmp_path / "credentials", [], [f"node-{k}" for k in range(nodes)] + ["intruder"]
    )
    *members, intruder = keys
    out_dir = tmp_path / "server-out"
    overrides = {
        "dataset": str(make_events(tmp_path / "events.csv", users=nodes)),
        "num-rounds": 1,
        "users-per-node": 1,
        "fraction-train": 1.0,
        "eval-every": 1,
        "max-len": 16,
        "d-model": 16,
        "round-timeout": 120.0,
        "out-dir": str(out_dir),
    }
    app_dir = copy_app(tmp_path / "app")
    link_port, *node_ports = free_ports(1 + nodes + 3)
    dep = LocalDeployment(tmp_path / "deployment", tls=tls)
    address = f"127.0.0.1:{link_port}"
    dep.write_cli_config(
        link_port, {"no-ca": {"address": address}, "plain": {"address": address, "insecure": True}}
    )

    def store(name: str) -> Path:
        return tmp_path / "deployment" / name / "store"

    try:
        dep.start_superlink(link_port, node_auth=True)
        poll("the SuperLink to serve over TLS", deadline, lambda: dep.link_up(link_port), dep, every=1.0)
        # Without the CA (the system trust store) the certificate does not verify; plain HTTP gets nowhere.
        health = f"127.0.0.1:{link_port}/health"
        assert isinstance(_https_error(f"https://{health}", None), ssl.SSLCertVerificationError)
        assert _https_error(f"http://{health}", None) is not None
        for name in ("no-ca", "plain"):
            listed = dep.cli_json("supernode", "ls", name)
            assert listed.get("success") is False and "unavailable" in listed.get("error-message", ""), listed

        node_ids = {
            key.name: str(dep.cli_json("supernode", "register", str(key.public_key), CONNECTION)["node-id"])
            for key in members
        }
        registered = sorted(node_ids.values())
        assert dep.online_nodes() == []  # registered, not yet connected
        refused = {  # its own unregistered key pair; a registered key but no CA; plain HTTP
            "intruder": supernode_args(tls.ca_cert, intruder),
            "no-ca": ["--auth-supernode-private-key", str(members[0].private_key)],
            "plain": ["--insecure", "--max-retries", "1"],
        }
        for k, (key, port) in enumerate(zip(members, node_ports[:nodes], strict=True)):
            node_config = {"partition-id": k, "num-partitions": nodes, "store-dir": str(store(key.name))}
            dep.start_supernode(key.name, link_port, port, node_config, key=key)
        for (name, flags), port in zip(refused.items(), node_ports[nodes:], strict=True):
            node_config = {"partition-id": 0, "num-partitions": nodes, "store-dir": str(store(name))}
            dep.start_supernode(name, link_port, port, node_config, security=flags, may_exit=True)
        poll("the registered SuperNodes online", deadline, lambda: dep.online_nodes() == registered, dep)
        poll(
            "the refused SuperNodes to exit",
            deadline,
            lambda: all(dep.procs[n].poll() is not None for n in refused),
            dep,
        )

        logs = {name: dep.logs[name].read_text(errors="replace") for name in refused}
        for name, text in logs.items():  # flwr_exit: process status 1, Flower's code in the log
            assert dep.procs[name].returncode == 1 and "Exit Code: 305" in text, (name, text[-2000:])
            assert "SuperNode ID:" not in text, (name, text[-2000:])  # never activated
        assert "[code: 2004] Failed to activate SuperNode." in logs["intruder"], logs["intruder"][-2000:]
        assert "CERTIFICATE_VERIFY_FAILED" in logs["no-ca"], logs["no-ca"][-2000:]
        assert "Giving up reconnection" in logs["plain"], logs["plain"][-2000:]

        run_to_completion(dep, app_dir, overrides, deadline)
        assert [row["round"] for row in json.loads((out_dir / "metrics.json").read_text())] == [1]
        # Only the registered keys ever became nodes; each trained its own user, the refused ones nothing.
        activated = re.findall(
            r"\[Fleet\.ActivateNode\] Activated node_id=(\d+)", dep.logs["superlink"].read_text()
        )
        assert sorted(set(activated)) == registered, activated
        assert dep.online_nodes() == registered
        assert all(len(list(store(key.name).glob("user-*.store"))) == 1 for key in members)
        assert not any(store(name).exists() for name in refused)

        # Revocation: an unregistered node's next signed request is refused (HTTP 401) and the node stops.
        revoked = members[-1].name
        dep.may_exit.add(revoked)
        assert dep.cli_json("supernode", "unregister", node_ids[revoked], CONNECTION).get("success"), revoked
        poll(
            f"{revoked} to stop once unregistered",
            deadline,
            lambda: dep.procs[revoked].poll() is not None,
            dep,
        )
        assert dep.online_nodes() == sorted(set(registered) - {node_ids[revoked]})
        assert '" 401' in dep.logs["superlink"].read_text()
    finally:
        leftover = dep.stop_all()
        if leftover:
            print("processes left running after cleanup:\n" + "\n".join(leftover), file=sys.stderr)
    assert not leftover, leftover
