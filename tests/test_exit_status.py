"""Exit statuses, the same for every command (README, "Exit status"): 0 done, 2 a
problem the user can fix, 75 the store stayed away past its budget, 1 the job failed,
130 / 143 Ctrl-C / SIGTERM. Real `xfer` processes against the session's S3 server,
behind the fault proxy where the store must be away.

Proved elsewhere, and not again here:

- train: 0 tests/test_console.py; 2 test_train.py::test_bad_config_fails_before_any_worker_starts;
  75 from a worker's reads test_train_outage.py::test_a_store_away_past_the_budget_stops_training_with_exit_75;
  143 mid-run, its Ray stopped, test_runs.py::test_a_run_stopped_with_sigterm_is_no_longer_running
  and test_stops.py::test_sigterm_mid_demo_stops_the_s3_server_and_ray.
- score: 0 and 2 test_score.py (test_missing_model_uncommitted_run_and_empty_input_fail_clearly);
  75 test_score_outage.py and (a night held by another run) test_nights.py; 1 (JobFailed, which
  the CLI exits 1 with, as the slow test below shows for train)
  test_nights.py::test_a_night_that_keeps_killing_its_actors_fails_with_a_clear_error.
- shard: 0 and 2 test_shard.py::test_shard_command_takes_a_config_file_flags_and_overrides.
- runs: 0 and 2 test_runs.py::test_show_and_compare.
- s3-server: 2 test_stops.py::test_a_port_without_room_for_its_grpc_twin_is_one_line;
  130 test_s3server.py; 143 test_stops.py::test_sigterm_stops_the_s3_server_and_the_port_is_free_again_at_once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xfer.errors import (
    EXIT_JOB_FAILED,
    EXIT_STORE_UNAVAILABLE,
    EXIT_USER_ERROR,
    DataError,
    StoreUnavailable,
)

from .conftest import REPO, train_overrides, xfer_argv
from .faultproxy import FaultProxy
from .test_stops import descendants


def commands(bucket: str, *overrides: str) -> dict[str, list[str]]:
    """One command per family, each of which reads the store first thing."""
    root = f"storage.root={bucket}/root"
    return {
        "train": ["train", root, "data.dataset=pets", *overrides],
        "score": [
            "score",
            f"--model={bucket}/root/models/pets",
            f"--input={bucket}/incoming",
            f"--output={bucket}/predictions",
            root,
            *overrides,
        ],
        "shard": ["shard", f"{bucket}/raw/pets", f"{bucket}/root/datasets/pets", *overrides],
        "runs": ["runs", "list", root, *overrides],
    }


FAMILIES = ["train", "score", "shard", "runs"]


def xfer(args: list[str], env: dict[str, str], **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        xfer_argv(*args),
        env={**env, "RAY_ADDRESS": "", "XFER_S3_MAX_ATTEMPTS": "1", "PYTHONUNBUFFERED": "1"},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,  # type: ignore[call-overload]
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


def assert_one_error_line(err: str, *fragments: str) -> str:
    """Exactly one error line, the last one, without a traceback."""
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("xfer: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_store_away_past_the_budget_exits_75(
    family: str, bucket: str, fault_proxy: FaultProxy
) -> None:
    """On the driver, first thing: train's preflight, score's model, shard's listing,
    runs' listing."""
    away = fault_proxy.add("*", ".", "slowdown", seconds=600)
    args = commands(bucket, "storage.outage_seconds=1")[family]
    code, err = finish(xfer(args, fault_proxy.env()))
    assert code == 75, err[-3000:]
    assert away.hits >= 1
    assert_one_error_line(err, fault_proxy.endpoint)


@pytest.mark.parametrize(
    ("family", "sig", "status", "said"),
    [
        ("score", signal.SIGTERM, 143, "xfer: stopped (SIGTERM)"),
        ("shard", signal.SIGTERM, 143, "xfer: stopped (SIGTERM)"),
        ("runs", signal.SIGTERM, 143, "xfer: stopped (SIGTERM)"),
        ("score", signal.SIGINT, 130, "xfer: interrupted"),
        ("shard", signal.SIGINT, 130, "xfer: interrupted"),
    ],
)
def test_a_stop_while_waiting_for_the_store_exits_130_or_143(
    family: str, sig: int, status: int, said: str, bucket: str, fault_proxy: FaultProxy
) -> None:
    """Stopped mid-command (riding out an outage within its budget): the status says
    by what, whatever the command was doing."""
    away = fault_proxy.add("*", ".", "slowdown", seconds=600)
    env = fault_proxy.env({**os.environ})
    proc = xfer(commands(bucket, "storage.outage_seconds=600")[family], env)
    deadline = time.monotonic() + 60
    while away.hits < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, sig)
    code, err = finish(proc)
    assert code == status, err[-3000:]
    assert err.strip().splitlines()[-1] == said, err[-3000:]


def test_an_s3_server_that_dies_exits_1(tmp_path: Path) -> None:
    """Its weed process killed from outside: the server command failed (1), saying so."""
    proc = xfer(["s3-server", "--data-dir", str(tmp_path / "s3")], dict(os.environ))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Ctrl-C stops the server" in line:
                break
        [weed] = [p for p in descendants(proc.pid) if "weed" in Path(f"/proc/{p}/comm").read_text()]
        os.kill(weed, signal.SIGKILL)
        code, err = finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 1, err
    assert "exited on its own" in err.strip().splitlines()[-1]


def test_a_config_with_two_problems_is_one_line(tmp_path: Path) -> None:
    proc = xfer(
        ["runs", "list", f"storage.root={tmp_path}", "storage.rooot=x", "train.x=1"], {**os.environ}
    )
    code, err = finish(proc)
    assert code == 2, err
    line = assert_one_error_line(err, "storage.rooot", "train.x")
    assert line.startswith("xfer: error: invalid config: "), line


@pytest.mark.slow
def test_a_failed_worker_fails_the_job_with_exit_1_and_one_line(
    session_root: str, pretrained_weights: str, target_dataset: str, tmp_path: Path
) -> None:
    """Through jobs/train.py, what `ray job submit` runs: a worker that exits with
    ``cluster.max_failures=0`` fails the job (1, not 2: nothing for the user to fix),
    in one line naming the run; TensorFlow's native start-up lines go to the log file,
    as with `xfer train` (on main this exited 2, and printed three lines)."""
    overrides = train_overrides(
        session_root,
        pretrained_weights,
        **{
            "train.head.epochs": 1,
            "train.fine_tune.epochs": 0,
            "cluster.num_workers": 1,
            "cluster.max_failures": 0,
            "fault.rank": 0,
            "fault.epoch": 0,
            "output.model_name": "exit-status",
        },
    )
    log = tmp_path / "console.log"
    env = {**os.environ, "XFER_LOG_FILE": str(log), "TF_CPP_MIN_LOG_LEVEL": "0"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train.py"), *overrides],
        env={**env, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-4000:]
    line = assert_one_error_line(proc.stderr, "failed", "resume with: ", "output.run_id=")
    assert re.search(r"training run \S+ failed", line), line
    native = re.compile(r"^[IWE]\d{4} |tensorflow/core/")
    assert not [ln for ln in proc.stderr.splitlines() if native.search(ln)], proc.stderr[-3000:]
    assert any(native.search(ln) for ln in log.read_text().splitlines())


def _arrow_upload_error(bucket: str, fault_proxy: FaultProxy) -> OSError:
    """What Ray Train's own checkpoint upload (pyarrow) raises when S3 keeps saying
    SlowDown past the client's retries: a real pyarrow error, through the proxy."""
    from xfer.store.s3 import arrow_filesystem

    fault_proxy.add("*", "/checkpoint", "slowdown", seconds=600)
    fs, path = arrow_filesystem(f"{bucket}/runs/r1/checkpoint_000001/state")
    try:
        with fs.open_output_stream(path) as out:
            out.write(b"weights")
    except OSError as exc:
        return exc
    raise AssertionError("the upload went through the SlowDown rule")


@pytest.mark.parametrize(
    ("raised", "status"),
    [
        (StoreUnavailable("S3 answered 503", "http://store"), EXIT_STORE_UNAVAILABLE),
        ("arrow upload", EXIT_STORE_UNAVAILABLE),
        (DataError("shard s3://b/d/part-0.parquet is not Parquet"), EXIT_USER_ERROR),
        (RuntimeError("CUDA error: an illegal memory access"), EXIT_JOB_FAILED),
    ],
)
def test_a_failed_run_ends_with_the_status_of_what_failed_on_the_worker(
    raised: BaseException | str, status: int, bucket: str, fault_proxy: FaultProxy
) -> None:
    """A worker's error, as Ray Train hands it to the driver (its WorkerGroupError keeps
    each worker's own), decides: the store (75, the checkpoint upload Ray Train makes
    itself included), a problem the user can fix (2), or the job itself failed (1)."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    from xfer.cli import exit_status
    from xfer.train.failure import failed_run

    if raised == "arrow upload":
        raised = _arrow_upload_error(bucket, fault_proxy)
    assert isinstance(raised, BaseException)
    fit_error = WorkerGroupError(f"[Rank 0]\n{raised!r}", {0: raised})
    error = failed_run(fit_error, "r1", f"{bucket}/runs/r1")
    assert exit_status(error) == status, repr(error)
    assert "\n" not in str(error) and "output.run_id=r1" in str(error), str(error)
