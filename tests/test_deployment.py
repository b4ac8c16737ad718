"""End to end through Flower's deployment engine: a real ``flower-superlink`` and three real ``flower-supernode``
processes on 127.0.0.1 run the project's ServerApp/ClientApp, submitted with ``flwr run``, for two rounds.

How flwr 1.42 is driven here (checked in its source, flwr/cli and flwr/superlink):
- SuperLink: ``flower-superlink --insecure --host 127.0.0.1 --port P``. One HTTP port serves the Fleet,
  Control and Runtime APIs; the SuperLink starts its own ``flower-superexec`` (new session), which starts one
  ``flwr-serverapp`` per run.
- SuperNode: ``flower-supernode --insecure --superlink 127.0.0.1:P --port Q --node-config '...'``, where Q is
  the node's own Runtime API port (default 9094, so it must differ per node) and node-config values are TOML
  (strings quoted). Each node starts a ``flower-superexec``, which starts the ``flwr-clientapp`` processes.
- ``flwr`` finds SuperLinks by name in ``$FLWR_HOME/config.toml`` (``[superlink.<name>]`` with ``address`` and
  ``insecure``); ``[tool.flwr.federations]`` in pyproject.toml is legacy (``flwr run`` migrates it).
  ``--federation-config`` only overrides the simulation runtime. A connection with an explicit address never
  starts the local SuperLink daemon (``:local:`` addresses do); this is asserted.
- ``flwr run APP NAME --run-config 'k=v ...' --format json`` returns the run id and exits 0 even when the run
  later fails, so the status comes from ``flwr ls NAME --run-id ID --format json`` (``finished:completed``).

TLS and SuperNode authentication (``flower-superlink --ssl-* --enable-supernode-auth``, keys registered with
``flwr supernode register``) are driven as cited in ``server/credentials.py``; the second test runs them.

Every process started here (and all their descendants) carries a unique environment tag; all are stopped by
PID afterwards, and the test asserts that none is left running.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.checkpoint import load_server_checkpoint
from server.credentials import NodeKeys, TlsFiles, generate_credentials, superlink_args, supernode_args
from shared_model.config import FederatedConfig

from .test_federated import make_events

NODES = 3
DEADLINE_S = (
    300.0  # one deployment test (start-up, its rounds, status checks); cleanup has its own bounded waits
)
APP_PACKAGES = ("server", "client_sdk", "shared_model", "simulations")  # what the FAB needs besides pyproject
CONNECTION = "tmepsr-test"
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
TAG_VAR = "TMEPSR_DEPLOYMENT_TEST_TAG"
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="finds the processes it started through /proc"),
    pytest.mark.slow,
]


def _executable(name: str) -> str:
    """A console script of this interpreter's environment (the venv running the tests), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed (it comes with flwr)")
    return found


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held together while chosen, so they differ)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _toml_pairs(values: dict[str, Any]) -> str:
    """``k=v`` pairs as flwr parses them (values are TOML: strings quoted, floats with a point)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"<{path} unreadable: {exc}>"


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, ppid, start time) of a process, or None when it no longer exists."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid ... starttime (field 22)
    return fields[0], int(fields[1]), fields[19]


def _running(proc: tuple[int, str]) -> bool:
    """Whether the process (pid, start time) still exists and is not a zombie."""
    stat = _stat(proc[0])
    return stat is not None and stat[2] == proc[1] and stat[0] not in ("Z", "X")


class LocalDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1 under ``root``; every process gets FLWR_HOME under ``root``
    and a unique tag in its environment, so this class can find and stop all of them (and their children).

    Without ``tls`` everything runs ``--insecure``; with it the SuperLink serves HTTPS with that certificate
    and clients verify it with its CA (``server.credentials``)."""

    def __init__(self, root: Path, tls: TlsFiles | None = None) -> None:
        self.root = root
        self.tls = tls
        self.tag = uuid.uuid4().hex
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self.may_exit: set[str] = set()  # processes expected to end by themselves (check_alive skips them)
        self.known: set[tuple[int, str]] = set()  # (pid, start time) of every process seen as ours
        self.cli_home = root / "cli" / "flwr-home"
        self.cli_home.mkdir(parents=True)

    def env(self, flwr_home: Path) -> dict[str, str]:
        env = dict(os.environ, **FLOWER_ENV, FLWR_HOME=str(flwr_home), PYTHONUNBUFFERED="1")
        env[TAG_VAR] = self.tag
        # The SuperLink/SuperNode start `flower-superexec` and the apps by name: use this environment's.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # Ray workers started by `ray start` import test-defined ClientApps from the `tests` package
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    def spawn(self, name: str, args: list[str], *, may_exit: bool = False) -> subprocess.Popen[bytes]:
        if may_exit:
            self.may_exit.add(name)
        workdir = self.root / name
        (workdir / "flwr-home").mkdir(parents=True, exist_ok=True)
        log = workdir / "process.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                args, cwd=workdir, env=self.env(workdir / "flwr-home"), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.procs[name], self.logs[name] = proc, log
        self.scan()
        return proc

    def write_cli_config(self, link_port: int, extra: dict[str, dict[str, Any]] | None = None) -> None:
        """The `flwr` CLI's SuperLink connections (flwr 1.42 format): CONNECTION, the default, reaches the
        SuperLink like the nodes do (insecure, or verifying the CA); ``extra`` adds named connections."""
        main = {"address": f"127.0.0.1:{link_port}"}
        main |= {"root-certificates": str(self.tls.ca_cert)} if self.tls else {"insecure": True}
        text = f'[superlink]\ndefault = "{CONNECTION}"\n'
        for name, values in {CONNECTION: main, **(extra or {})}.items():
            text += f"\n[superlink.{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
        (self.cli_home / "config.toml").write_text(text)

    def start_superlink(self, port: int, *, node_auth: bool = False) -> subprocess.Popen[bytes]:
        """``flower-superlink`` on 127.0.0.1:port (TLS when the deployment has it; node auth needs TLS)."""
        security = superlink_args(self.tls, node_auth=node_auth) if self.tls else ["--insecure"]
        cmd = [_executable("flower-superlink"), *security, "--host", "127.0.0.1", "--port", str(port)]
        return self.spawn("superlink", cmd)

    def start_supernode(
        self, name: str, link_port: int, port: int, node_config: dict[str, Any], *,
        key: NodeKeys | None = None, security: list[str] | None = None, may_exit: bool = False,
    ) -> subprocess.Popen[bytes]:  # fmt: skip
        """``flower-supernode`` (Runtime API on ``port``) reaching the SuperLink like this deployment does,
        authenticating with ``key``; ``security`` replaces those flags (to try a wrong set-up)."""
        if security is None:
            security = supernode_args(self.tls.ca_cert, key) if self.tls else ["--insecure"]
        cmd = [_executable("flower-supernode"), *security, "--superlink", f"127.0.0.1:{link_port}",
               "--port", str(port), "--node-config", _toml_pairs(node_config)]  # fmt: skip
        return self.spawn(name, cmd, may_exit=may_exit)

    def link_up(self, port: int) -> bool:
        """Whether the SuperLink answers its health check (over HTTPS, verified with the CA, under TLS)."""
        scheme, context = (
            ("https", ssl.create_default_context(cafile=self.tls.ca_cert)) if self.tls else ("http", None)
        )
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(
                f"{scheme}://127.0.0.1:{port}/health", timeout=2, context=context
            ) as resp:
                return resp.status == 200
        return False

    def online_nodes(self) -> list[str]:
        """Ids of the SuperNodes the SuperLink lists as online (``flwr supernode ls``)."""
        nodes = self.cli_json("supernode", "ls", CONNECTION).get("nodes", [])
        return sorted(str(n["node-id"]) for n in nodes if n.get("status") == "online")

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a ``flwr`` command (against the connection in the test's own FLWR_HOME)."""
        try:
            return subprocess.run(
                [_executable("flwr"), *args], cwd=self.cli_home.parent, env=self.env(self.cli_home),
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            )  # fmt: skip
        finally:
            self.scan()

    def cli_json(self, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        res = self.cli(*args, "--format", "json", timeout=timeout)
        try:
            return json.loads(res.stdout[res.stdout.index("{") :])
        except ValueError:
            pytest.fail(
                f"`flwr {' '.join(args)}` gave no JSON (rc {res.returncode}):\n{res.stdout}\n{res.stderr}"
            )

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if name not in self.may_exit and proc.poll() is not None:
                pytest.fail(f"{name} exited early with code {proc.returncode}:\n{_tail(self.logs[name])}")

    def report(self) -> str:
        return "\n".join(f"--- {name} ({log}):\n{_tail(log, 1500)}" for name, log in self.logs.items())

    def scan(self) -> set[tuple[int, str]]:
        """Record every running process that carries the tag or descends from a process started here
        (descendants are found while their parents live; afterwards the tag still identifies them)."""
        marker = f"{TAG_VAR}={self.tag}".encode()
        table: dict[int, tuple[str, int, str]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
                table[int(entry.name)] = stat
        # Ancestors that count: our live children and processes already known (same start time, so a
        # reused PID never makes a stranger's children ours).
        ours = {p.pid for p in self.procs.values() if p.poll() is None}
        ours |= {pid for pid, start in self.known if pid in table and table[pid][2] == start}
        found = set()
        for pid, (state, ppid, start) in table.items():
            if state in ("Z", "X"):
                continue
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found.add((pid, start))
                    continue
            chain, seen = ppid, set()
            while chain in table and chain not in seen and chain > 1:
                if chain in ours:
                    found.add((pid, start))
                    break
                seen.add(chain)
                chain = table[chain][1]
        self.known |= found
        return found

    def stop_all(self, grace: float = 20.0) -> list[str]:
        """Stop everything by PID: SuperNodes, then the SuperLink (SIGTERM, so they shut their SuperExecs
        down), then any tagged leftover (SIGTERM, then SIGKILL). Returns what is still running."""
        self.scan()
        for proc in reversed(list(self.procs.values())):  # nodes first, the link last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            self.scan()
            live = [p for p in self.known if _running(p)]
            for pid, _ in live:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            end = time.monotonic() + wait_s
            while live and time.monotonic() < end:
                time.sleep(0.2)
                live = [p for p in live if _running(p)]
        for proc in self.procs.values():  # reap our direct children
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.scan()
        return [f"pid {pid}: {_cmdline(pid)}" for pid, start in sorted(self.known) if _running((pid, start))]


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return "?"


def _poll(what: str, deadline: float, check, dep: LocalDeployment, every: float = 3.0):
    """Call ``check`` until it returns something truthy; fail with the process logs at the deadline."""
    while True:
        dep.check_alive()
        if result := check():
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{dep.report()}")
        time.sleep(every)


def _copy_app(dest: Path) -> Path:
    """The Flower app as ``flwr run`` packs it: pyproject.toml and the packages (a copy, so the FAB is
    built from a fixed tree and the CLI never touches the repository's pyproject.toml)."""
    dest.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "results", "resources", "checkpoints")
    for pkg in APP_PACKAGES:
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=skip)
    return dest


def _finite(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return isinstance(value, bool | int | float) and math.isfinite(value)


def _run_to_completion(
    dep: LocalDeployment,
    app_dir: Path,
    overrides: dict[str, Any],
    deadline: float,
    connection: str = CONNECTION,
) -> dict[str, Any]:
    """Submit the app with ``flwr run`` and wait until the run finished; fail with its log unless completed."""
    started = dep.cli_json("run", str(app_dir), connection, "--run-config", _toml_pairs(overrides))
    assert started.get("success") and started.get("run-id"), started
    run_id = started["run-id"]

    def finished() -> dict[str, Any] | None:
        runs = dep.cli_json("ls", connection, "--run-id", run_id).get("runs", [])
        run = next((r for r in runs if r.get("run-id") == run_id), None)
        return run if run and str(run.get("status", "")).startswith("finished") else None

    run = _poll(f"run {run_id} to finish", deadline, finished, dep, every=5.0)
    if run["status"] != "finished:completed":
        logs = dep.cli("log", run_id, connection, "--show", timeout=60).stdout
        pytest.fail(f"run {run_id} ended {run['status']} ({run.get('status-details')}):\n"
                    f"{logs[-4000:]}\n{dep.report()}")  # fmt: skip
    return run


def start_federation(
    dep: LocalDeployment, link_port: int, node_ports: list[int], deadline: float
) -> list[Path]:
    """A plain SuperLink, then one SuperNode per port (partition k of ``len(node_ports)``, its own store), all
    online; returns the stores."""
    dep.start_superlink(link_port)
    _poll("the SuperLink to serve", deadline, lambda: dep.link_up(link_port), dep, every=1.0)
    stores = [dep.root / f"supernode-{k}" / "store" for k in range(len(node_ports))]
    for k, (port, store) in enumerate(zip(node_ports, stores, strict=True)):
        node_config = {"partition-id": k, "num-partitions": len(node_ports), "store-dir": str(store)}
        dep.start_supernode(f"supernode-{k}", link_port, port, node_config)
    # The ServerApp sizes its cohort from the nodes connected when it starts: all must be online first.
    online = len(node_ports)
    _poll(f"{online} SuperNodes to be online", deadline, lambda: len(dep.online_nodes()) == online, dep)
    return stores


def test_deployment_engine_runs_two_rounds(tmp_path):
    deadline = time.monotonic() + DEADLINE_S
    dataset = make_events(tmp_path / "events.csv", users=NODES)
    out_dir = tmp_path / "server-out"
    overrides = {"dataset": str(dataset), "num-rounds": 2, "fraction-train": 1.0, "eval-every": 1, "users-per-node": 1,
                 "max-len": 16, "d-model": 16, "round-timeout": 120.0, "out-dir": str(out_dir)}  # fmt: skip
    app_dir = _copy_app(tmp_path / "app")
    link_port, *node_ports = _free_ports(1 + NODES)
    dep = LocalDeployment(tmp_path / "deployment")
    dep.write_cli_config(link_port)
    try:
        stores = start_federation(dep, link_port, node_ports, deadline)
        _run_to_completion(dep, app_dir, overrides, deadline)

        history = json.loads((out_dir / "metrics.json").read_text())
        assert [row["round"] for row in history] == [1, 2]
        for row in history:
            assert (row["sampled"], row["valid"], row["rejected"], row["failed"]) == (NODES, NODES, 0, 0), row
            assert row["aggregated"] and row["upload_bytes_per_device"] > 0, row
            assert "val" in row and _finite(row["val"]) and math.isfinite(row["train_loss"]), row
        assert "test" in history[-1] and _finite(history[-1]["test"])
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
    overrides = {"num-rounds": 1, "eval-every": 1, "adapt-epochs": 0, "max-len": 16, "d-model": 16,
                 "out-dir": str(out_dir)}  # fmt: skip
    app_dir = _copy_app(tmp_path / "app")
    assert not list(app_dir.rglob("*.csv"))  # the app itself holds no data
    dep = LocalDeployment(tmp_path / "deployment")
    (dep.cli_home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )
    try:
        _run_to_completion(dep, app_dir, overrides, deadline, connection="local")
        history = json.loads((out_dir / "metrics.json").read_text())
        assert [row["round"] for row in history] == [1]
        row = history[0]
        assert row["aggregated"] and row["failed"] == 0 and row["evaluated_users"] == 610, row
        assert _finite(row["val"]) and _finite(row["test"]), row
        home_bytes = sum(f.stat().st_size for f in dep.cli_home.rglob("*") if f.is_file())
        assert home_bytes < 100 * 2**20, (
            f"{home_bytes / 2**20:.0f} MB under FLWR_HOME: a runtime environment?"
        )
    finally:
        leftover = dep.stop_all()
    assert not leftover, leftover


def ray_node_recording_app(record_dir: Path):
    """The real ClientApp, recording the Ray node each message runs on (one file per node id)."""
    from flwr.clientapp import ClientApp

    from client_sdk.flower_client import make_client_app

    real = make_client_app()
    app = ClientApp()

    def handle(msg, context):
        import ray

        (record_dir / ray.get_runtime_context().get_node_id()).touch()
        return real(msg, context)

    app.train()(handle)
    app.evaluate()(handle)
    app.query()(handle)
    return app


def test_simulation_on_a_two_node_ray_cluster(tmp_path):
    """`tmepsr simulate --ray-address` (run_simulation's ray_address) on a Ray cluster of two nodes started
    as separate processes with `ray start` on 127.0.0.1 (a head and a worker, one CPU each): the run
    completes and its devices ran on both nodes."""
    from simulations.simulate import run_simulation

    deadline = time.monotonic() + DEADLINE_S
    dep = LocalDeployment(tmp_path / "deployment")
    port, client_port = _free_ports(2)
    ray = _executable("ray")
    common = ["--num-cpus", "1", "--object-store-memory", str(100 * 2**20), "--node-ip-address", "127.0.0.1",
              "--disable-usage-stats"]  # fmt: skip
    records = tmp_path / "ray-nodes"
    records.mkdir()
    try:
        dep.spawn("ray-head", [ray, "start", "--head", "--port", str(port), "--ray-client-server-port",
                               str(client_port), "--include-dashboard", "false", *common], may_exit=True)  # fmt: skip
        _poll("the Ray head", deadline, lambda: dep.procs["ray-head"].poll() is not None, dep, every=1.0)
        assert dep.procs["ray-head"].returncode == 0, _tail(dep.logs["ray-head"])
        dep.spawn("ray-worker", [ray, "start", "--address", f"127.0.0.1:{port}", *common], may_exit=True)
        _poll("the Ray worker", deadline, lambda: dep.procs["ray-worker"].poll() is not None, dep, every=1.0)
        assert dep.procs["ray-worker"].returncode == 0, _tail(dep.logs["ray-worker"])

        data = make_events(tmp_path / "events.csv", users=8)
        cfg = FederatedConfig(dataset=str(data), max_len=16, d_model=16, num_rounds=2, fraction_train=1.0,
                              users_per_node=1, eval_every=2, out_dir=str(tmp_path / "run"))  # fmt: skip
        history = run_simulation(
            cfg, ray_address=f"127.0.0.1:{port}", client_app=ray_node_recording_app(records)
        )["history"]
        assert [row["round"] for row in history] == [1, 2]
        assert all(row["valid"] == 8 and row["aggregated"] for row in history), history
        assert history[-1]["evaluated_users"] == 8
        assert len(list(records.iterdir())) == 2, "the devices ran on one Ray node only"
    finally:
        leftover = dep.stop_all()
        # `ray start` recorded this cluster as the machine's current one; drop that record with it
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
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
    overrides = {"dataset": str(make_events(tmp_path / "events.csv", users=nodes)), "num-rounds": 1, "users-per-node": 1,
                 "fraction-train": 1.0, "eval-every": 1, "max-len": 16, "d-model": 16, "round-timeout": 120.0,
                 "out-dir": str(out_dir)}  # fmt: skip
    app_dir = _copy_app(tmp_path / "app")
    link_port, *node_ports = _free_ports(1 + nodes + 3)
    dep = LocalDeployment(tmp_path / "deployment", tls=tls)
    address = f"127.0.0.1:{link_port}"
    dep.write_cli_config(
        link_port, {"no-ca": {"address": address}, "plain": {"address": address, "insecure": True}}
    )

    def store(name: str) -> Path:
        return tmp_path / "deployment" / name / "store"

    try:
        dep.start_superlink(link_port, node_auth=True)
        _poll("the SuperLink to serve over TLS", deadline, lambda: dep.link_up(link_port), dep, every=1.0)
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
        _poll("the registered SuperNodes online", deadline, lambda: dep.online_nodes() == registered, dep)
        _poll(
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

        _run_to_completion(dep, app_dir, overrides, deadline)
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
        _poll(
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
