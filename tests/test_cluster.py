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

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from xfer.registry.provenance import code_identity
from xfer.store import storage
from xfer.store.s3server import IDENTITIES_FILE, EmbeddedS3

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
        # No scoring pass over the validation split (conftest.train_overrides neither).
        "output.calibrate": "false",
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
            "output.predictions": "false",  # not scored: what it proves is the recovery
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


# ------------------------------------------------------- day one, as the runbook says

RUNBOOK = ROOT / "docs" / "runbook.md"
# What this machine is not: GPUs, 224 px, MobileNetV2. Appended to the runbook's own
# commands (and only these); everything else is the runbook's text.
TEST_BED_TRAIN = [
    f"data.image_size={IMAGE_SIZE}",
    "data.shuffle_buffer=64",
    "data.parallel_reads=2",
    "model.base=tiny_cnn",
    "model.head.dense=[{units: 16}]",
    "train.batch_size=8",
    "train.mixed_precision=false",
    "train.head.epochs=3",
    "train.head.learning_rate=0.005",
    "train.fine_tune.epochs=1",
    "train.fine_tune.unfreeze_from=null",
    "train.fine_tune.unfreeze_top=4",
    "train.verbose=1",
    "cluster.num_workers=2",
    "cluster.use_gpu=false",
    "cluster.cpus_per_worker=1",
    "cluster.gpus_per_worker=0",
    "cluster.memory_per_worker_gb=null",
    # Two tiny runs can tie or swap on 14 test images: the second must publish.
    "output.gate.min_test_accuracy=0",
    "output.gate.vs_published=false",
]
TEST_BED_SCORE = [
    "score.use_gpu=false",
    "score.gpus_per_actor=0",
    "score.num_actors=1",
    "score.cpus_per_actor=1",
    "score.decode_threads=1",
    "score.batch_size=16",
    "score.block_size=64",
]


def runbook_block(name: str) -> list[str]:
    """The commands of the runbook's block marked ``<!-- day-one: name -->``."""
    found = re.search(rf"<!-- day-one: {name} -->\n```bash\n(.*?)```", RUNBOOK.read_text(), re.S)
    assert found, f"docs/runbook.md has no day-one block {name!r}"
    lines = found.group(1).replace("\\\n", " ").splitlines()
    return [ln.split("  #")[0].strip() for ln in lines if ln.strip() and not ln.startswith("#")]


class Laptop:
    """Runs the runbook's commands as an operator at a laptop: `xfer` from this
    checkout's virtualenv, `jobs/submit.sh` against the cluster's dashboard, and the two
    commands that are not installed here done the same way in Python (`aws s3 cp|sync`
    with boto3; `curl` of the ImageNet weights, which cannot be downloaded here, by
    copying the test's pretrained base to the file name it would have written)."""

    def __init__(self, cluster: RayNodes, runtime_env: Path, files: dict[str, str]):
        self.env = client_env(
            RAY_ADDRESS=cluster.dashboard,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=cluster.token,
            XFER_RUNTIME_ENV=str(runtime_env),
        )
        self.files = files  # local names in the runbook -> paths here
        self.log: list[tuple[str, int, float]] = []

    def run(self, line: str, **values: str) -> subprocess.CompletedProcess:
        for key, value in values.items():
            line = line.replace(f"<{key}>", value)
        argv = line.split()
        started = time.monotonic()
        proc = self._run(argv)
        self.log.append((line, proc.returncode, time.monotonic() - started))
        return proc

    def start(self, line: str) -> subprocess.Popen:
        """A long command in the background (to stop it midway)."""
        return subprocess.Popen(
            self._argv(line.split()),
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def _argv(self, argv: list[str]) -> list[str]:
        if argv[0] == "xfer":
            return [os.path.join(os.path.dirname(sys.executable), "xfer"), *argv[1:]]
        if argv[:2] == ["jobs/submit.sh", "train"]:  # its test predictions use score:
            return [str(ROOT / argv[0]), *argv[1:], *TEST_BED_TRAIN, *TEST_BED_SCORE]
        if argv[:2] == ["jobs/submit.sh", "score"]:
            return [str(ROOT / argv[0]), *argv[1:], *TEST_BED_SCORE]
        return [str(ROOT / argv[0]) if argv[0].startswith("jobs/") else argv[0], *argv[1:]]

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess:
        if argv[:2] == ["aws", "s3"]:
            return self._aws_s3(argv[2], argv[3], argv[4])
        if argv[0] == "curl":
            name = argv[-1].rsplit("/", 1)[-1]
            assert name in self.files, f"no stand-in for {name}"
            return subprocess.CompletedProcess(argv, 0, "", "")
        return subprocess.run(
            self._argv(argv), env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=900
        )

    def _aws_s3(self, verb: str, src: str, dest: str) -> subprocess.CompletedProcess:
        local = Path(self.files.get(src.rstrip("/"), src))
        paths = sorted(p for p in local.rglob("*") if p.is_file()) if verb == "sync" else [local]
        for path in paths:
            rel = path.relative_to(local).as_posix() if verb == "sync" else ""
            storage.upload_file(str(path), f"{dest.rstrip('/')}/{rel}" if rel else dest)
        return subprocess.CompletedProcess([verb], 0, f"{len(paths)} file(s)", "")


def can(keys: dict[str, str], op: str, key: str) -> bool:
    """Whether an identity may GET or PUT ``s3://xfer-prod/<key>`` (AccessDenied: no)."""
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client(
        "s3",
        endpoint_url=keys["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    try:
        if op == "get":
            client.get_object(Bucket="xfer-prod", Key=key)
        else:
            client.put_object(Bucket="xfer-prod", Key=key, Body=b"a probe")
        return True
    except ClientError as e:
        assert e.response["Error"]["Code"] == "AccessDenied", e
        return False


def _ok(proc: subprocess.CompletedProcess | tuple[int, str], what: str) -> str:
    code, out = (
        (proc.returncode, (proc.stdout or "") + (proc.stderr or ""))
        if isinstance(proc, subprocess.CompletedProcess)
        else proc
    )
    assert code == 0, f"{what} exited {code}:\n{out[-5000:]}"
    return out


def job_role_actions(bucket: str) -> list[str]:
    """The job role's S3 permissions (infra/terraform/modules/xfer/iam.tf: what it may
    list, read and write, by prefix) as SeaweedFS identity actions."""
    tf = (ROOT / "infra" / "terraform" / "modules" / "xfer" / "iam.tf").read_text()

    def prefixes(sid: str) -> list[str]:
        block = re.search(rf'sid\s*=\s*"{sid}".*?resources\s*=\s*\[(.*?)\]', tf, re.S)
        assert block, f"iam.tf has no statement {sid}"
        return sorted(set(re.findall(r"bucket_arn\}/(\w+)/\*", block.group(1))))

    reads, writes = prefixes("ReadJobObjects"), prefixes("WriteJobOutputs")
    assert "raw" not in reads and "datasets" not in writes  # what the test relies on
    # SeaweedFS authorises HeadBucket (xfer and pyarrow call it before writing) only
    # with a bucket-wide Read, where AWS takes the role's ListBucket: so this identity
    # can read every prefix, raw/ included, while its writes are the role's exactly.
    return [
        f"List:{bucket}",
        f"Read:{bucket}",
        *(f"Read:{bucket}/{p}/*" for p in reads),
        *(f"Write:{bucket}/{p}/*" for p in writes),
    ]


@pytest.fixture
def day_one_store(tmp_path, monkeypatch, pretrained_weights):
    """An S3 server with the runbook's two identities: the operator's (everything) and
    the job's (the Terraform role's prefixes). This test process and the laptop are the
    operator; the jobs on the cluster get the job's keys through their runtime env (a
    test-bed stand-in for the pods' role: the shipped runtime env carries no keys)."""
    base = tmp_path / "base.h5"  # fetched from the session's store before leaving it
    storage.download_file(pretrained_weights, str(base))
    data = tmp_path / "s3"
    data.mkdir()
    job = {"accessKey": "XFERJOB" + os.urandom(6).hex().upper(), "secretKey": os.urandom(20).hex()}
    identities = {
        "identities": [
            {
                "name": "operator",
                "credentials": [
                    {
                        "accessKey": "XFEROP" + os.urandom(6).hex().upper(),
                        "secretKey": os.urandom(20).hex(),
                    }
                ],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            {"name": "job", "credentials": [job], "actions": job_role_actions("xfer-prod")},
        ]
    }
    (data / IDENTITIES_FILE).write_text(json.dumps(identities))
    server = EmbeddedS3(data)
    server.start()
    try:
        server.create_bucket("xfer-prod")
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        job_env = {
            "AWS_ENDPOINT_URL_S3": server.env()["AWS_ENDPOINT_URL_S3"],
            "AWS_ACCESS_KEY_ID": job["accessKey"],
            "AWS_SECRET_ACCESS_KEY": job["secretKey"],
        }
        yield server, job_env, base
    finally:
        server.stop()


def test_day_one_as_the_runbook_says(cluster, day_one_store, tmp_path):
    """docs/runbook.md's day-one blocks, in order, on the multi-node test bed: data and
    weights up and sharded from the laptop; a training run submitted, stopped and
    resumed by id from the laptop (RAY_ADDRESS=http://…); the runs listed; the first
    night and an empty night scored; a retrain published, then rolled back."""
    from xfer.data.synth import synthesize

    weights = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    server, job_keys, base = day_one_store
    synthesize(str(tmp_path / "pets"), ["cats", "dogs"], per_class=40, size=IMAGE_SIZE, seed=3)
    runtime_env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update(job_keys)
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    files = {"./pets": str(tmp_path / "pets"), weights: str(base)}
    laptop = Laptop(cluster, tmp_path / "runtime_env.yaml", files)
    laptop.env.update(server.env())  # the operator's keys

    # 5. Data and weights, sharded on the laptop (a local Ray: no RAY_ADDRESS there).
    dashboard = laptop.env.pop("RAY_ADDRESS")
    for line in runbook_block("data"):
        _ok(laptop.run(line), line)
    manifest = storage.read_json("s3://xfer-prod/datasets/pets/manifest.json")
    # Why the operator shards: the job's role cannot write datasets/ (nor read raw/ on
    # AWS; see job_role_actions), but it writes where the role may.
    assert not can(job_keys, "put", "datasets/pets/manifest.json")
    assert can(job_keys, "put", "_tmp/day-one-probe")
    assert manifest["classes"] == ["cats", "dogs"], manifest
    laptop.env["RAY_ADDRESS"] = dashboard

    # 7. The first run, stopped after its first epoch, then resumed by id.
    [train] = runbook_block("train")
    job = laptop.start(train)
    out, run_id = "", None
    for line in job.stdout:  # type: ignore[union-attr]
        out += line
        run_id = run_id or (m.group(1) if (m := re.search(r"\[xfer\] run (\S+):", line)) else None)
        if run_id and "[xfer] head epoch 1/3" in line:
            break
    assert run_id, out[-4000:]
    deadline = time.monotonic() + 60  # its checkpoint, reported as the epoch ends
    while not any(
        "checkpoint" in f.uri for f in storage.list_files(f"s3://xfer-prod/runs/{run_id}")
    ):
        assert time.monotonic() < deadline, "no checkpoint after the first epoch"
        time.sleep(1)
    _ok(laptop.run(f"ray job stop {run_id}"), "ray job stop")
    job.wait(timeout=300)
    # jobs/submit.sh exits 1 for a stopped job (`ray job submit` itself says 0).
    assert job.returncode == 1 and not storage.exists(f"s3://xfer-prod/runs/{run_id}/_SUCCESS")
    [resume] = runbook_block("resume")
    out = _ok(laptop.run(resume, run_id=run_id), "resume")
    assert completed_run(out) == f"s3://xfer-prod/runs/{run_id}", out[-3000:]
    resumed = re.search(r"attempt 2 of this run: resuming from \w+ phase, \d epoch", out)
    assert resumed, out[-3000:]
    assert storage.read_json("s3://xfer-prod/models/pets/latest.json")["run_id"] == run_id

    listing, shown = (_ok(laptop.run(ln, run_id=run_id), ln) for ln in runbook_block("look"))
    assert run_id in listing and "complete" in listing, listing
    lineage = storage.read_json(f"s3://xfer-prod/runs/{run_id}/lineage.json")
    assert f"dataset checksum {lineage['dataset']['manifest_checksum'][:12]}" in shown, shown

    # 8. The first night, and a night with no folder at all.
    night_line = runbook_block("night")[0]
    synthesize("s3://xfer-prod/incoming/pets/2026-11-28", ["cats", "dogs"], 6, size=IMAGE_SIZE)
    _ok(laptop.run(night_line, date="2026-11-28"), "the first night")
    night = storage.read_json("s3://xfer-prod/predictions/pets/dt=2026-11-28/_SUCCESS")
    assert night["rows"] == 12 and night["run_id"] == run_id, night
    _ok(laptop.run(night_line, date="2026-11-29"), "an empty night")
    empty = storage.read_json("s3://xfer-prod/predictions/pets/dt=2026-11-29/_SUCCESS")
    assert empty["rows"] == 0 and empty["files"] == [], empty

    # 9. A retrain is published; rolling back publishes the first run again.
    retrain = completed_run(_ok(laptop.run(train), "the retrain"))
    assert storage.read_json("s3://xfer-prod/models/pets/latest.json")["run_uri"] == retrain
    [rollback] = runbook_block("rollback")
    _ok(laptop.run(rollback), rollback)
    latest = storage.read_json("s3://xfer-prod/models/pets/latest.json")
    assert latest["run_id"] == run_id and latest["action"] == "rollback", latest
    print("\n".join(f"{code:>3} {secs:6.1f}s  {line}" for line, code, secs in laptop.log))
