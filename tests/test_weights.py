"""Pretrained weights from object storage: cached by content, verified on every worker."""

from __future__ import annotations

import hashlib

import pytest

from xfer.errors import ConfigError
from xfer.models.weights import fetch_weights
from xfer.store import storage


def test_new_bytes_under_the_same_key_and_size_are_fetched(bucket, tmp_path, monkeypatch):
    """The cache key is the object's version (ETag), not its URI and size."""
    monkeypatch.setenv("XFER_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"{bucket}/weights/base.h5"
    old, new = b"A" * 4096, b"B" * 4096  # same size: a size-keyed cache would keep A
    storage.write_bytes(uri, old)
    first = fetch_weights(uri)
    assert first.sha256 == hashlib.sha256(old).hexdigest()
    assert fetch_weights(uri).local_path == first.local_path  # a hit: no new download
    storage.write_bytes(uri, new)
    second = fetch_weights(uri)
    assert second.sha256 == hashlib.sha256(new).hexdigest()
    with open(second.local_path, "rb") as f:
        assert f.read() == new
    assert second.lineage() == {"source": uri, "sha256": hashlib.sha256(new).hexdigest()}


def test_a_worker_refuses_weights_other_than_the_drivers(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("XFER_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"{bucket}/weights/base.h5"
    storage.write_bytes(uri, b"driver's bytes")
    expected = fetch_weights(uri).sha256
    storage.write_bytes(uri, b"replaced mid-run")
    with pytest.raises(ConfigError, match=r"changed during the run .*the run started with"):
        fetch_weights(uri, expect_sha256=expected)


def test_a_damaged_cached_copy_is_fetched_again(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("XFER_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"{bucket}/weights/base.h5"
    storage.write_bytes(uri, b"C" * 1000)
    good = fetch_weights(uri)
    with open(good.local_path, "r+b") as f:  # same size, one byte flipped on disk
        f.write(b"X")
    again = fetch_weights(uri, expect_sha256=good.sha256)
    assert again.sha256 == good.sha256
