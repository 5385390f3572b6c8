"""Pretrained weights from a file or object storage, fetched once per machine.

``model.weights`` is ``imagenet`` (Keras' download: needs internet), ``none``, or a
local path / ``s3://`` URI of an ``.h5`` weights file: the way air-gapped clusters
get pretrained bases. Remote files are cached under ``~/.cache/xfer/weights``
(``XFER_CACHE_DIR``) keyed by URI and size, so each worker downloads them once.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from xfer import storage
from xfer.errors import ConfigError, NotFoundError

KEYWORDS = ("imagenet", "none")


@dataclass(frozen=True)
class WeightsSource:
    spec: str  # as configured
    local_path: str | None  # a readable .h5 file, or None for imagenet/none
    sha256: str | None

    def lineage(self) -> dict[str, str | None]:
        return {"source": self.spec, "sha256": self.sha256}


def cache_dir() -> str:
    root = os.environ.get("XFER_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "xfer"
    )
    return os.path.join(root, "weights")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_weights(spec: str) -> None:
    """Fail early (on the driver) if a weights file does not exist."""
    if spec in KEYWORDS:
        return
    try:
        if not storage.exists(spec):
            raise ConfigError(f"model.weights: no file at {spec}")
    except NotFoundError as exc:
        raise ConfigError(f"model.weights: {exc}") from None


def fetch_weights(spec: str) -> WeightsSource:
    """Resolve ``model.weights`` to a local file (downloading once), with its checksum."""
    if spec in KEYWORDS:
        return WeightsSource(spec, None, None)
    if not storage.is_s3(spec):
        path = storage.local_path(spec)
        if not os.path.isfile(path):
            raise ConfigError(f"model.weights: no file at {spec}")
        return WeightsSource(spec, path, file_sha256(path))
    try:
        size = storage.stat(spec).size
    except NotFoundError as exc:
        raise ConfigError(f"model.weights: {exc}") from None
    key = hashlib.sha256(f"{spec}\0{size}".encode()).hexdigest()[:20]
    path = os.path.join(cache_dir(), key, storage.basename(spec))
    if not (os.path.isfile(path) and os.path.getsize(path) == size):
        storage.download_file(spec, path)  # to a temp name, renamed into place
    return WeightsSource(spec, path, file_sha256(path))
