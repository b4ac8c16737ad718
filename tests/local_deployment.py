"""A local Flower deployment for tests: a real ``flower-superlink`` and real ``flower-supernode`` processes on
127.0.0.1 running the project's ServerApp/ClientApp, submitted with ``flwr run``.

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
``flwr supernode register``) are driven as cited in ``server/credentials.py``; ``tests/test_deployment.py`` runs them.

Every process started here (and all their descendants) carries a unique environment tag; all are stopped by
PID afterwards, and the tests assert that none is left running. Each deployment is also isolated from
anything else on the machine: its Ray processes keep their state in a temporary directory of their own
(``RAY_TMPDIR``: no stale ``ray_current_cluster`` of another run is ever joined), and the local SuperLink that
``:local:`` connections start listens on a free port of its own (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``: a
SuperLink some other run left on flwr's default port is never reused).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
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

import pytest

from server.credentials import NodeKeys, TlsFiles, superlink_args, supernode_args

NODES = 3
DEADLINE_S = (
    480.0  # one deployment test (start-up, its rounds, status checks); cleanup has its own bounded waits
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


def executable(name: str) -> str:
    """A console script of this interpreter's environment (the venv running the tests), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed (it comes with flwr)")
    return found


def free_ports(n: int) -> list[int]:
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


def tail(path: Path, chars: int = 3000) -> str:
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
        # short: Ray's unix sockets live under it (107-byte path limit)
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="tmepsr-ray-", dir="/tmp"))
        self.local_link_port = free_ports(1)[0]

    def env(self, flwr_home: Path) -> dict[str, str]:
        env = dict(os.environ, **FLOWER_ENV, FLWR_HOME=str(flwr_home), PYTHONUNBUFFERED="1")
        env[TAG_VAR] = self.tag
        env["RAY_TMPDIR"] = str(self.ray_tmp)
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(self.local_link_port)
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
                args,
                cwd=workdir,
                env=self.env(workdir / "flwr-home"),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
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
        cmd = [executable("flower-superlink"), *security, "--host", "127.0.0.1", "--port", str(port)]
        return self.spawn("superlink", cmd)

    def start_supernode(
        self,
        name: str,
        link_port: int,
        port: int,
        node_config: dict[str, Any],
        *,
        key: NodeKeys | None = None,
        security: list[str] | None = None,
        may_exit: bool = False,
    ) -> subprocess.Popen[bytes]:
        """``flower-supernode`` (Runtime API on ``port``) reaching the SuperLink like this deployment does,
        authenticating with ``key``; ``security`` replaces those flags (to try a wrong set-up)."""
        if security is None:
            security = supernode_args(self.tls.ca_cert, key) if self.tls else ["--insecure"]
        cmd = [
            executable("flower-supernode"),
            *security,
            "--superlink",
            f"127.0.0.1:{link_port}",
            "--port",
            str(port),
            "--node-config",
            _toml_pairs(node_config),
        ]
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
                [executable("flwr"), *args],
                cwd=self.cli_home.parent,
                env=self.env(self.cli_home),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
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
                pytest.fail(f"{name} exited early with code {proc.returncode}:\n{tail(self.logs[name])}")

    def report(self) -> str:
        """The tail of every process log, the local SuperLink's (started by ``flwr`` itself) included."""
        logs = dict(self.logs)
        logs |= {f"local {log.stem}": log for log in self.cli_home.glob("local-superlink/*.log")}
        return "\n".join(f"--- {name} ({log}):\n{tail(log, 1500)}" for name, log in logs.items())

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
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return [f"pid {pid}: {_cmdline(pid)}" for pid, start in sorted(self.known) if _running((pid, start))]


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return "?"


def poll(what: str, deadline: float, check, dep: LocalDeployment, every: float = 3.0):
    """Call ``check`` until it returns something truthy; fail with the process logs at the deadline."""
    while True:
        dep.check_alive()
        if result := check():
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{dep.report()}")
        time.sleep(every)


def copy_app(dest: Path) -> Path:
    """The Flower app as ``flwr run`` packs it: pyproject.toml and the packages (a copy, so the FAB is
    built from a fixed tree and the CLI never touches the repository's pyproject.toml)."""
    dest.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "results", "resources", "checkpoints")
    for pkg in APP_PACKAGES:
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=skip)
    return dest


def finite(value: Any) -> bool:
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    return isinstance(value, bool | int | float) and math.isfinite(value)


def run_to_completion(
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

    run = poll(f"run {run_id} to finish", deadline, finished, dep, every=5.0)
    if run["status"] != "finished:completed":
        logs = dep.cli("log", run_id, connection, "--show", timeout=60).stdout
        pytest.fail(
            f"run {run_id} ended {run['status']} ({run.get('status-details')}):\n"
            f"{logs[-4000:]}\n{dep.report()}"
        )
    return run


def start_federation(
    dep: LocalDeployment, link_port: int, node_ports: list[int], deadline: float
) -> list[Path]:
    """A plain SuperLink, then one SuperNode per port (partition k of ``len(node_ports)``, its own store), all
    online; returns the stores."""
    dep.start_superlink(link_port)
    poll("the SuperLink to serve", deadline, lambda: dep.link_up(link_port), dep, every=1.0)
    stores = [dep.root / f"supernode-{k}" / "store" for k in range(len(node_ports))]
    for k, (port, store) in enumerate(zip(node_ports, stores, strict=True)):
        node_config = {"partition-id": k, "num-partitions": len(node_ports), "store-dir": str(store)}
        dep.start_supernode(f"supernode-{k}", link_port, port, node_config)
    # The ServerApp sizes its cohort from the nodes connected when it starts: all must be online first.
    online = len(node_ports)
    poll(f"{online} SuperNodes to be online", deadline, lambda: len(dep.online_nodes()) == online, dep)
    return stores
