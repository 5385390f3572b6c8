"""`xfer runs` against real runs in the embedded S3 server: a published run, one whose
gate failed, a failed run, and a running one (a real `xfer train` process, stopped
with SIGTERM by the test afterwards)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from xfer import storage
from xfer.config import load_config
from xfer.errors import XferError
from xfer.train.driver import train

from .conftest import train_overrides

pytestmark = pytest.mark.slow
MODEL = "runs-test"


def xfer_runs(root: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xfer", "runs", *args, f"storage.root={root}"],
        capture_output=True,
        text=True,
        timeout=120,
    )


# A quick run of the same model: one head epoch from random weights (it loses the gate).
WEAK = {"train.head.epochs": 1, "train.fine_tune.epochs": 0, "model.weights": "none"}


def train_model(root: str, weights: str, **settings: object):
    """A real training run of MODEL under ``root``, with these settings."""
    overrides = train_overrides(root, weights, **{"output.model_name": MODEL, **settings})
    return train(load_config(None, overrides))


@pytest.fixture(scope="module")
def runs(session_root, pretrained_weights, target_dataset):
    """Run ids: good (published), weak (gate failed), failed, running (a live process)."""
    good = train_model(session_root, pretrained_weights, **{"output.gate.min_test_accuracy": 0.5})
    assert good.published, good.metrics["gate"]
    weak = train_model(
        session_root, pretrained_weights, **WEAK, **{"output.gate.min_test_accuracy": 1.0}
    )
    assert not weak.published
    failing = train_overrides(
        session_root,
        pretrained_weights,
        **{
            "output.model_name": MODEL,
            "fault.rank": 1,
            "fault.point": "epoch",
            "fault.epoch": 1,
            "fault.action": "exit",
            "cluster.max_failures": 0,
            "train.verbose": 1,  # its run id on the console
        },
    )
    with pytest.raises(XferError, match="failed") as failed:
        train(load_config(None, failing))
    failed_id = re.search(r"training run (\S+) failed", str(failed.value)).group(1)

    hanging = [a.replace("fault.action=exit", "fault.action=hang") for a in failing]
    proc = subprocess.Popen(
        [sys.executable, "-m", "xfer", "train", *hanging],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
        start_new_session=True,
    )
    try:
        running_id = None
        deadline = time.monotonic() + 300
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"\[xfer\] run (\S+): \d+ worker", line)
            if m:
                running_id = m.group(1)
            if running_id and "fault injection" in line:
                break  # rank 1 hangs in epoch 2 of the head phase
            assert time.monotonic() < deadline, "the run never reached its fault point"
        yield {
            "good": good.run_id,
            "weak": weak.run_id,
            "failed": failed_id,
            "running": running_id,
            "proc": proc,
        }
    finally:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: xfer stops its own local Ray
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)


def test_list_shows_every_status_accuracy_and_what_is_published(runs, session_root):
    out = xfer_runs(session_root, "list", "--model", MODEL)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert out.stdout.splitlines()[0].split()[:5] == ["RUN", "MODEL", "DATASET", "BASE", "STATUS"]
    assert set(rows) == {runs["good"], runs["weak"], runs["failed"], runs["running"]}
    assert re.search(r"complete\s+[\d.]+%\s+[\d.]+%\s+[\d.]+%\s+yes", rows[runs["good"]])
    assert "complete" in rows[runs["weak"]] and " yes " not in rows[runs["weak"]]
    assert "failed (train head epoch 2" in rows[runs["failed"]]
    assert "running (train head epoch 2, last heard" in rows[runs["running"]]
    # Newest first.
    assert next(iter(rows)) == runs["running"]


def test_show_and_compare(runs, session_root):
    shown = xfer_runs(session_root, "show", runs["good"])
    assert shown.returncode == 0, shown.stderr
    assert f"run {runs['good']}: complete" in shown.stdout
    assert "test accuracy" in shown.stdout and "passed; published (latest)" in shown.stdout
    assert f"{session_root}/runs/{runs['good']}/logs/console.log" in shown.stdout
    compared = xfer_runs(session_root, "compare", runs["good"], runs["weak"])
    assert compared.returncode == 0, compared.stderr
    differ = compared.stdout.split("settings that differ:")[1]
    for key in ("train.head.epochs", "output.gate.min_test_accuracy", "model.weights"):
        assert key in differ
    assert "data.dataset" not in differ
    missing = xfer_runs(session_root, "show", "20990101-000000-nope")
    assert missing.returncode == 2 and "no run" in missing.stderr


def test_promote_checks_the_gate_and_rollback_restores_the_previous_run(runs, session_root):
    latest = f"{session_root}/models/{MODEL}/latest.json"
    assert storage.read_json(latest)["run_id"] == runs["good"]
    refused = xfer_runs(session_root, "promote", runs["weak"])
    assert refused.returncode == 2, refused.stderr
    assert "did not pass its gate" in refused.stderr and "--force" in refused.stderr
    assert storage.read_json(latest)["run_id"] == runs["good"]
    not_complete = xfer_runs(session_root, "promote", runs["failed"], "--force")
    assert not_complete.returncode == 2 and "not complete" in not_complete.stderr

    forced = xfer_runs(session_root, "promote", runs["weak"], "--force")
    assert forced.returncode == 0, forced.stderr
    pointer = storage.read_json(latest)
    assert pointer["run_id"] == runs["weak"] and pointer["forced"] is True
    assert pointer["previous_run_id"] == runs["good"]

    back = xfer_runs(session_root, "rollback", MODEL)
    assert back.returncode == 0, back.stderr
    pointer = storage.read_json(latest)
    assert pointer["run_id"] == runs["good"] and pointer["action"] == "rollback"
    assert pointer["rolled_back_from"] == runs["weak"]
    actions = [
        storage.read_json(f.uri)["action"]
        for f in storage.list_files(f"{session_root}/models/{MODEL}/history")
    ]
    assert actions == ["publish", "promote", "rollback"]
    # The first published run has nothing before it.
    again = xfer_runs(session_root, "rollback", MODEL)
    assert again.returncode == 2 and "nothing to roll back to" in again.stderr


def test_a_run_stopped_with_sigterm_is_no_longer_running(runs, session_root):
    proc = runs["proc"]
    proc.terminate()
    assert proc.wait(timeout=120) == 143
    out = xfer_runs(session_root, "list", "--model", MODEL)
    row = next(line for line in out.stdout.splitlines() if line.startswith(runs["running"]))
    assert "failed (" in row, row


def test_a_challenger_must_beat_the_published_model_on_the_same_images(
    runs, session_root, pretrained_weights
):
    champion = storage.read_json(f"{session_root}/models/{MODEL}/latest.json")["run_id"]
    expected = storage.read_json(f"{session_root}/runs/{champion}/metrics.json")["test"]
    challenger = train_model(
        session_root,
        pretrained_weights,
        **WEAK,
        **{"output.gate.min_test_accuracy": 0.0, "output.gate.vs_published": True},
    )
    vs = challenger.metrics["gate"]["vs_published"]
    assert vs["run_id"] == champion
    # The champion scored by the same code on the same images as when it was trained.
    assert abs(vs["accuracy"] - expected["accuracy_from_predictions"]) < 1e-9
    assert vs["challenger_accuracy"] < vs["accuracy"] and not vs["beaten"]
    assert not challenger.published and not challenger.metrics["gate"]["passed"]
    assert storage.read_json(f"{session_root}/models/{MODEL}/latest.json")["run_id"] == champion
    assert "vs the published run" in challenger.describe() and "not beaten" in challenger.describe()
    report = storage.read_text(f"{challenger.run_uri}/report.html")
    assert f"vs the published run <code>{champion}</code>" in report and "not beaten" in report


def test_the_report_shows_the_most_confident_mistakes_and_calibration(runs, session_root):
    import base64
    import io

    import numpy as np
    from PIL import Image

    from xfer.manifest import load_manifest

    uri = f"{session_root}/runs/{runs['weak']}"
    metrics = storage.read_json(f"{uri}/metrics.json")
    preds = storage.read_parquet(f"{uri}/predictions/test.parquet").to_pylist()
    wrong = [p for p in preds if p["error"] is None and p["true_index"] != p["predicted_index"]]
    assert wrong, "the weak run must make mistakes for this test"
    listed = metrics["test"]["mistakes"]
    assert len(listed) == min(len(wrong), 6 * len({w["true_label"] for w in wrong}))
    # The most confident first, within each true class.
    for label in {m["true_label"] for m in listed}:
        mine = [m for m in listed if m["true_label"] == label]
        theirs = sorted(
            (w for w in wrong if w["true_label"] == label), key=lambda w: -w["probability"]
        )
        assert [m["probability"] for m in mine] == [w["probability"] for w in theirs[: len(mine)]]
    report = storage.read_text(f"{uri}/report.html")
    assert "Most confident mistakes" in report
    dataset = load_manifest(metrics["dataset"])
    images = {}
    for shard in dataset.shard_uris("test"):
        t = storage.read_parquet(shard, columns=["key", "image"])
        images.update(zip(t.column("key").to_pylist(), t.column("image").to_pylist(), strict=True))
    for m in listed:
        found = re.search(
            rf"<img alt='{re.escape(m['key'])}' src='data:image/jpeg;base64,([^']+)'", report
        )
        assert found, m["key"]
        thumb = Image.open(io.BytesIO(base64.b64decode(found.group(1)))).convert("RGB")
        source = Image.open(io.BytesIO(images[m["key"]])).convert("RGB").resize(thumb.size)
        diff = np.abs(np.asarray(thumb, float) - np.asarray(source, float)).mean()
        assert diff < 12, (m["key"], diff)  # that very image, not another one
        assert f"predicted <b>{m['predicted_label']}</b> {100 * m['probability']:.1f}%" in report
    cal = metrics["test"]["calibration"]
    assert sum(b["count"] for b in cal["bins"]) == len([p for p in preds if p["error"] is None])
    assert 0 <= cal["ece"] <= 1 and "reliability diagram" in report
