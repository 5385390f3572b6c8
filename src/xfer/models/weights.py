"""Pretrained weights from a file or object storage, fetched once per machine.

``model.weights`` is ``imagenet`` (Keras' download: needs internet), ``none``, or a
local path / ``s3://`` URI of an ``.h5`` weights file: the way air-gapped clusters
get pretrained bases. Remote files are cached under ``~/.cache/xfer/weights``
(``XFER_CACHE_DIR``) keyed by URI and the object's version (its ETag), so each
machine downloads a file once and new bytes under the same key are always fetched.

The driver resolves the weights first and hands their sha256 to every worker; each
worker checks that the file it loads has exactly those bytes (a cached copy that
does not is fetched again; an object replaced in mid-run is an error), so every
rank starts from the same base and lineage records the bytes that were trained.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from xfer.errors import ConfigError, NotFoundError
from xfer.registry.provenance import file_sha256
from xfer.store import s3, storage

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


def check_weights(spec: str) -> None:
    """Fail early (on the driver) if a weights file does not exist."""
    if spec in KEYWORDS:
        return
    try:
        if not storage.exists(spec):
            raise ConfigError(f"model.weights: no file at {spec}")
    except NotFoundError as exc:
        raise ConfigError(f"model.weights: {exc}") from None


def fetch_weights(spec: str, expect_sha256: str | None = None) -> WeightsSource:
    """Resolve ``model.weights`` to a local file (downloading once), with its checksum.

    With ``expect_sha256`` (on the workers: what the driver resolved), the file must
    have exactly those bytes.
    """
    if spec in KEYWORDS:
        return WeightsSource(spec, None, None)
    if not s3.is_s3(spec):
        path = s3.local_path(spec)
        if not os.path.isfile(path):
            raise ConfigError(f"model.weights: no file at {spec}")
        return _checked(WeightsSource(spec, path, file_sha256(path)), expect_sha256)
    try:
        info = storage.stat(spec)
    except NotFoundError as exc:
        raise ConfigError(f"model.weights: {exc}") from None
    key = hashlib.sha256(f"{spec}\0{info.size}\0{info.version}".encode()).hexdigest()[:20]
    path = os.path.join(cache_dir(), key, storage.basename(spec))
    if os.path.isfile(path) and os.path.getsize(path) == info.size:
        cached = WeightsSource(spec, path, file_sha256(path))
        if expect_sha256 is None or cached.sha256 == expect_sha256:
            return cached
    storage.download_file(spec, path)  # to a temp name, renamed into place
    return _checked(WeightsSource(spec, path, file_sha256(path)), expect_sha256)


def _checked(source: WeightsSource, expect_sha256: str | None) -> WeightsSource:
    if expect_sha256 is not None and source.sha256 != expect_sha256:
        raise ConfigError(
            f"model.weights: {source.spec} changed during the run (sha256 {source.sha256}, "
            f"the run started with {expect_sha256}); start a new run once it is stable"
        )
    return source
