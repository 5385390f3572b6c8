"""`xfer runs` against real runs in the embedded S3 server: a published run, one whose
gate failed, a failed run, and a running one (a real `xfer train` process, stopped
with SIGTERM by the test afterwards)."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time

import pytest

from xfer.config import load_config
from xfer.errors import XferError
from xfer.registry.runstatus import iso
from xfer.store import storage
from xfer.train.driver import train

from .conftest import run_xfer, train_overrides

pytestmark = pytest.mark.slow
MODEL = "runs-test"


def xfer_runs(root: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_xfer("runs", *args, f"storage.root={root}", timeout=120)


# A quick run of the same model: one head epoch from random weights (it loses the gate).
WEAK = {"train.head.epochs": 1, "train.fine_tune.epochs": 0, "model.weights": "none"}


def train_model(root: str, weights: str, **settings: object):
    """A real training run of MODEL under ``root``, with these settings."""
    overrides = train_overrides(root, weights, **{"output.model_name": MODEL, **settings})
    return train(load_config(None, overrides))


@pytest.fixture(scope="module")
def runs(session_root, pretrained_weights, target_dataset):
    """Run ids: good (published), weak (gate failed; run as a `ray job submit` driver is,
    so its id is the submission's, with no time in it), failed, running (a live process)."""
    good = train_model(session_root, pretrained_weights, **{"output.gate.min_test_accuracy": 0.5})
    assert good.published, good.metrics["gate"]
    with pytest.MonkeyPatch.context() as env:  # Ray here is up already: only xfer reads it
        job = {"metadata": {"job_submission_id": f"raysubmit_{secrets.token_hex(8)}"}}
        env.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
        weak = train_model(
            session_root, pretrained_weights, **WEAK, **{"output.gate.min_test_accuracy": 1.0}
        )
    assert weak.run_id.startswith("raysubmit_") and not weak.published
    failing = train_overrides(
        session_root,
        pretrained_weights,
        **{
            "output.model_name": MODEL,
            "fault.rank": 1,
            "fault.point": "epoch",
            "fault.epoch": 1,
            "fault.action": "exit",  # cluster.max_failures unset: 0 locally, so the run fails
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
        running_id, start_line = None, ""
        deadline = time.monotonic() + 300
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"\[xfer\] run (\S+): \d+ worker", line)
            if m:
                running_id, start_line = m.group(1), line
            if running_id and "fault injection" in line:
                break  # rank 1 hangs in epoch 2 of the head phase
            assert time.monotonic() < deadline, "the run never reached its fault point"
        yield {
            "good": good.run_id,
            "weak": weak.run_id,
            "failed": failed_id,
            "running": running_id,
            "start_line": start_line,
            "failing": failing,
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
    # Newest first by when each run started, whatever its id (weak's is a submission id).
    assert list(rows) == [runs[k] for k in ("running", "failed", "weak", "good")]
    started = [re.findall(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row) for row in rows.values()]
    assert all(len(s) == 1 for s in started), rows
    # The recovery in effect, in the start line: unset, 0 on this machine.
    assert "cluster.max_failures=0," in runs["start_line"]


def test_show_and_compare(runs, session_root):
    shown = xfer_runs(session_root, "show", runs["good"])
    assert shown.returncode == 0, shown.stderr
    assert f"run {runs['good']}: complete" in shown.stdout
    assert "test accuracy" in shown.stdout and "passed; published (latest)" in shown.stdout
    assert f"{session_root}/runs/{runs['good']}/logs/console.log" in shown.stdout
    lineage = storage.read_json(f"{session_root}/runs/{runs['good']}/lineage.json")
    assert f"dataset checksum {lineage['dataset']['manifest_checksum'][:12]}," in shown.stdout
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
    # Paired on the same images: the discordant counts, the p-value and the interval.
    assert vs["pairs"] == expected["examples"] and vs["verdict"] in ("worse", "no evidence")
    assert vs["champion_only"] > vs["challenger_only"]
    described = challenger.describe()
    assert f"vs the published run {champion} (better): " in described
    assert f"p = {vs['p_value']:.3g}" in described and "not published" in described
    report = storage.read_text(f"{challenger.run_uri}/report.html")
    assert f"vs the published run <code>{champion}</code>" in report and "not published" in report
    assert "McNemar exact p" in report


def test_the_report_shows_the_most_confident_mistakes_and_calibration(runs, session_root):
    import base64
    import io

    import numpy as np
    from PIL import Image

    from xfer.data.manifest import load_manifest

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


def test_the_report_shows_what_each_rank_ran_as_text(runs, session_root):
    """code.workers (one record per rank) reads as the driver's identity line, not as a
    Python list of dicts."""
    uri = f"{session_root}/runs/{runs['good']}"
    workers = storage.read_json(f"{uri}/lineage.json")["code"]["workers"]
    assert workers, "the run's lineage names no worker code"
    report = storage.read_text(f"{uri}/report.html")
    assert "{'rank'" not in report and "[{" not in report
    for entry in workers:
        row = re.search(rf"code\.workers rank {entry['rank']}</th>.*?<code>([^<]+)</code>", report)
        assert row, f"no lineage row for rank {entry['rank']}"
        assert row.group(1).startswith(f"xfer {entry['version']} (code {entry['sha256'][:12]}")


def _copy_run(src: str, dst: str, keep=lambda name: True) -> None:
    for f in storage.list_files(src):
        if keep(f.uri[len(src) + 1 :]):
            storage.copy(f.uri, dst + f.uri[len(src) :])


def test_a_resumed_run_is_running_again_and_old_runs_still_list(runs, session_root):
    """A failed run whose resume has started (the driver's start record, before any
    worker begins an attempt) shows its latest state; runs written before start records
    existed still show a start (the first attempt's) and sort by it; one with neither
    lists last."""
    from xfer.registry.runs import format_table, list_runs
    from xfer.train.journal import record_start

    root = f"{session_root}/runs-started"
    resumed, old, bare = "resumed-run", f"raysubmit_{secrets.token_hex(4)}", "raysubmit_bare"
    _copy_run(f"{session_root}/runs/{runs['failed']}", f"{root}/runs/{resumed}")
    _copy_run(
        f"{session_root}/runs/{runs['weak']}",
        f"{root}/runs/{old}",
        keep=lambda name: not name.startswith("_journal/start-"),
    )
    _copy_run(
        f"{session_root}/runs/{runs['weak']}",
        f"{root}/runs/{bare}",
        keep=lambda name: name == "config.yaml",
    )
    assert [r.status for r in list_runs(root)][:2] == ["failed", "complete"]
    record_start(f"{root}/runs/{resumed}", resumed=True, max_failures=3)  # as the driver does
    listed = list_runs(root)
    assert [r.run_id for r in listed] == [resumed, old, bare]
    assert listed[0].status == "running" and listed[0].where.startswith("resuming, last heard")
    first_attempt = storage.read_json(f"{root}/runs/{old}/_journal/attempt-00001.json")
    assert listed[1].started == iso(first_attempt["started_at"]) and listed[2].started == ""
    assert "running (resuming, last heard" in format_table(listed)


def test_train_with_a_dashboard_address_says_to_submit_through_the_job_api(runs, session_root):
    """`xfer train … output.run_id=<id>` with RAY_ADDRESS=http://<head>:8265 exported (as
    for jobs/submit.sh): one line naming the job API command, exit 2, the run untouched."""
    journal = f"{session_root}/runs/{runs['failed']}/_journal"
    before = {f.uri for f in storage.list_files(journal)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xfer",
            "train",
            *runs["failing"],
            f"output.run_id={runs['failed']}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if "RAY_ADDRESS" in ln]
    assert "jobs/submit.sh train --config <config> output.run_id=<id>" in line
    assert {f.uri for f in storage.list_files(journal)} == before
