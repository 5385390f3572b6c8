"""The cluster path: `jobs/submit.sh` onto real Ray nodes that do not have this checkout.

A head (no CPUs: drivers and controllers only) and two worker nodes of one CPU each
run on 127.0.0.1, each a `ray start --block` process group this module starts and
stops by pid, from an environment with the project's dependencies and an old,
stale xfer instead of this one (:mod:`tests.raynodes`). Token auth is on, as on a
real cluster. Jobs go in the way a platform team submits them: the shipped
`jobs/submit.sh` and `jobs/runtime_env.yaml`, with the endpoint of this test's S3
server added (not a secret); credentials come from the nodes' environment, as from a
node's role.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xfer import storage
from xfer.provenance import code_identity

from .conftest import IMAGE_SIZE
from .faultwatch import FaultWatcher
from .raynodes import STALE_MARKER, STALE_VERSION, RayNodes, node_python

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    tmp = tmp_path_factory.mktemp("cluster")
    python = node_python(tmp, stale=True)
    seen = subprocess.run(
        [str(python), "-c", "import xfer; print(xfer.__version__)"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert seen.stdout.strip() == STALE_VERSION, "the nodes must not see this checkout's xfer"
    nodes = RayNodes(tmp, python)
    try:
        nodes.start_head()
        nodes.add_node("a")
        nodes.add_node("b")
        nodes.wait_for_nodes(3)
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def runtime_env_file(tmp_path_factory, s3_server) -> Path:
    """The shipped runtime env plus this test's S3 endpoint."""
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    env["env_vars"]["AWS_ENDPOINT_URL_S3"] = os.environ["AWS_ENDPOINT_URL_S3"]
    path = tmp_path_factory.mktemp("runtime-env") / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(env))
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in path.read_text()
    return path


def client_env(**settings: str) -> dict[str, str]:
    """The submitting machine's environment (its `ray` CLI first on PATH), plus ``settings``."""
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update(settings)
    return env


def submit(cluster: RayNodes, runtime_env: Path, *args: str, token: str | None = None):
    """`jobs/submit.sh ...` from this checkout, as a user at a laptop runs it."""
    env = client_env(
        RAY_ADDRESS=cluster.dashboard,
        RAY_AUTH_TOKEN=token or cluster.token,
        XFER_RUNTIME_ENV=str(runtime_env),
    )
    return subprocess.run(
        [str(ROOT / "jobs" / "submit.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )


def train_args(root: str, weights: str, **extra: object) -> list[str]:
    settings = {
        "storage.root": root,
        "data.dataset": "shapes",
        "data.image_size": IMAGE_SIZE,
        "model.weights": weights,
        "model.head.dense": "[{units: 16}]",
        "train.head.epochs": 3,
        "train.fine_tune.epochs": 1,
        "train.verbose": 1,  # the identity lines on the console (Keras': the log file)
        "cluster.local_num_cpus": "null",
        "output.model_name": "submitted",
        "output.gate.min_test_accuracy": 0,
    }
    settings.update(extra)
    return [
        "train",
        "--config",
        "jobs/configs/local.yaml",
        *(f"{k}={v}" for k, v in settings.items()),
    ]


def completed_run(out: str) -> str:
    match = re.search(r"run (\S+) complete: (\S+)", out)
    assert match, out[-4000:]
    return match.group(2)


@pytest.fixture(scope="module")
def submitted_run(cluster, runtime_env_file, session_root, pretrained_weights, target_dataset):
    proc = submit(cluster, runtime_env_file, *train_args(session_root, pretrained_weights))
    return proc, proc.stdout + proc.stderr


def test_a_client_without_the_token_is_refused(cluster, runtime_env_file):
    proc = submit(
        cluster, runtime_env_file, "train", "--config", "jobs/configs/local.yaml", token="wrong"
    )
    assert proc.returncode != 0
    assert "_SUCCESS" not in proc.stdout


def test_training_runs_on_nodes_without_xfer_with_the_submitted_code(submitted_run):
    proc, out = submitted_run
    assert proc.returncode == 0, out[-5000:]
    assert re.search(r"Job '.*' succeeded", out), out[-2000:]
    # Every worker ran the submitted code, not the stale xfer installed on the nodes ...
    assert STALE_MARKER not in out and STALE_VERSION not in out
    sha = code_identity()["sha256"]
    xfer_lines = "\n".join(line for line in out.splitlines() if "[xfer]" in line)
    # The log says which code runs (Ray folds look-alike lines of several workers
    # into one, so the lineage below is where every rank's is kept).
    logged = re.findall(r"\[xfer\] rank \d on node \w+ .*?: xfer \S+ \(code (\w+)", out)
    assert logged and set(logged) == {sha[:12]}, xfer_lines
    driver = re.search(r"\[xfer\] driver: xfer \S+ \(code (\w+)", out)
    assert driver and driver.group(1) == sha[:12], xfer_lines
    run_uri = completed_run(out)
    assert storage.exists(f"{run_uri}/_SUCCESS")
    metrics = storage.read_json(f"{run_uri}/metrics.json")
    assert metrics["workers"] == 2 and metrics["failures"] == []
    code = storage.read_json(f"{run_uri}/lineage.json")["code"]
    assert code["sha256"] == sha
    assert sorted(w["rank"] for w in code["workers"]) == [0, 1], code
    assert {w["sha256"] for w in code["workers"]} == {sha}
    assert all("py_modules" in w["path"] for w in code["workers"]), code  # shipped with the job
    # ... one worker per node: the head has no CPUs, each node one.
    assert len({w["node"] for w in code["workers"]}) == 2, code


def test_scoring_is_submitted_the_same_way(
    cluster, runtime_env_file, submitted_run, session_root, target_dataset
):
    _, out = submitted_run
    run_uri = completed_run(out)
    output = f"{session_root}/predictions/cluster-test"
    proc = submit(
        cluster,
        runtime_env_file,
        "score",
        "--config",
        "jobs/configs/local.yaml",
        "--model",
        run_uri,
        "--input",
        f"{session_root}/raw/shapes",
        "--output",
        output,
        "--date",
        "2026-01-02",
        "cluster.local_num_cpus=null",
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-5000:]
    assert STALE_MARKER not in text
    assert re.search(
        r"\[xfer\] scorer on node \w+ .*: xfer \S+ \(code " + code_identity()["sha256"][:12],
        text,
    )
    marker = storage.read_json(f"{output}/dt=2026-01-02/_SUCCESS")
    images = [f for f in storage.list_files(f"{session_root}/raw/shapes") if f.uri.endswith(".jpg")]
    assert marker["rows"] == len(images) > 0, marker


def test_a_node_killed_mid_training_is_replaced_and_the_run_recovers(
    cluster, runtime_env_file, submitted_run, session_root, pretrained_weights
):
    """Rank 1 stops in head epoch 2; its whole node (raylet and workers) is SIGKILLed,
    a replacement node joins, and Ray Train restarts the workers from the checkpoint."""

    def kill_its_node(info: dict) -> None:
        name = cluster.node_of(info["pid"])
        cluster.kill_node(name)
        cluster.wait_for_nodes(2)  # Ray has noticed the node is gone
        cluster.add_node(f"{name}-replacement")

    args = train_args(
        session_root,
        pretrained_weights,
        **{
            "cluster.max_failures": 1,
            "fault.rank": 1,
            "fault.point": "batch",
            "fault.phase": "head",
            "fault.epoch": 1,
            "fault.action": "hang",
            "output.model_name": "submitted-node-loss",
        },
    )
    with FaultWatcher(session_root, kill_its_node) as watch:
        proc = submit(cluster, runtime_env_file, *args)
    out = proc.stdout + proc.stderr
    assert watch.fired is not None, out[-4000:]
    assert proc.returncode == 0, out[-5000:]
    cluster.wait_for_nodes(3)
    run_uri = completed_run(out)
    assert storage.exists(f"{run_uri}/_SUCCESS")
    m = storage.read_json(f"{run_uri}/metrics.json")
    [failure] = m["failures"]
    assert (failure["stage"], failure["phase"], failure["epoch"]) == ("train", "head", 2)
    assert failure["rank"] == 1 and failure["resumed_by"] == "ray_train_restart", failure
    # From head epoch 1, reported seconds before the loss (or, had Ray Train not
    # registered that checkpoint yet, from the start, redoing that one epoch).
    start = failure["resumed_from"] or {"phase": "head", "epoch": 0}
    assert start["phase"] == "head" and failure["epochs_redone"] == 1 - start["epoch"] <= 1
    assert [r["epoch"] for r in m["history"]["head"]] == [1, 2, 3]


def _kuberay_submit(cluster: RayNodes, submission_id: str, *entrypoint: str):
    """jobs/kuberay_submit.sh with what KubeRay gives its submitter container."""
    env = client_env(
        RAY_DASHBOARD_ADDRESS=cluster.dashboard.removeprefix("http://"),
        RAY_JOB_SUBMISSION_ID=submission_id,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=cluster.token,
    )
    proc = subprocess.run(
        [str(ROOT / "jobs" / "kuberay_submit.sh"), *entrypoint],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_a_retried_kuberay_submitter_neither_resubmits_nor_hides_a_failure(cluster):
    """KubeRay pitfalls: a retried submitter failing on "submission ID exists"
    (kuberay#2317), and one that exits 0 after a failed job (kuberay#3211)."""
    ok_id, bad_id = f"xfer-ok-{os.getpid()}", f"xfer-bad-{os.getpid()}"
    code, out = _kuberay_submit(cluster, ok_id, "python", "-c", "print('the job ran')")
    assert code == 0 and "the job ran" in out, out[-3000:]
    code, out = _kuberay_submit(cluster, ok_id, "python", "-c", "print('the job ran')")
    assert code == 0, out[-3000:]
    assert "not submitting it again" in out and "submitting job" not in out, out[-3000:]

    code, out = _kuberay_submit(cluster, bad_id, "python", "-c", "raise SystemExit(3)")
    assert code == 1, out[-3000:]
    code, out = _kuberay_submit(cluster, bad_id, "python", "-c", "raise SystemExit(3)")
    assert code == 1 and "not submitting it again" in out, out[-3000:]
