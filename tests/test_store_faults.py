"""Every store call classified once: error replies and resets through a real proxy.

The fault proxy (tests/faultproxy.py) sits in front of the embedded S3 server and
answers chosen requests with 503 SlowDown, 500, 403 or a TCP reset. Every storage
operation, whichever client does it (boto3 calls, boto3's managed transfers, which
wrap the error in ``S3UploadFailedError`` / ``RetriesExceededError``, and pyarrow),
must turn a transient reply into :class:`StoreUnavailable`, ridden out within the
budget, and a permanent one into a :class:`StorageError` that is not retried.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pytest

from xfer.errors import StorageError, StoreUnavailable
from xfer.store import retry, storage

from .faultproxy import FaultProxy

TABLE = pa.table({"n": list(range(100))})


def _ops(bucket: str, tmp: str) -> dict[str, tuple[str, str, Callable[[], Any]]]:
    """name -> (S3 operation the proxy sees, key pattern, the call)."""
    obj, pq = f"{bucket}/d/blob.bin", f"{bucket}/d/part-00403.parquet"
    local = os.path.join(tmp, "part.parquet")
    return {
        "read_bytes": ("GET", r"blob\.bin", lambda: storage.read_bytes(obj)),
        "write_bytes": ("PUT", r"blob\.bin", lambda: storage.write_bytes(obj, b"x")),
        "write_parquet": ("PUT", r"part-00403", lambda: storage.write_parquet(TABLE, pq)),
        "upload_file": (
            "PUT",
            r"up\.parquet",
            lambda: storage.upload_file(local, f"{bucket}/d/up.parquet"),
        ),
        "download_file": ("GET", r"part-00403", lambda: storage.download_file(pq, local + ".dl")),
        "read_row_groups": ("GET", r"part-00403", lambda: storage.read_row_groups(pq, [0])),
        "parquet_metadata": ("HEAD", r"part-00403", lambda: storage.parquet_metadata(pq)),
        "read_parquet": ("GET", r"part-00403", lambda: storage.read_parquet(pq)),
        "copy": ("COPY", r"copy\.bin", lambda: storage.copy(obj, f"{bucket}/d/copy.bin")),
        "list_files": ("LIST", r"prefix=d", lambda: storage.list_files(f"{bucket}/d")),
        "exists": ("HEAD", r"blob\.bin", lambda: storage.exists(obj)),
        "delete_prefix": ("POST", r"delete", lambda: storage.delete_prefix(f"{bucket}/e")),
    }


@pytest.fixture
def seeded(fault_proxy: FaultProxy, bucket: str, tmp_path: Any) -> dict[str, Any]:
    storage.write_bytes(f"{bucket}/d/blob.bin", b"hello")
    storage.write_parquet(TABLE, f"{bucket}/d/part-00403.parquet")
    storage.write_bytes(f"{bucket}/e/x", b"x")
    import pyarrow.parquet as pq

    pq.write_table(TABLE, os.path.join(tmp_path, "part.parquet"))
    return _ops(bucket, str(tmp_path))


OPS = list(_ops("s3://b-b", "/tmp"))


@pytest.mark.parametrize("fault", ["slowdown", "reset"])
@pytest.mark.parametrize("op", OPS)
def test_transient_replies_are_store_unavailable_past_the_budget(
    seeded: dict[str, Any], fault_proxy: FaultProxy, op: str, fault: str
) -> None:
    method, pattern, call = seeded[op]
    fault_proxy.add(method, pattern, fault, times=1000)
    with pytest.raises(StoreUnavailable) as info:
        call()
    assert fault_proxy.requests(method, pattern), "the fault was never injected"
    assert "s3://" in str(info.value)


@pytest.mark.parametrize("op", OPS)
def test_transient_replies_are_ridden_out_within_the_budget(
    seeded: dict[str, Any], fault_proxy: FaultProxy, op: str
) -> None:
    method, pattern, call = seeded[op]
    # More failures than the SDK's own attempts (2 here), fewer than the budget allows.
    rule = fault_proxy.add(method, pattern, "slowdown", times=3)
    with retry.budget(60):
        call()
    assert rule.hits == 3


@pytest.mark.parametrize("op", OPS)
def test_access_denied_fails_at_once_and_is_not_retried(
    seeded: dict[str, Any], fault_proxy: FaultProxy, op: str
) -> None:
    method, pattern, call = seeded[op]
    rule = fault_proxy.add(method, pattern, "denied", times=1000)
    with retry.budget(60), pytest.raises(StorageError) as info:
        call()
    assert not isinstance(info.value, StoreUnavailable)
    assert "access denied" in str(info.value)
    assert rule.hits <= 2  # the SDK may try twice; xfer's budget does not retry it


def test_a_key_that_contains_403_is_not_access_denied(
    seeded: dict[str, Any], fault_proxy: FaultProxy, bucket: str
) -> None:
    """pyarrow's message names the key: a 503 on part-00403 is a 503, not a 403."""
    fault_proxy.add("HEAD", r"part-00403", "unavailable", times=1000)
    fault_proxy.add("GET", r"part-00403", "unavailable", times=1000)
    with pytest.raises(StoreUnavailable):
        storage.parquet_metadata(f"{bucket}/d/part-00403.parquet")


def test_a_500_reply_is_transient_too(seeded: dict[str, Any], fault_proxy: FaultProxy) -> None:
    method, pattern, call = seeded["write_parquet"]
    fault_proxy.add(method, pattern, "internal", times=1000)
    with pytest.raises(StoreUnavailable, match="InternalError"):
        call()


def test_keys_a_multi_delete_refuses_are_an_error_not_ignored(
    seeded: dict[str, Any], fault_proxy: FaultProxy, bucket: str
) -> None:
    """DeleteObjects answers 200 and lists the keys it did not delete; on main those
    were ignored, so a commit went on as if the old files were gone."""
    fault_proxy.add("POST", r"\?delete", "refuse_keys", times=1)
    with pytest.raises(StorageError, match="access denied") as info:
        storage.delete_prefix(f"{bucket}/e")
    assert not isinstance(info.value, StoreUnavailable)
    assert storage.exists(f"{bucket}/e/x")


def test_the_budget_is_the_processs_not_an_environment_variable():
    """Every thread of the process rides out the same outage (a worker's readers run in
    threads), the block restores the budget before it, and nothing goes through the
    environment: workers get the budget as part of their job."""
    import threading

    before = dict(os.environ)
    seen: list[float] = []
    assert retry.budget_seconds() == 0.0
    with retry.budget(42):
        thread = threading.Thread(target=lambda: seen.append(retry.budget_seconds()))
        thread.start()
        thread.join()
        with retry.budget(5):
            assert retry.budget_seconds() == 5.0
        assert retry.budget_seconds() == 42.0
        assert dict(os.environ) == before
    assert seen == [42.0] and retry.budget_seconds() == 0.0
