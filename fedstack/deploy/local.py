"""A real deployment on one machine: SuperLink + N SuperNodes as separate processes.

Everything the multi-host README does, on 127.0.0.1 with free ports: a private CA and a
SuperLink certificate, a SuperLink with TLS and `--enable-supernode-auth`, one registered
ECDSA P-384 key per SuperNode, one consortium identity per SuperNode and the roster they all
pin (`identity-key=... roster=...` in each node config, docs/consortium.md), each SuperNode
with its own node config, a connection in a temporary `$FLWR_HOME/config.toml`, and
`flwr run . CONNECTION --stream`. Used by the tests
and benchmarks, and by a person who wants to try the deployment path:

    python -m fedstack.deploy.local --supernodes 3 \
        --run-config "task='breast_cancer' aggregation='secagg'" --overrides "num_rounds=2"

Every process runs in its own process group and is torn down by PID (group) when the
harness closes, when a test fails (context manager), and at interpreter exit (atexit).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fedstack.consortium import (
    IDENTITY_KEY_NODE_KEY,
    KEY_SUFFIX,
    PUBLIC_SUFFIX,
    ROSTER_FILE_NAME,
    ROSTER_NODE_KEY,
    Roster,
    new_identity,
)
from fedstack.deploy.certs import make_certificates
from fedstack.deploy.node_keys import NodeKey, make_node_key, register_node_key

#: Loopback only: the harness never listens on another interface.
LOOPBACK = "127.0.0.1"
#: Name of the connection the harness writes into `$FLWR_HOME/config.toml`.
CONNECTION = "fedstack-local"
#: Environment every process of the deployment gets (no `uv sync`, no telemetry or update
#: check: nothing is downloaded at run time).
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
#: The repository whose pyproject.toml is the Flower app (`flwr run .`).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Seconds to wait for a process to exit after SIGTERM before SIGKILL.
TERM_GRACE_S = 5.0
#: Seconds to wait for the SuperLink to accept connections.
STARTUP_TIMEOUT_S = 60.0
#: Seconds `flwr run` may outlive a dead SuperLink before the harness ends it.
SUPERLINK_GONE_GRACE_S = 5.0
#: Run config keys the app declares (pyproject [tool.flwr.app.config]).
OVERRIDES_KEY = "overrides"
#: Node-config key of the policy's signature requirement (fedstack.policy).
REQUIRE_SIGNATURES_KEY = "require-signatures"

_LIVE: weakref.WeakSet[LocalDeployment] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for deployment in list(_LIVE):
        deployment.close()


atexit.register(_close_all_at_exit)


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def venv_bin() -> Path:
    """The bin directory of the interpreter running us (flwr, flower-superlink live there)."""
    return Path(sys.executable).parent


def toml_string(value: str) -> str:
    """A TOML basic string (JSON escaping is a subset TOML accepts for these values)."""
    return json.dumps(value, ensure_ascii=True)


def render_run_config(run_config: Mapping[str, Any], overrides: Sequence[str] = ()) -> str:
    """`--run-config` text: group choices plus the Hydra overrides in the `overrides` key."""
    entries = dict(run_config)
    extra = [str(entries.pop(OVERRIDES_KEY))] if entries.get(OVERRIDES_KEY) else []
    extra += [shlex.quote(str(o)) for o in overrides]
    if extra:
        entries[OVERRIDES_KEY] = " ".join(extra)
    return render_toml_pairs(entries)


def render_node_config(values: Mapping[str, Any]) -> str:
    """`--node-config` text (TOML values: strings quoted, numbers bare)."""
    return render_toml_pairs(values)


def render_toml_pairs(values: Mapping[str, Any]) -> str:
    """`key=value ...` with TOML values, as Flower's --run-config/--node-config parse them."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, int | float):
            parts.append(f"{key}={value}")
        else:
            parts.append(f"{key}={toml_string(str(value))}")
    return " ".join(parts)


@dataclass
class ManagedProcess:
    """A process we started, in its own process group, logging to a file."""

    name: str
    command: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    log_handle: TextIO | Any

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, *, kill: bool = False, grace: float = TERM_GRACE_S) -> None:
        """SIGTERM (or SIGKILL) the whole group, wait, then SIGKILL whatever is left."""
        self.signal_group(signal.SIGKILL if kill else signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace)
        # Children (SuperExec, ServerApp, ClientApp processes) share the group.
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class SuperNodeSpec:
    """How one SuperNode is started (defaults: registered key, TLS on)."""

    index: int
    node_config: dict[str, Any]
    key: NodeKey | None
    register: bool = True
    tls: bool = True
    port: int = 0
    node_id: int | None = None
    process: ManagedProcess | None = None


@dataclass
class RunResult:
    """What `flwr run` left: exit status, its streamed log, and the run directory."""

    returncode: int
    log: str
    seconds: float
    run_dir: Path | None
    summary: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.summary is not None


class LocalDeployment:
    """SuperLink + SuperNodes on loopback, over TLS with node authentication.

    Use as a context manager; `close()` is idempotent and also runs at interpreter exit.
    """

    def __init__(self, work_dir: Path | None = None, *, num_supernodes: int = 3,
                 node_config: Mapping[int, Mapping[str, Any]] | None = None,
                 app_dir: Path = REPO_ROOT, tls: bool = True, node_auth: bool = True,
                 extra_env: Mapping[str, str] | None = None, consortium: bool = True,
                 require_signatures: bool | None = None) -> None:
        """`consortium`: give each SuperNode of `start()` an identity and the shared roster.
        `require_signatures`: the nodes' `require-signatures` policy key (None: unset, so a
        node that pins the roster requires `aggregation.security=malicious`)."""
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if work_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedstack-deploy-")
            work_dir = Path(self._tmp.name)
        self.work_dir = Path(work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.work_dir / "flwr-home"
        self.certs_dir = self.work_dir / "certs"
        self.keys_dir = self.work_dir / "node-keys"
        self.consortium_dir = self.work_dir / "consortium"
        self.consortium = consortium
        self.require_signatures = require_signatures
        self.logs_dir = self.work_dir / "logs"
        self.outputs_dir = self.work_dir / "outputs"
        self.database = self.work_dir / "superlink.db"
        for path in (self.flwr_home, self.logs_dir, self.outputs_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.app_dir = Path(app_dir).resolve()
        self.tls = tls
        self.node_auth = node_auth
        self.num_supernodes = num_supernodes
        self.superlink_port = free_port()
        self.superlink: ManagedProcess | None = None
        self.supernodes: dict[int, SuperNodeSpec] = {}
        self._node_config = {i: dict(node_config.get(i, {})) for i in node_config or {}}
        self._processes: list[ManagedProcess] = []
        self._closed = False
        self._lock = threading.Lock()
        bin_dir = venv_bin()
        self.env = {
            **os.environ,
            **FLOWER_ENV,
            "FLWR_HOME": str(self.flwr_home),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            # Relative output_dir values land here (the ServerApp runs in the SuperLink's cwd).
            "FEDSTACK_OUTPUT_BASE": str(self.work_dir),
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        self.flwr = str(bin_dir / "flwr")
        _LIVE.add(self)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.superlink_port}"

    @property
    def ca_cert(self) -> Path:
        return self.certs_dir / "ca.crt"

    def start(self) -> None:
        """Certificates, SuperLink, connection, then every SuperNode (registered)."""
        if self.tls and not self.ca_cert.exists():
            make_certificates(self.certs_dir, [LOOPBACK, "localhost"])
        self.write_connection()
        self.start_superlink()
        for index, node_config in enumerate(self.initial_node_configs()):
            self.add_supernode(index, node_config)

    def initial_node_configs(self) -> list[dict[str, Any]]:
        """The node config of each SuperNode `start()` adds: its partition, its consortium
        identity and roster, then the caller's own keys (which win)."""
        pinned = self.make_consortium() if self.consortium else {}
        policy = ({} if self.require_signatures is None
                  else {REQUIRE_SIGNATURES_KEY: self.require_signatures})
        return [{"partition-id": index, "num-partitions": self.num_supernodes,
                 **pinned.get(index, {}), **policy, **self._node_config.get(index, {})}
                for index in range(self.num_supernodes)]

    def make_consortium(self) -> dict[int, dict[str, str]]:
        """One identity per SuperNode and the roster all pin: the node-config keys of each.

        Done the way members of a consortium do it (docs/consortium.md): each makes its own
        key (`fedstack identity new`), the roster is built from the public halves only.
        Reuses the identities of an earlier start in the same work dir.
        """
        directory = self.consortium_dir
        roster_path = directory / ROSTER_FILE_NAME
        names = [f"supernode-{index}" for index in range(self.num_supernodes)]
        if roster_path.exists() and Roster.load(roster_path).names == tuple(sorted(names)):
            roster = Roster.load(roster_path)
        else:
            for name in names:
                if not (directory / f"{name}{KEY_SUFFIX}").exists():
                    new_identity(name, directory)
            roster = Roster.from_public_files(directory / f"{name}{PUBLIC_SUFFIX}"
                                              for name in names)
            roster.save(roster_path)
        return {index: {IDENTITY_KEY_NODE_KEY: str(directory / f"{name}{KEY_SUFFIX}"),
                        ROSTER_NODE_KEY: str(roster_path)}
                for index, name in enumerate(names) if name in roster}

    def close(self) -> None:
        """Stop every process we started (by process group), newest first."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # SIGTERM every group at once, then wait, then SIGKILL what is left: one grace
        # period in total, not one per process.
        live = [p for p in reversed(self._processes) if p.alive()]
        for process in live:
            process.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE_S
        for process in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        for process in reversed(self._processes):
            process.stop(kill=True, grace=1.0)
        _LIVE.discard(self)
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()

    # ------------------------------------------------------------------ processes

    def _spawn(self, name: str, command: list[str], cwd: Path | None = None) -> ManagedProcess:
        if self._closed:
            raise RuntimeError("this deployment is closed")
        log_path = self.logs_dir / f"{name}.log"
        handle = open(log_path, "a")  # noqa: SIM115 (closed by the pump thread)
        handle.write(f"\n$ {shlex.join(command)}\n")
        handle.flush()
        popen = subprocess.Popen(command, cwd=cwd or self.work_dir, env=self.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        # Flower's SuperNode log has no timestamps; latency analysis needs them.
        threading.Thread(target=_pump_with_timestamps, args=(popen, handle), daemon=True,
                         name=f"log-{name}").start()
        process = ManagedProcess(name, command, log_path, popen, handle)
        self._processes.append(process)
        return process

    def superlink_command(self) -> list[str]:
        command = [str(venv_bin() / "flower-superlink"), "--host", LOOPBACK,
                   "--port", str(self.superlink_port),
                   "--database", str(self.database),
                   "--disable-runtime-dependency-installation"]
        if self.tls:
            command += ["--ssl-ca-certfile", str(self.ca_cert),
                        "--ssl-certfile", str(self.certs_dir / "server.pem"),
                        "--ssl-keyfile", str(self.certs_dir / "server.key")]
        else:
            command.append("--insecure")
        if self.node_auth:
            command.append("--enable-supernode-auth")
        return command

    def start_superlink(self, timeout: float = STARTUP_TIMEOUT_S) -> ManagedProcess:
        """Start (or restart, same database and port) the SuperLink; wait until it listens."""
        if self.superlink is not None and self.superlink.alive():
            raise RuntimeError("the SuperLink is already running")
        self.superlink = self._spawn("superlink", self.superlink_command())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.superlink.alive():
                raise RuntimeError("flower-superlink exited at start-up:\n"
                                   + self.superlink.log_tail())
            with contextlib.suppress(OSError), socket.create_connection(
                    (LOOPBACK, self.superlink_port), timeout=1.0):
                return self.superlink
            time.sleep(0.2)
        raise TimeoutError(f"the SuperLink did not listen on {self.address} within {timeout} s")

    def kill_superlink(self) -> None:
        """Kill the SuperLink and its SuperExec/ServerApp children (a crash, not a shutdown)."""
        if self.superlink is not None:
            self.superlink.stop(kill=True)

    def write_connection(self) -> Path:
        """The `[superlink.fedstack-local]` entry in `$FLWR_HOME/config.toml`."""
        lines = ["[superlink]", f"default = {toml_string(CONNECTION)}", "",
                 f"[superlink.{CONNECTION}]", f"address = {toml_string(self.address)}"]
        if self.tls:
            lines.append(f"root-certificates = {toml_string(str(self.ca_cert))}")
        else:
            lines.append("insecure = true")
        path = self.flwr_home / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def add_supernode(self, index: int, node_config: Mapping[str, Any], *,
                      register: bool = True, tls: bool = True,
                      with_key: bool = True) -> SuperNodeSpec:
        """Make a key, register it (unless told not to) and start `flower-supernode`."""
        key = make_node_key(self.keys_dir, f"supernode-{index}", overwrite=True) \
            if with_key else None
        spec = SuperNodeSpec(index, dict(node_config), key, register=register, tls=tls,
                             port=free_port())
        if key is not None and register and self.node_auth:
            spec.node_id = register_node_key(self.flwr, key.public_key, CONNECTION, self.env,
                                             name=f"supernode-{index}")
        self.supernodes[index] = spec
        self.start_supernode(index)
        return spec

    def supernode_command(self, spec: SuperNodeSpec) -> list[str]:
        command = [str(venv_bin() / "flower-supernode"), "--superlink", self.address,
                   "--port", str(spec.port),
                   "--node-config", render_node_config(spec.node_config)]
        if spec.tls and self.tls:
            command += ["--root-certificates", str(self.ca_cert)]
        else:
            command.append("--insecure")
        if spec.key is not None:
            command += ["--auth-supernode-private-key", str(spec.key.private_key)]
        return command

    def start_supernode(self, index: int) -> ManagedProcess:
        spec = self.supernodes[index]
        if spec.process is not None and spec.process.alive():
            raise RuntimeError(f"SuperNode {index} is already running")
        spec.process = self._spawn(f"supernode-{index}", self.supernode_command(spec))
        return spec.process

    def kill_supernode(self, index: int) -> None:
        """SIGKILL one SuperNode and its ClientApp processes (a crash, not a shutdown)."""
        process = self.supernodes[index].process
        if process is not None:
            process.stop(kill=True)

    # ------------------------------------------------------------------ operator side

    def connected_nodes(self) -> list[dict[str, Any]]:
        """`flwr supernode ls` (JSON): the nodes the SuperLink knows and their status."""
        proc = subprocess.run([self.flwr, "supernode", "ls", CONNECTION, "--format", "json"],
                              env=self.env, capture_output=True, text=True, timeout=60)
        match = re.search(r"\{.*\}", proc.stdout, re.S)
        if proc.returncode != 0 or match is None:
            raise RuntimeError(f"`flwr supernode ls` failed: {proc.stdout[-800:]}"
                               f"{proc.stderr[-800:]}")
        data = json.loads(match.group(0))
        return list(data.get("nodes", []))

    def wait_for_nodes(self, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Wait until `count` SuperNodes are online."""
        deadline = time.monotonic() + timeout
        nodes: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            nodes = [n for n in self.connected_nodes() if _is_online(n)]
            if len(nodes) >= count:
                return nodes
            time.sleep(1.0)
        raise TimeoutError(f"only {len(nodes)} of {count} SuperNodes online after {timeout} s; "
                           f"logs in {self.logs_dir}")

    def run(self, run_config: Mapping[str, Any], overrides: Sequence[str] = (), *,
            run_name: str | None = None, timeout: float = 600.0,
            on_line: Callable[[str], None] | None = None) -> RunResult:
        """`flwr run APP CONNECTION --stream --run-config ...`; returns the run's outputs.

        Outputs go to `<work_dir>/outputs/<run_name>` (absolute `output_dir`), unless the
        overrides resume an existing run directory. `on_line` sees every streamed log line
        (fault tests use it to act at a given stage).
        """
        overrides = list(overrides)
        if not any(o.startswith("resume=") for o in overrides):
            run_name = run_name or f"run-{int(time.time() * 1000)}"
            overrides += [f"output_dir={self.outputs_dir}", f"run_name={run_name}"]
        command = [self.flwr, "run", str(self.app_dir), CONNECTION, "--stream",
                   "--run-config", render_run_config(run_config, overrides)]
        started = time.monotonic()
        log_path = self.logs_dir / f"flwr-run-{run_name or 'resume'}.log"
        proc = subprocess.Popen(command, cwd=self.app_dir, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                start_new_session=True, bufsize=1)
        lines: list[str] = []
        timer = threading.Timer(timeout, lambda: _kill_group(proc.pid))
        timer.start()
        finished = threading.Event()
        # `flwr run --stream` keeps retrying a SuperLink that died; a crashed SuperLink ends
        # the command here so that a fault test can restart it and resume.
        threading.Thread(target=self._end_run_if_superlink_dies, args=(proc, finished),
                         daemon=True).start()
        try:
            assert proc.stdout is not None
            with open(log_path, "w") as log_file:
                for line in proc.stdout:
                    lines.append(line)
                    log_file.write(line)
                    log_file.flush()
                    if on_line is not None:
                        on_line(line)
            proc.wait()
        finally:
            finished.set()
            timer.cancel()
            if proc.poll() is None:
                _kill_group(proc.pid)
                proc.wait()
        seconds = time.monotonic() - started
        text = "".join(lines)
        run_dir = self._find_run_dir(overrides, run_name)
        result = RunResult(proc.returncode, text, seconds, run_dir)
        if run_dir is not None:
            summary_path = run_dir / "summary.json"
            if summary_path.exists():
                result.summary = json.loads(summary_path.read_text())
            history_path = run_dir / "history.jsonl"
            if history_path.exists():
                result.history = [json.loads(line) for line in
                                  history_path.read_text().splitlines() if line.strip()]
        return result

    def _end_run_if_superlink_dies(self, proc: subprocess.Popen[str],
                                   finished: threading.Event) -> None:
        while not finished.wait(1.0):
            if self.superlink is None or not self.superlink.alive():
                time.sleep(SUPERLINK_GONE_GRACE_S)
                if proc.poll() is None:
                    _kill_group(proc.pid)
                return

    def _find_run_dir(self, overrides: Sequence[str], run_name: str | None) -> Path | None:
        for item in overrides:
            if item.startswith("resume="):
                return Path(item.partition("=")[2])
        if run_name is None:
            return None
        path = self.outputs_dir / run_name
        return path if path.exists() else None


def _pump_with_timestamps(popen: subprocess.Popen[bytes], handle: TextIO) -> None:
    """Copy a process's output to its log file, each line prefixed with the wall time."""
    assert popen.stdout is not None
    try:
        for raw in popen.stdout:
            stamp = time.strftime("%H:%M:%S", time.localtime())
            fraction = f"{time.time() % 1:.3f}"[1:]
            handle.write(f"{stamp}{fraction} {raw.decode(errors='replace')}")
            handle.flush()
    except (OSError, ValueError):
        pass
    finally:
        with contextlib.suppress(OSError, ValueError):
            handle.close()


def _is_online(node: Mapping[str, Any]) -> bool:
    status = str(node.get("status", "")).lower()
    return status in ("online", "connected", "active")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def local_deployment(**kwargs: Any) -> Iterator[LocalDeployment]:
    """`with local_deployment(num_supernodes=3) as dep: dep.run({...})`."""
    deployment = LocalDeployment(**kwargs)
    with deployment:
        yield deployment


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fedstack.deploy.local",
        description="Run fedstack on a local deployment (SuperLink + SuperNodes, TLS, node "
                    "authentication), then tear it down.")
    parser.add_argument("--supernodes", type=int, default=3, help="number of SuperNodes")
    parser.add_argument("--run-config", default="task='breast_cancer' aggregation='fedavg'",
                        help="Flower run config (TOML key=value pairs: task, aggregation, dp, "
                             "partition, overrides)")
    parser.add_argument("--overrides", default="",
                        help="extra Hydra overrides, e.g. \"num_rounds=2 round_timeout=60\"")
    parser.add_argument("--node-config", action="append", default=[], metavar="I:KEY=VALUE",
                        help="extra node config for SuperNode I (repeatable), e.g. "
                             "0:require-aggregation=secagg")
    parser.add_argument("--require-signatures", choices=("true", "false"), default=None,
                        help="every SuperNode's require-signatures policy (default: unset, so "
                             "nodes, which pin the harness's roster, require "
                             "aggregation.security=malicious)")
    parser.add_argument("--no-consortium", action="store_true",
                        help="give the SuperNodes no identity and no roster")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep certificates, keys, logs and outputs here (default: a "
                             "temporary directory, removed at the end)")
    parser.add_argument("--timeout", type=float, default=900.0)
    return parser.parse_args(argv)


def _parse_run_config(text: str) -> dict[str, Any]:
    """Parse `--run-config` exactly as `flwr run` does."""
    from flwr.common.config import parse_config_args

    return dict(parse_config_args([text]))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    node_config: dict[int, dict[str, Any]] = {}
    for item in args.node_config:
        index, _, pair = item.partition(":")
        key, _, value = pair.partition("=")
        node_config.setdefault(int(index), {})[key] = value
    run_config = _parse_run_config(args.run_config)
    require = None if args.require_signatures is None else args.require_signatures == "true"
    with LocalDeployment(args.work_dir, num_supernodes=args.supernodes,
                         node_config=node_config, consortium=not args.no_consortium,
                         require_signatures=require) as deployment:
        print(f"SuperLink {deployment.address} (TLS, node auth); logs in {deployment.logs_dir}",
              flush=True)
        deployment.wait_for_nodes(args.supernodes)
        result = deployment.run(run_config, shlex.split(args.overrides), timeout=args.timeout,
                                on_line=lambda line: print(line, end="", flush=True))
        print(json.dumps({"returncode": result.returncode, "seconds": round(result.seconds, 1),
                          "run_dir": str(result.run_dir) if result.run_dir else None,
                          "summary": result.summary}, indent=2, default=str))
        return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
