"""`xfer s3-server` as users run it: a real process, real keys, clean shutdown."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from xfer.store.s3server import EmbeddedS3

from .conftest import s3_client, xfer_argv


def weed_pids(data_dir: str) -> list[int]:
    """PIDs of weed processes serving ``data_dir`` (from /proc, no pgrep self-match)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"weed") and any(data_dir.encode() in a for a in argv):
            pids.append(int(pid))
    return pids


def start_cli(data_dir: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    proc = subprocess.Popen(
        xfer_argv("s3-server", "--data-dir", data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    exports: dict[str, str] = {}
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        m = re.match(r"\s*export (AWS_\w+)=(\S+)", line)
        if m:
            exports[m.group(1)] = m.group(2)
        if "Ctrl-C" in line or time.monotonic() > deadline:
            break
    return proc, exports


def test_cli_server_exports_work_keys_enforced_and_ctrl_c_stops_everything(tmp_path):
    """Ctrl-C ends it with 130 and SIGTERM with 143, as every command (on main: 0)."""
    data_dir = str(tmp_path / "s3data")
    proc, exports = start_cli(data_dir)
    try:
        assert set(exports) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"}
        assert exports["AWS_ENDPOINT_URL_S3"].startswith("http://127.0.0.1:")
        assert weed_pids(data_dir), "no weed process is running"

        s3 = s3_client(exports)
        s3.put_object(Bucket="xfer", Key="hello.txt", Body=b"hi")  # the default bucket
        assert s3.get_object(Bucket="xfer", Key="hello.txt")["Body"].read() == b"hi"

        with pytest.raises(ClientError) as err:
            s3_client(exports, key="WRONGKEY0000").get_object(Bucket="xfer", Key="hello.txt")
        assert err.value.response["Error"]["Code"] == "InvalidAccessKeyId"
        with pytest.raises(ClientError) as err:
            s3_client(exports, secret="wrong-secret").get_object(Bucket="xfer", Key="hello.txt")
        assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
        anonymous = boto3.session.Session().client(
            "s3",
            endpoint_url=exports["AWS_ENDPOINT_URL_S3"],
            region_name="us-east-1",
            config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}),
        )
        with pytest.raises(ClientError) as err:
            anonymous.get_object(Bucket="xfer", Key="hello.txt")
        assert err.value.response["Error"]["Code"] == "AccessDenied"
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out  # like every command stopped by Ctrl-C
    assert "stopping" in out
    assert weed_pids(data_dir) == [], "a weed process survived Ctrl-C"

    # Data and keys survive a restart on the same data dir.
    proc2, exports2 = start_cli(data_dir)
    try:
        assert exports2["AWS_ACCESS_KEY_ID"] == exports["AWS_ACCESS_KEY_ID"]
        assert (
            s3_client(exports2).get_object(Bucket="xfer", Key="hello.txt")["Body"].read() == b"hi"
        )
    finally:
        proc2.terminate()
        proc2.communicate(timeout=60)
    assert proc2.returncode == 143  # SIGTERM, like every command
    assert weed_pids(data_dir) == []


def test_context_manager_binds_loopback_and_stops(tmp_path):
    data_dir = str(tmp_path / "cm")
    with EmbeddedS3(data_dir, buckets=("abc",)) as server:
        pid = server.pid
        assert server.endpoint.startswith("http://127.0.0.1:")
        with open("/proc/net/tcp") as f:
            listening = f.read()
        port_hex = f"{int(server.endpoint.rsplit(':', 1)[1]):04X}"
        # Listening sockets for the S3 port are on 127.0.0.1 (0100007F), never the wildcard.
        rows = [r.split() for r in listening.splitlines()[1:]]
        local = [r[1] for r in rows if r[1].endswith(":" + port_hex) and r[3] == "0A"]
        assert local and all(addr.startswith("0100007F") for addr in local)
        assert "s3-identities" not in repr(server) and server.secret_key not in repr(server)
    assert not os.path.exists(f"/proc/{pid}"), "the weed process is still there"
    assert weed_pids(data_dir) == []


def test_busy_port_is_a_clear_error(tmp_path, s3_server):
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    from xfer.errors import XferError

    with pytest.raises(XferError, match=f"port {port}.*already in use"):
        EmbeddedS3(str(tmp_path / "x"), port=port).start()


def test_a_port_taken_before_weed_binds_it_is_retried_with_new_ports(tmp_path, monkeypatch):
    """Seen in CI: a port found free was taken before weed bound it, and weed's own
    check refused it ("Port allocation failed"). The server starts again on new ports."""
    import socket

    import xfer.store.s3server as s3server

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken_port = busy.getsockname()[1]
    real = s3server.free_port_pair
    calls: list[int] = []

    def first_filer_port_is_busy(taken: set[int], *args: int) -> int:
        calls.append(1)
        return taken_port if len(calls) == 4 else real(taken, *args)  # s3, master, volume, filer

    monkeypatch.setattr(s3server, "free_port_pair", first_filer_port_is_busy)
    try:
        with EmbeddedS3(str(tmp_path / "race"), buckets=("abc",)) as server:
            assert len(calls) == 8, "weed was not started a second time"
            assert f":{taken_port}" not in server.endpoint
            log = (tmp_path / "race" / "weed.log").read_text()
            assert "Port allocation failed" in log or "address already in use" in log
            assert [b["Name"] for b in s3_client(server.env()).list_buckets()["Buckets"]] == ["abc"]
    finally:
        busy.close()


def test_chosen_ports_stay_out_of_the_ephemeral_range():
    """Outgoing connections take their local ports from the kernel's ephemeral range at
    any moment; weed's ports (and their gRPC twins) are chosen below it."""
    from xfer.store.s3server import GRPC_OFFSET, free_port_pair

    # The kernel's range, read here rather than through s3server's own reading of it.
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    taken: set[int] = set()
    for _ in range(20):
        port = free_port_pair(taken)
        assert not (lo <= port <= hi or lo <= port + GRPC_OFFSET <= hi), (port, lo, hi)


def test_a_few_hundred_buckets_each_take_writes(tmp_path):
    """Tests make a bucket each. By default each bucket (a SeaweedFS collection) took 7
    volumes out of free disk / 128 MB: with 77 GB free the 77th bucket's first PUT got
    InternalError, and the full suite failed at random places once it made that many."""
    with EmbeddedS3(tmp_path) as server:
        s3 = s3_client(server.env())
        for i in range(100):
            s3.create_bucket(Bucket=f"many-{i:03d}")
            s3.put_object(Bucket=f"many-{i:03d}", Key="k", Body=b"x")
        assert s3.get_object(Bucket="many-099", Key="k")["Body"].read() == b"x"
