"""Shared fixtures: one real embedded S3 server (SeaweedFS) per test session.

Tests never mock S3. Each test that needs storage gets its own bucket and the AWS
variables pointing at the server, so tests do not see each other's objects.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import xfer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)
from xfer.config import XferConfig, load_config
from xfer.store.s3server import EmbeddedS3

from .faultproxy import FaultProxy

REPO = Path(__file__).resolve().parents[1]


def config_for(root: str, *overrides: str) -> XferConfig:
    """The default config on storage root ``root``, with ``key=value`` overrides."""
    return load_config(None, [f"storage.root={root}", *overrides])


def xfer_argv(*args: str) -> list[str]:
    """``python -m xfer ARGS`` with this interpreter (for a process the test drives)."""
    return [sys.executable, "-m", "xfer", *args]


def run_xfer(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 300, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """``python -m xfer ARGS`` run to its end from the checkout, its output as text.

    ``env`` replaces the environment (default: this process's). The exit status is the
    test's to check.
    """
    return subprocess.run(
        xfer_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else dict(env),
        cwd=cwd,
    )


def s3_client(env: Mapping[str, str], **overrides: str) -> Any:
    """A boto3 S3 client for the server that ``env`` points at (``EmbeddedS3.env()``, or
    what ``xfer s3-server`` prints); ``key`` and ``secret`` replace its credentials."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        region_name=env["AWS_REGION"],
        aws_access_key_id=overrides.get("key", env["AWS_ACCESS_KEY_ID"]),
        aws_secret_access_key=overrides.get("secret", env["AWS_SECRET_ACCESS_KEY"]),
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


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


@pytest.fixture(scope="session")
def _fault_proxy_server(s3_server: EmbeddedS3) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint) as proxy:
        yield proxy


@pytest.fixture
def fault_proxy(
    _fault_proxy_server: FaultProxy, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the session's S3 server (tests/faultproxy.py).

    This test's own S3 calls (and the processes it starts with ``proxy.env()``) go
    through it; its rules and request log start empty.
    """
    _fault_proxy_server.clear()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", _fault_proxy_server.endpoint)
    yield _fault_proxy_server
    _fault_proxy_server.clear()


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


# ---------------------------------------------------------------- training data

SOURCE_CLASSES = ["star", "cross", "ring", "hexagon", "stripes", "dots"]
TARGET_CLASSES = ["ring", "star"]
IMAGE_SIZE = 48


@pytest.fixture(scope="session")
def session_root(s3_server: EmbeddedS3) -> str:
    """A storage root on S3 shared by the slow-to-build fixtures below."""
    s3_server.create_bucket("xfer-session")
    return "s3://xfer-session/xfer"


@pytest.fixture(scope="session")
def pretrained_weights(session_root: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An .h5 file of tiny_cnn base weights, pretrained on generated source shapes.

    Trained in this process with plain tf_keras (a few seconds), uploaded to S3, and
    loaded by training runs through the ``s3://`` weights path, as on an air-gapped
    cluster. The target task of the tests (ring vs star, new images) shares these
    shapes, so a head on the frozen base separates them well.
    """
    import numpy as np
    import tensorflow as tf

    from xfer.data.synth import render
    from xfer.models.model import build_model, compile_model, make_optimizer, unfreeze_top

    # Seeded: every model of the session trains on this base, and an unlucky random
    # initialisation left one session's models all near chance (0.36-0.57 test accuracy).
    tf.keras.utils.set_random_seed(1234)

    xs, ys = [], []
    for ci, shape in enumerate(SOURCE_CLASSES):
        rng = np.random.default_rng([101, ci])
        for _ in range(100):
            xs.append(np.asarray(render(shape, IMAGE_SIZE, rng), dtype="float32"))
            ys.append(ci)
    order = np.random.default_rng(0).permutation(len(xs))
    x, y = np.stack(xs)[order], np.array(ys)[order]
    cfg = load_config(
        None,
        [
            "model.base=tiny_cnn",
            "model.weights=none",
            "model.head.pooling=max",
            "model.head.dropout=0",
        ],
    )
    model, base = build_model(cfg.model, IMAGE_SIZE, len(SOURCE_CLASSES))
    unfreeze_top(base, None, None)
    compile_model(model, make_optimizer("adam", 3e-3), len(SOURCE_CLASSES))
    model.fit(x, y, epochs=12, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("weights") / "tiny_source.h5"
    base.save_weights(str(path))
    uri = f"{session_root}/weights/tiny_source.h5"
    from xfer.store import storage

    storage.upload_file(str(path), uri)
    return uri


@pytest.fixture(scope="session")
def target_dataset(session_root: str, ray_local: None) -> str:
    """Generated ring/star images, sharded into ``<root>/datasets/shapes``."""
    from xfer.config import ShardConfig
    from xfer.data.shard import shard_dataset
    from xfer.data.synth import synthesize

    synthesize(f"{session_root}/raw/shapes", TARGET_CLASSES, per_class=70, size=IMAGE_SIZE, seed=7)
    shard_dataset(
        f"{session_root}/raw/shapes",
        f"{session_root}/datasets/shapes",
        # max_side: recorded with the dataset and the model; scoring pre-resizes raw
        # images larger than this the same way (the generated ones are this size).
        ShardConfig(target_shard_mb=0.05, max_side=IMAGE_SIZE),
    )
    return f"{session_root}/datasets/shapes"


def train_overrides(root: str, weights: str, **extra: object) -> list[str]:
    """A small, fast two-phase run on the target dataset (2 workers, 48 px)."""
    items = {
        "storage.root": root,
        "data.dataset": "shapes",
        "data.image_size": IMAGE_SIZE,
        "data.augment.rotation": 0.02,
        "model.base": "tiny_cnn",
        "model.weights": weights,
        "model.head.pooling": "max",
        "model.head.dense": "[{units: 16}]",
        "model.head.dropout": 0.0,
        "train.batch_size": 8,
        "train.head.epochs": 4,
        "train.head.learning_rate": 0.005,
        "train.fine_tune.epochs": 1,
        "train.fine_tune.learning_rate": 0.0003,
        "train.fine_tune.unfreeze_top": 4,
        "train.verbose": 0,
        "cluster.num_workers": 2,
        "output.model_name": "shapes",
        "output.gate.min_test_accuracy": 0.8,
        # The SavedModel export costs a Ray task per run, and calibration a scoring pass
        # over the validation split (Ray Data actors): trained_run has both, for the
        # tests of export and calibration; the other runs of the suite do not need them.
        "output.export": "false",
        "output.calibrate": "false",
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="session")
def trained_run(session_root: str, pretrained_weights: str, target_dataset: str):
    """One complete two-phase training run with 2 Ray workers (shared by tests)."""
    from xfer.train.driver import train

    full = {"output.export": "true", "output.calibrate": "true"}
    overrides = train_overrides(session_root, pretrained_weights, **full)
    return train(load_config(None, overrides))
