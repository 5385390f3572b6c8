"""A night of scoring while the object store goes away: ridden out, or failed cleanly
and resumed.

Each test runs `xfer score` as its own process (its own local Ray, as a scheduled
job would) against an embedded S3 server of its own, and kills that server by pid
in the middle of the night: after the first block's predictions are written. The
server is started again on the same port and data, as a restarted gateway would be.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xfer.data.synth import synthesize
from xfer.store import storage
from xfer.store.s3server import EmbeddedS3

from .conftest import REPO, s3_client, xfer_argv

pytestmark = pytest.mark.slow

BUCKET = "night"
IMAGES = 480
BLOCK = 8  # 60 blocks: the night is well under way, not over, when the store goes


class Night:
    """The test's own S3 server with a published model and a night's images."""

    def __init__(self, data_dir: Path, run_uri: str, images: Path):
        self.data_dir = data_dir
        self.server = EmbeddedS3(data_dir).start()
        self.port = int(self.server.endpoint.rsplit(":", 1)[1])
        client = s3_client(self.server.env())
        client.create_bucket(Bucket=BUCKET)
        # The trained run, copied from the session's server (read with its variables).
        for info in storage.list_files(run_uri):
            rel = info.uri[len(run_uri) + 1 :]
            if rel == "_SUCCESS" or rel == "config.yaml" or rel.startswith("model/"):
                key = f"xfer/runs/night-model/{rel}"
                client.put_object(Bucket=BUCKET, Key=key, Body=storage.read_bytes(info.uri))
        self.inputs = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.jpg"))
        for rel in self.inputs:
            client.put_object(
                Bucket=BUCKET, Key=f"incoming/{rel}", Body=(images / rel).read_bytes()
            )

    def score(self, date: str, *overrides: str, endpoint: str = "") -> subprocess.Popen[str]:
        env = {
            **os.environ,
            **self.server.env(),
            **({"AWS_ENDPOINT_URL_S3": endpoint} if endpoint else {}),
            "RAY_ADDRESS": "",
            "XFER_S3_MAX_ATTEMPTS": "2",
            "PYTHONPATH": str(REPO / "src"),
        }
        for key in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
            env.pop(key, None)
        cmd = xfer_argv(
            "score",
            "--model",
            f"s3://{BUCKET}/xfer/runs/night-model",
            "--input",
            f"s3://{BUCKET}/incoming",
            "--output",
            f"s3://{BUCKET}/preds",
            "--date",
            date,
            f"storage.root=s3://{BUCKET}/xfer",
            f"score.block_size={BLOCK}",
            "score.batch_size=4",
            "score.num_actors=1",
            "cluster.local_num_cpus=2",
            *overrides,
        )
        return subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def keys(self, prefix: str) -> list[str]:
        client = s3_client(self.server.env())
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def staged_parts(self, date: str) -> int:
        prefix = f"_tmp/xfer-score/preds/dt={date}/"
        return sum("/parts/part-" in k for k in self.keys(prefix))

    def kill_store_after_first_block(self, date: str, proc: subprocess.Popen[str]) -> int:
        """SIGKILL the S3 server (by its pid) once a block is written; returns the
        number of blocks written by then."""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            parts = self.staged_parts(date)
            if parts:
                assert self.server.pid is not None
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.stop()  # reaps it; the data directory stays
                return parts
            time.sleep(0.1)
        _, err = proc.communicate(timeout=60)
        raise AssertionError(f"no block was written; stderr:\n{err[-3000:]}")

    def restart_store(self) -> None:
        self.server = EmbeddedS3(self.data_dir, port=self.port).start()

    def committed_rows(self, date: str) -> list[dict]:
        import io
        import json

        import pyarrow.parquet as pq

        client = s3_client(self.server.env())
        part = f"preds/dt={date}"
        marker = json.loads(client.get_object(Bucket=BUCKET, Key=f"{part}/_SUCCESS")["Body"].read())
        rows = []
        for name in marker["files"]:
            body = client.get_object(Bucket=BUCKET, Key=f"{part}/{name}")["Body"].read()
            rows += pq.read_table(io.BytesIO(body)).to_pylist()
        assert len(rows) == marker["rows"]
        return rows


@pytest.fixture(scope="module")
def night_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images = tmp_path_factory.mktemp("night-images")
    synthesize(str(images), ["ring", "star"], per_class=IMAGES // 2, size=48, seed=21)
    return images


@pytest.fixture
def night(tmp_path: Path, trained_run, night_images: Path) -> Iterator[Night]:
    n = Night(tmp_path / "s3", trained_run.run_uri, night_images)
    yield n
    n.server.stop()


def finish(proc: subprocess.Popen[str], timeout: float = 420) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def test_a_15s_store_outage_mid_night_is_ridden_out(night: Night):
    """On main, a 20 s outage ended the night with exit 1 and a traceback."""
    date = "2026-06-01"
    proc = night.score(date)
    written = night.kill_store_after_first_block(date, proc)
    total = IMAGES // BLOCK
    assert 0 < written < total, "the night must be under way, not over, when the store goes"
    time.sleep(15)
    night.restart_store()
    code, _, err = finish(proc)
    assert code == 0, err[-4000:]
    assert "retrying for up to 180s" in err  # the default budget, said once per process
    rows = night.committed_rows(date)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == IMAGES, "every image exactly once"
    assert set(keys) == set(night.inputs)
    assert all(r["error"] is None for r in rows)
    assert not night.keys("_tmp/"), "the night's staging is cleaned up after the commit"


def test_an_outage_past_the_budget_fails_cleanly_and_the_night_resumes(night: Night):
    date = "2026-06-02"
    proc = night.score(date, "storage.outage_seconds=6")
    written = night.kill_store_after_first_block(date, proc)
    code, _, err = finish(proc, timeout=240)
    night.restart_store()
    # One line naming the endpoint and what was being done; exit 75 (try again later).
    assert code == 75, err[-4000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("xfer: error: ") and night.server.endpoint in last, last
    assert "unavailable for" in last and "budget 6s" in last and " while " in last, last
    assert "Traceback" not in err, err[-4000:]
    assert not night.keys(f"preds/dt={date}"), "nothing is committed past the budget"
    staged = night.staged_parts(date)
    assert staged >= written

    # Started again for the same night: the blocks already written are kept.
    code, out, err = finish(night.score(date))
    assert code == 0, err[-4000:]
    assert f"{staged} of {IMAGES // BLOCK} blocks already scored" in out, out[-3000:]
    rows = night.committed_rows(date)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == IMAGES and set(keys) == set(night.inputs)
    assert not night.keys("_tmp/")
