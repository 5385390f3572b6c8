"""A real multi-node Ray cluster on 127.0.0.1, for the cluster tests.

    nodes = RayNodes(tmp_path, node_python(tmp_path))
    nodes.start_head()                  # `ray start --head --block`, token auth, 0 CPUs
    nodes.add_node("a"); nodes.add_node("b")   # `ray start --block`, 1 CPU each
    ... jobs/submit.sh against nodes.dashboard ...
    nodes.kill_node("b")                # SIGKILL to the node's raylet and its workers
    nodes.stop()

Every node is a `ray start --block` process tree of its own (its own session and
process group), started by the test and stopped by pid. The nodes run from an
environment that has the project's dependencies but not xfer, as a cluster's image
would before xfer is installed in it; `node_python(..., stale=True)` adds an old xfer
that must not be the one that runs. Each worker node has one CPU and the head none,
so Ray Train's two workers land on two different nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

STALE_VERSION = "0.0.1+stale"
STALE_MARKER = "STALE-XFER-IMPORTED"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_python(tmp: Path, stale: bool = True) -> Path:
    """A Python with the project's dependencies importable and xfer not (or an old one).

    A virtualenv whose only link to the project's packages is a ``.pth`` line naming
    their directory: the packages import, but the project's own editable install (a
    ``.pth`` hook inside that directory, which Python runs only for site directories)
    does not, so ``import xfer`` finds nothing, or the stale copy.
    """
    env_dir = tmp / "nodeenv"
    if not (env_dir / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site = Path(
        subprocess.run(
            [
                str(env_dir / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    if stale:
        package = tmp / "stale" / "xfer"
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text(
            "import sys\n"
            f"print({STALE_MARKER!r}, file=sys.stderr, flush=True)\n"
            f"__version__ = {STALE_VERSION!r}\n"
        )
        (site / "zz_stale_xfer.pth").write_text(str(tmp / "stale") + "\n")
    return env_dir / "bin" / "python"


class RayNodes:
    """A head and worker nodes, each a `ray start --block` process group we own."""

    def __init__(self, tmp: Path, python: Path, extra_env: dict[str, str] | None = None):
        self.tmp = tmp
        self.python = python
        self.token = secrets.token_hex(32)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            # `python` in a job's entry point is the nodes' Python, as on a cluster.
            PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}",
            # A lost node is noticed in seconds, not the default half minute.
            RAY_health_check_period_ms="1000",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="3",
        )
        env.update(extra_env or {})
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.gcs = ""
        self.dashboard = ""
        self.temp_dirs: list[str] = []
        self.killed: set[str] = set()
        self.taken: set[int] = set()

    def _start(self, name: str, args: list[str]) -> None:
        log = self.tmp / f"ray-{name}.log"
        self.logs[name] = log
        with open(log, "w") as out:
            self.procs[name] = subprocess.Popen(
                [str(self.python), "-m", "ray.scripts.scripts", "start", "--block", *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: raylet, workers, agents
            )

    def _node_ports(self) -> list[str]:
        # A session directory per node: nodes on one machine would otherwise share
        # socket paths. Short, because Unix socket paths are limited to 107 bytes.
        temp = tempfile.mkdtemp(prefix="xr-", dir="/tmp")
        self.temp_dirs.append(temp)
        # Ports are picked free now but bound later, so every port of the cluster is
        # kept apart from every node's worker range (and from each other).
        while (low := free_port()) + 60 > 65535 or self.taken & set(range(low, low + 61)):
            pass
        self.taken |= set(range(low, low + 61))
        port = self.port

        return [
            f"--temp-dir={temp}",
            # (Ray replaces a loopback address by the machine's own for its internal
            # ports; the dashboard, where jobs come in, stays on 127.0.0.1.)
            "--node-ip-address=127.0.0.1",
            f"--node-manager-port={port()}",
            f"--object-manager-port={port()}",
            f"--dashboard-agent-listen-port={port()}",
            f"--dashboard-agent-grpc-port={port()}",
            f"--runtime-env-agent-port={port()}",
            f"--metrics-export-port={port()}",
            f"--min-worker-port={low}",
            f"--max-worker-port={low + 60}",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
        ]

    def port(self) -> int:
        """A free port that no other part of this cluster was given."""
        while (p := free_port()) in self.taken:
            pass
        self.taken.add(p)
        return p

    def start_head(self) -> None:
        port, dashboard = self.port(), self.port()
        self.gcs = f"127.0.0.1:{port}"
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        self._start(
            "head",
            [
                "--head",
                f"--port={port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={self.port()}",
                "--num-cpus=0",  # drivers and controllers only; training runs on the nodes
                *self._node_ports(),
            ],
        )
        self.wait_for_nodes(1)

    def add_node(self, name: str, num_cpus: int = 1) -> None:
        self._start(name, [f"--address={self.gcs}", f"--num-cpus={num_cpus}", *self._node_ports()])

    def alive_nodes(self) -> list[dict]:
        out = subprocess.run(
            [
                str(self.python),
                "-m",
                "ray.scripts.scripts",
                "list",
                "nodes",
                "--address",
                self.dashboard,
                "--format",
                "json",
                "--filter",
                "state=ALIVE",
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            return []
        try:
            return list(json.loads(out.stdout))
        except json.JSONDecodeError:
            return []

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.alive_nodes()) != count:
            dead = [
                n for n, p in self.procs.items() if p.poll() is not None and n not in self.killed
            ]
            if time.monotonic() > deadline or dead:
                tails = {n: self.logs[n].read_text()[-2000:] for n in self.procs}
                raise RuntimeError(f"expected {count} Ray nodes (exited: {dead}): {tails}")
            time.sleep(1)

    def node_of(self, pid: int) -> str:
        """Which of our nodes a process (a Ray worker) belongs to: its session."""
        sid = os.getsid(pid)
        for name, proc in self.procs.items():
            if sid == proc.pid:
                return name
        raise LookupError(f"pid {pid} is in none of this test's Ray nodes")

    def kill_node(self, name: str) -> None:
        """The whole node at once: SIGKILL to every process of its session (the
        `ray start` process, raylet, agents, and the workers, which Ray puts in process
        groups of their own)."""
        proc = self.procs[name]
        self.killed.add(name)
        for pid in _session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        """The test bed away at once: SIGKILL to every process of every node's session
        (a graceful `ray start --block` shutdown took ~40 s a bed and proves nothing
        here; the tests that stop things gracefully stop what xfer started)."""
        for name in [n for n in self.procs if n != "head"] + ["head"]:
            proc = self.procs.get(name)
            if proc is None:
                continue
            for pid in _session_pids(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        for temp in self.temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)


def _session_pids(sid: int) -> list[int]:
    """Every live process in session ``sid`` (each node runs in a session of its own)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
    return pids
