"""SIGTERM, as Kubernetes, `timeout` and schedulers send it, stops everything a
command started: real `xfer` processes, their real S3 server and local Ray, found
by walking /proc from the command's pid before the signal and checked after it."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time

from xfer.store.s3server import free_port_pair

from .conftest import run_xfer, xfer_argv


def _ppids() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    out[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for child, parent in _ppids().items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper has stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Command:
    """An `xfer` command in its own session, its output read line by line."""

    def __init__(self, *args: str, cwd: str | None = None):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            xfer_argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(self.lines)}")

    def terminate_and_wait(self, timeout: float = 120) -> tuple[int, str]:
        os.kill(self.proc.pid, signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return rc, "".join(self.lines)

    def kill(self) -> None:
        """Clean-up after a failed test: this command's own session only."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


def assert_all_stopped(pids: set[int], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.5)
    left = {p: command(p)[:120] for p in pids if alive(p)}
    for p in left:  # never leave them behind, even when failing
        os.kill(p, signal.SIGKILL)
    assert not left, f"still running after SIGTERM: {left}"


def test_sigterm_mid_demo_stops_the_s3_server_and_ray(tmp_path):
    cmd = Command("demo", "--quick", "--workdir", str(tmp_path / "demo"))
    try:
        cmd.wait_for(r"\[xfer\] run \S+: \d+ worker", timeout=600)  # Ray Train is running
        time.sleep(3)  # its workers are up
        started = descendants(cmd.proc.pid)
        names = " ".join(command(p) for p in started)
        assert "weed" in names and "raylet" in names, names
        rc, output = cmd.terminate_and_wait()
    finally:
        cmd.kill()
    assert rc == 143, output[-3000:]
    assert output.rstrip().splitlines()[-1] == "xfer: stopped (SIGTERM)", output[-3000:]
    assert_all_stopped(started)


def test_sigterm_stops_the_s3_server_and_the_port_is_free_again_at_once(tmp_path):
    port = free_port_pair(set())
    data = str(tmp_path / "s3")
    first = Command("s3-server", "--data-dir", data, "--port", str(port))
    try:
        first.wait_for("Ctrl-C stops the server", timeout=60)
        started = descendants(first.proc.pid)
        assert any("weed" in command(p) for p in started)
        rc, output = first.terminate_and_wait()
        assert rc == 143, output  # as every command stopped by SIGTERM
        assert output.rstrip().splitlines()[-1] == "xfer: stopped (SIGTERM)", output
        assert_all_stopped(started)
        # At once on the same port: the new server waits for the old one to let go.
        second = Command("s3-server", "--data-dir", data, "--port", str(port))
        try:
            second.wait_for("Ctrl-C stops the server", timeout=60)
            assert second.terminate_and_wait()[0] == 143
        finally:
            second.kill()
    finally:
        first.kill()


def test_a_port_without_room_for_its_grpc_twin_is_one_line(tmp_path):
    out = run_xfer("s3-server", "--data-dir", str(tmp_path), "--port", "60000", timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "xfer: error: S3 port 60000: must be between 1 and 55535 "
        "(the server also listens on port + 10000 for gRPC)"
    ]
