"""Shared fixtures: one real embedded S3 server (SeaweedFS) per test session.

Tests never mock S3. Each test that needs storage gets its own bucket and the AWS
variables pointing at the server, so tests do not see each other's objects.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

import xfer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)
from xfer.s3server import EmbeddedS3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedS3]:
    server = EmbeddedS3(tmp_path_factory.mktemp("s3"))
    server.start()
    # Session-wide, so that a local Ray started later passes them on to its workers.
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_local(s3_server: EmbeddedS3) -> Iterator[None]:
    """A real local Ray instance (2 CPUs, like CI), shared by the session."""
    import ray

    from xfer.raycluster import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture
def s3_env(s3_server: EmbeddedS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The AWS variables for the embedded server, set for this test only."""
    env = s3_server.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("XFER_S3_MAX_ATTEMPTS", "2")
    return env


@pytest.fixture
def bucket(s3_server: EmbeddedS3, s3_env: dict[str, str]) -> str:
    """A fresh, empty bucket: ``s3://<name>``."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return f"s3://{name}"


@pytest.fixture(params=["s3", "local"])
def root(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> str:
    """A storage root on S3 and, as a second case, on the local filesystem."""
    if request.param == "s3":
        return request.getfixturevalue("bucket") + "/root"
    return os.path.join(str(tmp_path), "root")


def pytest_configure(config: pytest.Config) -> None:
    # Child processes (Ray workers, scripts) inherit these.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
