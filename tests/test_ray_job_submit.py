"""`ray job submit` against a real Ray head on 127.0.0.1 with token auth (slow).

The head is started the way a platform team starts one (`ray start --head`,
`RAY_AUTH_MODE=token`), the local training config is submitted with the shipped
`jobs/submit.sh` and runtime env, and the run it writes to the embedded S3 server is
checked. The head inherits this process's AWS credentials, as a cluster inherits its
nodes' role: credentials never go into the runtime env.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from xfer import storage

from .conftest import IMAGE_SIZE

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    token = secrets.token_hex(32)
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",  # `python` in jobs = this venv
    )
    dashboard = free_port()
    cmd = [
        os.path.join(bin_dir, "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--num-cpus=2",
        "--disable-usage-stats",
    ]
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        probe = subprocess.run(
            [os.path.join(bin_dir, "ray"), "job", "list", "--address", address],
            env=env,
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"the Ray head did not come up: {(tmp_path / 'head.log').read_text()[-3000:]}"
            )
        time.sleep(2)
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    log.close()


def test_ray_job_submit_trains_a_run(
    ray_head, session_root, pretrained_weights, target_dataset, tmp_path
):
    address, env = ray_head
    # Without the token the dashboard refuses the client.
    unauthenticated = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN",)}
    unauthenticated["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-token")
    (tmp_path / "no-token").write_text("wrong-token")
    refused = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "list", "--address", address],
        env=unauthenticated,
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0

    # The shipped runtime env, plus the endpoint of this test's S3 server (not secret).
    runtime_env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["AWS_ENDPOINT_URL_S3"] = os.environ["AWS_ENDPOINT_URL_S3"]
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in (tmp_path / "runtime_env.yaml").read_text()

    overrides = [
        f"storage.root={session_root}",
        "data.dataset=shapes",
        f"data.image_size={IMAGE_SIZE}",
        f"model.weights={pretrained_weights}",
        "model.head.dense=[{units: 16}]",
        "train.head.epochs=2",
        "train.fine_tune.epochs=1",
        "train.verbose=0",
        "output.model_name=submitted",
        "output.gate.min_test_accuracy=0",
    ]
    proc = subprocess.run(
        [
            str(ROOT / "jobs" / "submit.sh"),
            "train",
            "--config",
            "jobs/configs/local.yaml",
            *overrides,
        ],
        env={**env, "RAY_ADDRESS": address, "XFER_RUNTIME_ENV": str(tmp_path / "runtime_env.yaml")},
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"Job '.*' succeeded", out), out[-2000:]
    match = re.search(r"run (\d{8}-\d{6}-[0-9a-f]{6}) complete: (\S+)", out)
    assert match, out[-3000:]
    run_uri = match.group(2)
    assert storage.exists(f"{run_uri}/_SUCCESS")
    metrics = storage.read_json(f"{run_uri}/metrics.json")
    assert metrics["workers"] == 2
    assert [len(metrics["history"]["head"]), len(metrics["history"]["fine_tune"])] == [2, 1]
    assert storage.read_json(f"{session_root}/models/submitted/latest.json")[
        "run_id"
    ] == match.group(1)
