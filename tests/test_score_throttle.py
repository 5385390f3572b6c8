"""A night whose writes are throttled: 503 SlowDown replies are ridden out, not fatal.

On main, `xfer score` through a proxy answering ``503 SlowDown`` to six PUTs of
``.parquet`` objects exited 1 with ``boto3.exceptions.S3UploadFailedError``: boto3's
managed upload wraps the error, and nothing classified it as transient.
"""

from __future__ import annotations

import pytest

from .faultproxy import FaultProxy
from .test_score_outage import IMAGES, Night, finish, night, night_images  # noqa: F401

pytestmark = pytest.mark.slow


def test_throttled_parquet_writes_are_ridden_out(night: Night) -> None:  # noqa: F811
    date = "2026-06-03"
    with FaultProxy(night.server.endpoint) as proxy:
        rule = proxy.add("PUT", r"\.parquet$", "slowdown", times=6)
        code, _, err = finish(night.score(date, endpoint=proxy.endpoint))
    assert code == 0, err[-4000:]
    assert rule.hits == 6, "the proxy throttled fewer writes than planned"
    assert "S3UploadFailedError" not in err
    rows = night.committed_rows(date)
    assert sorted(r["key"] for r in rows) == sorted(night.inputs) and len(rows) == IMAGES
