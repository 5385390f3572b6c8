"""S3 credentials, by IRSA or by static keys, chosen once per environment.

    .venv/bin/pytest -q tests/test_k8s_credentials.py

k8s/overlays/<env>/settings/kustomization.yaml lists one of the two components in
k8s/components/credentials/. Each environment is rendered by `kubectl kustomize` both
ways, with either nightly scheduler, schedule and training run alike (tests/deploy.py,
renderings()). Every container that talks to S3, the Ray head and workers of the
training RayJob, of the RayCronJob's jobTemplate and of the nightly RayJob template the
CronJob scheduler creates, must get the credentials of the mode; the IRSA rendering
must refer to no Secret but the Ray dashboard token's.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from .deploy import (
    CREDENTIALS,
    CREDENTIALS_LINE,
    ENVS,
    Resources,
    job_specs,
    kustomize,
    load_all,
    one,
    ray_objects,
    ray_pods,
    rendering,
    renderings,
    schedule_dir,
    schema_errors,
    settings_of,
    variant,
    walk,
)

S3_KEYS = {"secretRef": {"name": "xfer-s3", "optional": False}}
SETTINGS = {"configMapRef": {"name": "xfer-settings"}}
ROLE_ANNOTATION = "eks.amazonaws.com/role-arn"
RAY_AUTH_SECRET = "xfer-ray-auth"


def ray_containers(resources: Resources) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod, container) of every Ray head and worker: the containers that read S3."""
    found = []
    for where, spec in job_specs(resources):
        for group, pod in ray_pods(spec):
            found += [(f"{where} {group} {c['name']}", pod, c) for c in pod["containers"]]
    return found


def submitters(resources: Resources) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for where, spec in job_specs(resources):
        for c in spec["submitterPodTemplate"]["spec"]["containers"]:
            found.append((f"{where} submitter {c['name']}", c))
    return found


def secret_references(node: Any) -> list[Any]:
    """Every reference to a Secret in a manifest: envFrom, env, volumes, authOptions."""
    found = []
    for n in walk(node):
        for key in ("secretRef", "secretKeyRef", "secret"):
            if key in n:
                found.append(n[key])
        if "secretName" in n:
            found.append(n["secretName"])
    return found


def static(name: str) -> bool:
    return "static-keys" in name.split("+")


@pytest.mark.parametrize("name", renderings())
def test_every_ray_container_gets_the_credentials_of_the_mode(name: str) -> None:
    resources = rendering(name)
    containers = ray_containers(resources)
    # Training: head and workers; a schedule: those of its jobTemplate and of the template.
    expected = 2 if "/train" in name else (2 if "cronjob" in name.split("+") else 4)
    assert len(containers) == expected, f"{name}: {[w for w, _, _ in containers]}"
    for where, pod, container in containers:
        env_from = container.get("envFrom", [])
        assert env_from[:1] == [SETTINGS], f"{name}: {where}: xfer-settings first"
        if static(name):
            assert S3_KEYS in env_from, f"{name}: {where}: no Secret xfer-s3 (optional: false)"
        else:
            assert env_from == [SETTINGS], f"{name}: {where}: {env_from}"
            assert not secret_references(container), f"{name}: {where}: a Secret with IRSA"
        assert pod["serviceAccountName"] == "xfer", f"{name}: {where}"


@pytest.mark.parametrize("name", renderings())
def test_submitters_get_the_settings_and_never_the_keys(name: str) -> None:
    """They expand $(XFER_BUCKET) in what they submit; they talk to the dashboard only."""
    found = submitters(rendering(name))
    assert found, name
    for where, container in found:
        assert container.get("envFrom") == [SETTINGS], f"{name}: {where}"
        assert not secret_references(container.get("env", [])), f"{name}: {where}"


@pytest.mark.parametrize("name", [n for n in renderings() if not static(n)])
def test_irsa_rendering_refers_to_no_secret_but_the_dashboard_token(name: str) -> None:
    resources = rendering(name)
    nodes = [*resources, *(obj for _, obj in ray_objects(resources))]
    for node in nodes:
        refs = secret_references(node)
        assert set(map(str, refs)) <= {RAY_AUTH_SECRET}, f"{name}: {node['kind']}: {refs}"
    assert "xfer-s3" not in yaml.safe_dump(list(resources)), f"{name} names xfer-s3"


@pytest.mark.parametrize("mode", CREDENTIALS)
@pytest.mark.parametrize("env", ENVS)
def test_service_account_has_the_settings_role_with_irsa_and_none_with_keys(
    env: str, mode: str
) -> None:
    resources = kustomize(schedule_dir(env, variant(env, credentials=mode)))
    annotations = one(resources, "ServiceAccount", "xfer")["metadata"].get("annotations", {})
    settings = settings_of(resources)
    if mode == "irsa":
        arn = f"arn:aws:iam::{settings['XFER_AWS_ACCOUNT']}:role/{settings['XFER_IAM_ROLE']}"
        assert annotations == {ROLE_ANNOTATION: arn}, annotations
    else:
        assert ROLE_ANNOTATION not in annotations, "static keys, yet a role to assume"


@pytest.mark.parametrize("scheduler", ["raycronjob", "cronjob"])
@pytest.mark.parametrize("env", ENVS)
def test_static_keys_template_is_still_the_raycronjobs_job_and_fits_the_crd(
    env: str, scheduler: str
) -> None:
    """The template string gets the keys by replacement, the RayCronJob by a patch."""
    resources = kustomize(schedule_dir(env, variant(env, scheduler, credentials="static-keys")))
    objects = ray_objects(resources)
    for where, obj in objects:
        assert not schema_errors(obj), f"{env} ({scheduler}): {where}: {schema_errors(obj)}"
    if scheduler == "raycronjob":
        job_template = one(resources, "RayCronJob", "xfer-nightly-score")["spec"]["jobTemplate"]
        template = one(resources, "ConfigMap", "xfer-nightly-score-rayjob")
        assert yaml.safe_load(template["data"]["rayjob.yaml"])["spec"] == job_template


@pytest.mark.parametrize("env", ENVS)
def test_each_environment_chooses_one_mode_in_one_place(env: str) -> None:
    (component,) = load_all(schedule_dir(env) / "settings" / "kustomization.yaml")
    active = [c.rsplit("/", 1)[-1] for c in component["components"]]
    assert len(active) == 1 and active[0] in CREDENTIALS, active
    text = (schedule_dir(env) / "settings" / "kustomization.yaml").read_text()
    for mode in set(CREDENTIALS) - set(active):
        commented = CREDENTIALS_LINE.format(mode).replace("  - ", "  # - ")
        assert commented in text, f"{env}: no commented {mode} line to swap in"
    for directory in (schedule_dir(env), schedule_dir(env) / "train"):
        (kust,) = load_all(directory / "kustomization.yaml")
        assert [c for c in kust["components"] if c.endswith("settings")], directory
