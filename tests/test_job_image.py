"""The job image (infra/Dockerfile), and the secrets that stay out of it and out of git.

    .venv/bin/pytest -q tests/test_job_image.py

These tests read the Dockerfile, the lock and the build context filter;
tests/test_image_build.py builds the image and runs a smoke test inside it
(`make image-test`). The runbook has operators create secret-bearing files in the
checkout (s3.env, terraform.tfvars, Terraform state, a dashboard token): .dockerignore
must keep them out of the image and .gitignore out of git, while keeping what the image
runs (the code, jobs/kuberay_submit.sh) and what git should hold (the .example files).
"""

from __future__ import annotations

import functools
import re
import subprocess

import pytest

from .deploy import ROOT

SECRETS = [
    "s3.env",
    "infra/terraform/envs/prod/terraform.tfvars",
    "infra/terraform/envs/dev/terraform.tfvars",
    "infra/terraform/envs/prod/.terraform/providers/registry.terraform.io/hashicorp/aws",
    "infra/terraform/envs/prod/terraform.tfstate",
    "infra/terraform/envs/prod/terraform.tfstate.backup",
    "infra/terraform/envs/prod/.terraform/terraform.tfstate",
    "auth_token",
    ".env",
]
KEPT = [
    "infra/terraform/envs/prod/terraform.tfvars.example",
    "infra/terraform/envs/prod/backend.hcl",
    "infra/terraform/envs/prod/main.tf",
    "infra/terraform/modules/xfer/iam.tf",
    "infra/requirements.lock",
    "jobs/kuberay_submit.sh",
    "jobs/train.py",
    "jobs/configs/gpu_production.yaml",
    "src/xfer/cli.py",
    "k8s/overlays/prod/kustomization.yaml",
]


@functools.cache
def lock_pins() -> tuple[tuple[str, str], ...]:
    pins = []
    for line in (ROOT / "infra" / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"requirements.lock: {line!r} is not pinned with =="
            pins.append((re.sub(r"[-_.]+", "-", name).lower(), version))
    return tuple(pins)


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _docker_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it: `**` any directories, `*` `?` in one."""
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def docker_ignores(path: str) -> bool:
    """Whether the build context leaves path out: it or a parent matches, last rule wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        regex = _docker_regex(pattern.removeprefix("!"))
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def git_ignores(path: str) -> bool:
    out = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
    assert out.returncode in (0, 1), f"git check-ignore failed on {path}"
    return out.returncode == 0


# ------------------------------------------------------------------ the image


def test_lock_pins_the_tested_stack_and_no_dev_tools() -> None:
    pins = dict(lock_pins())
    for name, series in (("tensorflow", "2.21."), ("tf-keras", "2.21."), ("ray", "2.60.")):
        assert pins.get(name, "").startswith(series), f"{name}=={pins.get(name)}"
    dev = {"pytest", "ruff", "mypy", "python-hcl2", "types-pyyaml"} & set(pins)
    assert not dev, f"dev-only tools in the image: {dev}"


def test_dockerfile() -> None:
    text = (ROOT / "infra" / "Dockerfile").read_text()
    assert text.startswith("#") and "docker build" in text.split("\nFROM", 1)[0]
    instructions = [ln.split(None, 1) for ln in text.splitlines() if ln and ln[0].isupper()]
    users = [arg.strip() for op, arg in instructions if op == "USER"]
    # Numeric, so that the pods' runAsNonRoot can be checked before the container starts.
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), f"runs as {users}"
    # The base is a build argument (make image-test builds on an offline stand-in); its
    # default, what clusters build on, is TensorFlow's GPU image of the locked release.
    (base,) = [arg for op, arg in instructions if op == "FROM"]
    assert base.strip() == "${BASE_IMAGE}"
    tf = dict(lock_pins())["tensorflow"]
    assert f"ARG BASE_IMAGE=docker.io/tensorflow/tensorflow:{tf}-gpu\n" in text
    assert re.search(r"^ENV TF_USE_LEGACY_KERAS=1\b", text, re.M), "TF_USE_LEGACY_KERAS=1"
    run_lines = text.replace("\\\n", " ")  # RUN lines continued with a backslash, joined
    assert re.search(r"pip install .*-r \S*requirements\.lock", run_lines), "install the lock"
    assert "COPY infra/requirements.lock" in text
    # jobs/kuberay_submit.sh, every RayJob's submitter command, is run from here.
    assert re.search(r"^COPY \. /opt/xfer$", text, re.M)


# ---------------------------------------------------- what stays out, what stays in


def test_dockerignore_keeps_vcs_and_virtualenv_out() -> None:
    for path in (".git/config", ".venv/bin/python", "src/xfer/__pycache__/cli.cpython-311.pyc"):
        assert docker_ignores(path), f"{path} would be in the image"


@pytest.mark.parametrize("path", SECRETS)
def test_dockerignore_keeps_secrets_and_state_out_of_the_image(path: str) -> None:
    assert docker_ignores(path), f"{path} would be copied into the image"


@pytest.mark.parametrize("path", KEPT)
def test_dockerignore_keeps_what_the_image_runs(path: str) -> None:
    assert not docker_ignores(path), f"{path} would be missing from the image"


@pytest.mark.parametrize("path", SECRETS)
def test_gitignore_keeps_secrets_and_state_out_of_git(path: str) -> None:
    assert git_ignores(path), f"{path} could be committed"


@pytest.mark.parametrize("path", [*KEPT, "infra/terraform/envs/prod/.terraform.lock.hcl"])
def test_gitignore_keeps_what_belongs_in_git(path: str) -> None:
    assert not git_ignores(path), f"{path} would be ignored by git"


def test_the_dockerignore_reading_is_dockers() -> None:
    """The matcher above, on Docker's documented examples (docs: .dockerignore file)."""
    assert _docker_regex("*/temp*").fullmatch("somedir/temporary.txt")
    assert not _docker_regex("*/temp*").fullmatch("a/b/temporary.txt")
    assert _docker_regex("*/*/temp*").fullmatch("a/b/temporary.txt")
    assert _docker_regex("temp?").fullmatch("tempa") and not _docker_regex("temp?").fullmatch("t")
    assert _docker_regex("**/*.go").fullmatch("main.go")
    assert _docker_regex("**/*.go").fullmatch("a/b/main.go")
