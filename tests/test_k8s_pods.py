"""The pods the KubeRay manifests make: security, shared memory, the job submitter.

    .venv/bin/pytest -q tests/test_k8s_pods.py

Every pod of every rendering (tests/deploy.py): the Ray head and workers and the
submitter of the training RayJob, of the RayCronJob's jobTemplate and of the nightly
RayJob template the CronJob creates, and the CronJob's own pod. Each must pass the
PodSecurity "restricted" profile, as its namespace enforces it; the Ray pods keep the
object store in memory; the submitters run jobs/kuberay_submit.sh on the entrypoint.
"""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .deploy import (
    ENVS,
    ROOT,
    containers,
    job_specs,
    kustomize,
    one,
    pod_specs,
    quantity,
    ray_pods,
    rendering,
    renderings,
    schedule_dir,
    schema_errors,
    train_dir,
)

SUBMIT = ROOT / "jobs" / "kuberay_submit.sh"
SUBMIT_COMMAND = ["bash", "/opt/xfer/jobs/kuberay_submit.sh"]
# Volume types the restricted profile allows (kubernetes.io/docs/concepts/security/
# pod-security-standards).
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
# Ray's object store takes this share of a node's memory by default
# (ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION), in /dev/shm if it fits there.
OBJECT_STORE_SHARE = 0.3


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What PodSecurity `restricted` (latest) would refuse in this pod spec."""
    found = []
    pod_sc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(f"pod: {key}")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(kinds)}")
    for c in containers(pod):
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            found.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            found.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities {caps['add']}")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            found.append(f"{name}: runs as uid 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{name}: hostPort")
    return found


# ------------------------------------------------------------------ security


@pytest.mark.parametrize("name", renderings())
def test_every_pod_passes_podsecurity_restricted(name: str) -> None:
    pods = pod_specs(rendering(name))
    assert pods, f"{name}: no pods found"
    for where, pod in pods:
        assert pod is not None, f"{name}: {where}: no pod template (KubeRay's default fails)"
        assert not restricted_violations(pod), f"{name}: {where}: {restricted_violations(pod)}"


def test_the_restricted_check_finds_what_it_should() -> None:
    job = one(kustomize(train_dir("prod")), "RayJob", "xfer-train")
    (_, head), *_ = ray_pods(job["spec"])
    assert not restricted_violations(head)
    mutations = {
        "seccompProfile": lambda pod: pod["securityContext"].pop("seccompProfile"),
        "drop ALL": lambda pod: pod["containers"][0]["securityContext"].pop("capabilities"),
        "allowPrivilegeEscalation": lambda pod: pod["containers"][0]["securityContext"].pop(
            "allowPrivilegeEscalation"
        ),
        "runAsNonRoot": lambda pod: pod["securityContext"].pop("runAsNonRoot"),
        "hostPath": lambda pod: pod["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "init container": lambda pod: pod.setdefault("initContainers", []).append(
            {"name": "init", "image": "x"}
        ),
    }
    for what, mutate in mutations.items():
        pod = copy.deepcopy(head)
        mutate(pod)
        assert restricted_violations(pod), f"a pod without {what} passed"


def test_ray_containers_security_covers_kuberays_init_container() -> None:
    """KubeRay's wait-gcs-ready init container copies the Ray container's securityContext."""
    for name in renderings():
        for where, spec in job_specs(rendering(name)):
            for group, pod in ray_pods(spec):
                init = {"name": "wait-gcs-ready", **copy.deepcopy(pod["containers"][0])}
                simulated = {**pod, "initContainers": [init]}
                assert not restricted_violations(simulated), f"{name}: {where} {group}"


# --------------------------------------------------------------- /dev/shm


@pytest.mark.parametrize("name", renderings())
def test_every_ray_pod_keeps_the_object_store_in_memory(name: str) -> None:
    specs = job_specs(rendering(name))
    assert specs, f"{name}: no RayJob specs"
    for where, spec in specs:
        for group, pod in ray_pods(spec):
            (ray,) = pod["containers"]
            mounts = {m["mountPath"]: m["name"] for m in ray.get("volumeMounts", [])}
            assert "/dev/shm" in mounts, f"{name}: {where} {group}: no /dev/shm"
            (volume,) = [v for v in pod.get("volumes", []) if v["name"] == mounts["/dev/shm"]]
            empty_dir = volume.get("emptyDir") or {}
            assert empty_dir.get("medium") == "Memory", f"{where} {group}: /dev/shm on disk"
            size, memory = (
                quantity(empty_dir["sizeLimit"]),
                quantity(ray["resources"]["limits"]["memory"]),
            )
            assert OBJECT_STORE_SHARE * memory <= size < memory, (
                f"{name}: {where} {group}: /dev/shm {empty_dir['sizeLimit']} must hold the "
                f"object store (30% of {ray['resources']['limits']['memory']}) and leave room"
            )


# ------------------------------------------------------------- the submitter


@pytest.mark.parametrize("name", renderings())
def test_every_rayjob_submits_its_entrypoint_with_kuberay_submit(name: str) -> None:
    head_images = set()
    for where, spec in job_specs(rendering(name)):
        assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode", where
        template = spec["submitterPodTemplate"]
        (submitter,) = template["spec"]["containers"]
        assert submitter["command"] == SUBMIT_COMMAND, f"{name}: {where}"
        assert submitter["args"] == shlex.split(spec["entrypoint"]), (
            f"{name}: {where}: the submitter's args are not the RayJob's entrypoint"
        )
        assert template["spec"]["restartPolicy"] == "Never"
        (_, head), *_ = ray_pods(spec)
        assert submitter["image"] == head["containers"][0]["image"], f"{where}: same image"
        head_images.add(submitter["image"])
        assert spec["submitterConfig"]["backoffLimit"] >= 1, f"{where}: retries are safe"
    assert SUBMIT.is_file() and head_images


@pytest.mark.parametrize("env", ENVS)
def test_pods_are_set_up_alike(env: str) -> None:
    lock = (ROOT / "infra" / "requirements.lock").read_text()
    (ray_version,) = [
        ln.split("==")[1].strip() for ln in lock.splitlines() if ln.startswith("ray==")
    ]
    specs = [*job_specs(kustomize(schedule_dir(env))), *job_specs(kustomize(train_dir(env)))]
    for where, spec in specs:
        assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: tear the cluster down"
        for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds"):
            assert spec.get(key, 0) > 0, f"{where}: {key}"
        assert "backoffLimit" in spec, f"{where}: backoffLimit"
        assert spec["rayClusterSpec"]["rayVersion"] == ray_version, (
            f"{where}: rayVersion must be the image's ray ({ray_version})"
        )
        auth = spec["rayClusterSpec"].get("authOptions", {})
        assert auth.get("mode") == "token" and auth.get("secretName"), f"{where}: token auth"
        for group, pod in ray_pods(spec):
            assert pod.get("serviceAccountName") == "xfer", f"{where} {group}: IRSA account"
            (container,) = pod["containers"]
            assert container["envFrom"] == [{"configMapRef": {"name": "xfer-settings"}}], (
                f"{where} {group}: AWS_REGION from the namespace's xfer-settings"
            )
            res = container["resources"]
            for kind in ("cpu", "memory"):
                assert res["requests"][kind] == res["limits"][kind], f"{where} {group}: {kind}"
            gpu = "nvidia.com/gpu" in res["limits"]
            assert gpu == (group != "head"), f"{where} {group}: GPUs on workers only"
            tolerated = {t.get("key") for t in pod.get("tolerations", [])}
            assert not gpu or "nvidia.com/gpu" in tolerated, f"{where} {group}: GPU taint"


def test_submit_script_is_bash_with_its_usage_in_the_header() -> None:
    text = SUBMIT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    header = text.split("\nset -euo pipefail\n", 1)[0]
    assert "Usage: jobs/kuberay_submit.sh ENTRYPOINT [ARG ...]" in header
    for name in ("RAY_DASHBOARD_ADDRESS", "RAY_JOB_SUBMISSION_ID", "RAY_AUTH_TOKEN"):
        assert name in header, f"the header should document {name}"
    out = subprocess.run(["bash", "-n", str(SUBMIT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({}, ["python", "-c", "pass"], "RAY_DASHBOARD_ADDRESS is not set"),
        ({"RAY_DASHBOARD_ADDRESS": "127.0.0.1:1"}, ["true"], "RAY_JOB_SUBMISSION_ID is not set"),
        ({"RAY_DASHBOARD_ADDRESS": "127.0.0.1:1", "RAY_JOB_SUBMISSION_ID": "x"}, [], "usage"),
    ],
    ids=["no-address", "no-id", "no-entrypoint"],
)
def test_submit_script_refuses_wrong_usage(env: dict[str, str], args: list[str], message: str):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run(
        ["bash", str(SUBMIT), *args], env={**clean, **env}, capture_output=True, text=True
    )
    assert out.returncode == 2 and message in out.stderr, (out.returncode, out.stderr)


def test_submit_script_fails_when_no_dashboard_answers(unused_port: int) -> None:
    """Exit 3, saying so, rather than submitting blind or reporting success."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env = {
        **clean,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{clean.get('PATH', '')}",
        "RAY_DASHBOARD_ADDRESS": f"127.0.0.1:{unused_port}",
        "RAY_JOB_SUBMISSION_ID": "never-submitted",
        "KUBERAY_SUBMIT_WAIT_SECONDS": "0",
    }
    out = subprocess.run(
        ["bash", str(SUBMIT), "python", "-c", "pass"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 3, (out.returncode, out.stdout, out.stderr)
    assert "no answer from the Ray dashboard" in out.stderr
    assert "submitting" not in out.stdout


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------- adding arguments to a RayJob


def test_rayjob_add_args_keeps_entrypoint_and_submitter_together() -> None:
    rendered = yaml.safe_dump_all(list(kustomize(train_dir("prod"))))
    out = subprocess.run(
        [sys.executable, str(ROOT / "k8s" / "rayjob_add_args.py"), "output.run_id=abc-1"],
        input=rendered,
        capture_output=True,
        text=True,
        check=True,
    )
    (job,) = [d for d in yaml.safe_load_all(out.stdout) if d]
    spec = job["spec"]
    (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"]
    assert submitter["args"][-1] == "output.run_id=abc-1"
    assert shlex.split(spec["entrypoint"]) == submitter["args"]
    assert not schema_errors(job)


def test_rayjob_add_args_on_the_nightly_template() -> None:
    template = one(kustomize(schedule_dir("prod")), "ConfigMap", "xfer-nightly-score-rayjob")
    out = subprocess.run(
        [sys.executable, str(ROOT / "k8s" / "rayjob_add_args.py"), "--date", "2026-11-26"],
        input=template["data"]["rayjob.yaml"],
        capture_output=True,
        text=True,
        check=True,
    )
    (job,) = [d for d in yaml.safe_load_all(out.stdout) if d]
    (submitter,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    assert submitter["args"][-2:] == ["--date", "2026-11-26"]
    assert shlex.split(job["spec"]["entrypoint"]) == submitter["args"]
    assert job["metadata"]["generateName"] == "xfer-nightly-score-" and not schema_errors(job)


def test_runbook_uses_rayjob_add_args_where_it_changes_a_command() -> None:
    text = (ROOT / "docs" / "runbook.md").read_text()
    assert "rayjob_add_args.py output.run_id=<run_id>" in text
    assert "rayjob_add_args.py --date" in text
