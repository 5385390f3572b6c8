"""The KubeRay manifests (k8s/): what each kustomization renders, and the rules it keeps.

    .venv/bin/pytest -q tests/test_k8s_manifests.py tests/test_k8s_pods.py

Every kustomization is rendered by `kubectl kustomize` (tests/deploy.py), and so are the
variants the runbook has an operator make: the CronJob scheduler instead of the
RayCronJob, and another image. Entrypoints are parsed by xfer's own CLI parser and
their configs loaded, so a manifest cannot name a missing script, config or key, or ask
for GPUs that its config does not use. Pods, their security and the submitter are in
tests/test_k8s_pods.py.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .deploy import (
    ENVS,
    IMAGE,
    K8S,
    ROOT,
    all_images,
    entrypoint_config,
    env_image,
    expand,
    job_specs,
    kustomizations,
    kustomize,
    load_all,
    one,
    quantity,
    ray_objects,
    schedule_dir,
    schedules,
    schema_errors,
    settings_of,
    train_dir,
    variant,
    walk,
)

BUCKET = {"dev": "xfer-dev", "prod": "xfer-prod"}
TRAIN_WORKERS = {"dev": 1, "prod": 4}
SECRET_ENV = {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"}
AWS_KEY_ID = re.compile(r"AKIA[0-9A-Z]{16}")


# ------------------------------------------------------------------ rendering


@pytest.mark.parametrize("path", sorted(K8S.rglob("*.yaml")), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_parses_and_opens_with_its_command(path: Path) -> None:
    assert load_all(path), f"{path} holds no documents"
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path}: should open with a comment giving its command"


@pytest.mark.parametrize("directory", kustomizations(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_kustomization_renders_and_its_ray_objects_fit_the_crds(directory: Path) -> None:
    resources = kustomize(directory)
    assert resources, f"{directory} renders nothing"
    for where, obj in ray_objects(resources):
        errors = schema_errors(obj)
        assert not errors, f"{directory}: {where} fails its CRD schema: {errors}"


@pytest.mark.parametrize("env", ENVS)
def test_cronjob_variant_fits_the_crds_too(env: str) -> None:
    objects = ray_objects(schedules(env)["cronjob"])
    assert [where for where, _ in objects] == ["ConfigMap/xfer-nightly-score-rayjob[rayjob.yaml]"]
    for where, obj in objects:
        assert not schema_errors(obj), f"{env}: {where}: {schema_errors(obj)}"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda spec: spec.update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish"),
        (
            lambda spec: spec["rayClusterSpec"]["workerGroupSpecs"][0].update(replica=4),
            "replica",
        ),
        (
            lambda spec: spec["submitterPodTemplate"]["spec"]["containers"][0].update(arg=[]),
            "arg",
        ),
        (lambda spec: spec.update(backoffLimit="0"), "is not of type"),
        (lambda spec: spec["rayClusterSpec"]["authOptions"].update(mode="tokens"), "tokens"),
    ],
    ids=["misspelt-top-level", "misspelt-worker-group", "misspelt-submitter", "type", "enum"],
)
def test_validator_rejects_what_kubectl_would(mutate: Any, expected: str) -> None:
    job = copy.deepcopy(one(kustomize(train_dir("prod")), "RayJob", "xfer-train"))
    mutate(job["spec"])
    errors = schema_errors(job)
    assert any(expected in e for e in errors), f"not rejected; errors: {errors}"


def test_validator_needs_a_name() -> None:
    job = copy.deepcopy(one(kustomize(train_dir("prod")), "RayJob", "xfer-train"))
    del job["metadata"]["name"]
    assert "metadata: needs name or generateName" in schema_errors(job)


@pytest.mark.parametrize("env", ENVS)
def test_everything_in_the_environments_namespace_which_enforces_restricted(env: str) -> None:
    namespace = f"xfer-{env}"
    for directory in (schedule_dir(env), train_dir(env)):
        for r in kustomize(directory):
            where = f"{directory.relative_to(K8S)}: {r['kind']}/{r['metadata']['name']}"
            if r["kind"] == "Namespace":
                assert r["metadata"]["name"] == namespace, where
            else:
                assert r["metadata"].get("namespace") == namespace, where
    labels = one(kustomize(schedule_dir(env)), "Namespace", namespace)["metadata"]["labels"]
    for mode in ("enforce", "warn", "audit"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", mode


# ------------------------------------------------- schedule apart from training


@pytest.mark.parametrize("env", ENVS)
def test_applying_the_schedule_never_creates_a_training_run(env: str) -> None:
    for scheduler, resources in schedules(env).items():
        kinds = sorted(r["kind"] for r in resources)
        assert "RayJob" not in kinds, f"{env} ({scheduler}): `kubectl apply -k` starts a run"


@pytest.mark.parametrize("env", ENVS)
def test_training_kustomization_holds_only_the_training_rayjob(env: str) -> None:
    resources = kustomize(train_dir(env))
    assert [(r["kind"], r["metadata"]["name"]) for r in resources] == [("RayJob", "xfer-train")]
    comment = (train_dir(env) / "kustomization.yaml").read_text().split("\napiVersion")[0]
    assert f"kubectl create -k k8s/overlays/{env}/train" in comment


@pytest.mark.parametrize("env", ENVS)
def test_each_variant_has_exactly_one_active_scheduler(env: str) -> None:
    """The overlay's resources choose the scheduler; nothing waits to be unsuspended."""
    for scheduler, resources in schedules(env).items():
        found = [r for r in resources if r["kind"] in ("RayCronJob", "CronJob")]
        kind = {"raycronjob": "RayCronJob", "cronjob": "CronJob"}[scheduler]
        assert [r["kind"] for r in found] == [kind], f"{env} ({scheduler}): {found}"
        for r in found:
            assert r["metadata"]["name"] == "xfer-nightly-score"
            assert not r["spec"].get("suspend"), f"{env}: a suspended scheduler to patch later"
            assert r["spec"]["schedule"] == "0 2 * * *" and r["spec"]["timeZone"] == "Etc/UTC"


@pytest.mark.parametrize("env", ENVS)
def test_cronjob_runs_the_raycronjobs_job(env: str) -> None:
    rendered = schedules(env)
    job_template = one(rendered["raycronjob"], "RayCronJob", "xfer-nightly-score")["spec"]
    for scheduler, resources in rendered.items():
        template = one(resources, "ConfigMap", "xfer-nightly-score-rayjob")
        rayjob = yaml.safe_load(template["data"]["rayjob.yaml"])
        assert rayjob["spec"] == job_template["jobTemplate"], (
            f"{env} ({scheduler}): the RayJob template drifted from the RayCronJob's jobTemplate"
        )
        meta = rayjob["metadata"]
        assert "name" not in meta and meta["generateName"] == "xfer-nightly-score-"


@pytest.mark.parametrize("env", ENVS)
def test_cronjob_runs_kubectl_create_with_narrow_rights(env: str) -> None:
    resources = schedules(env)["cronjob"]
    spec = one(resources, "CronJob", "xfer-nightly-score")["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["kubectl", "create", "-f", "/templates/rayjob.yaml"]
    image, _, tag = container["image"].rpartition(":")
    assert "kubectl" in image and tag not in ("", "latest"), "pin the kubectl image"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/templates"]
    assert volumes[mount]["configMap"]["name"] == "xfer-nightly-score-rayjob"
    assert pod["serviceAccountName"] == "xfer-scheduler"
    (rule,) = one(resources, "Role", "xfer-scheduler")["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert set(rule["verbs"]) <= {"create", "get", "list"}, rule["verbs"]
    binding = one(resources, "RoleBinding", "xfer-scheduler")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "xfer-scheduler",
    }
    subject = {"kind": "ServiceAccount", "name": "xfer-scheduler", "namespace": f"xfer-{env}"}
    assert binding["subjects"] == [subject]


def test_runbook_switches_schedulers_without_a_patch_that_the_next_apply_undoes() -> None:
    text = (ROOT / "docs" / "runbook.md").read_text()
    assert "kubectl patch" not in text
    assert "kubectl apply -k k8s/overlays/prod/train" not in text, "training is `create -k`"
    assert "kubectl create -k k8s/overlays/prod/train" in text
    for scheduler in ("raycronjob", "cronjob"):
        assert f"kubectl delete -n xfer-prod -k k8s/schedulers/{scheduler}" in text


# ------------------------------------------------- one place for image and region


@pytest.mark.parametrize("env", ENVS)
def test_every_image_is_the_one_of_the_environments_image_component(env: str) -> None:
    for resources in (*schedules(env).values(), kustomize(train_dir(env))):
        ours = [i for i in all_images(resources) if "kubectl" not in i]
        assert ours and set(ours) == {env_image(env)}, f"{env}: {sorted(set(ours))}"


@pytest.mark.parametrize("env", ENVS)
def test_template_quotes_only_the_image_slots_the_replacements_fill(env: str) -> None:
    """The overlay's replacements split the template at '"' and fill pieces 1, 3 and 5."""
    (template,) = load_all(schedule_dir(env) / "nightly-score-rayjob.yaml")
    text = template["data"]["rayjob.yaml"]
    assert text.split('"')[1::2] == [IMAGE] * 3, (
        f"{env}: only the three images may be double-quoted in nightly-score-rayjob.yaml"
    )
    kust = load_all(schedule_dir(env) / "kustomization.yaml")[0]
    (replacement,) = kust["replacements"]
    indexes = sorted(target["options"]["index"] for target in replacement["targets"])
    assert indexes == [1, 3, 5] and replacement["source"]["name"] == "xfer-image"


@pytest.mark.parametrize("env", ENVS)
def test_changing_the_image_component_changes_every_image(env: str) -> None:
    image = f"registry.example/other/xfer-job@sha256:{'ab' * 32}"
    root = variant(env, image=image)
    for directory in (schedule_dir(env, root), train_dir(env, root)):
        ours = [i for i in all_images(kustomize(directory)) if "kubectl" not in i]
        assert len(ours) >= 3 and set(ours) == {image}, f"{directory}: {sorted(set(ours))}"


def test_prod_pins_its_image_by_digest_dev_may_use_a_tag() -> None:
    (prod,) = load_all(K8S / "overlays" / "prod" / "image" / "kustomization.yaml")[0]["images"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", prod.get("digest", "")), prod
    assert "newTag" not in prod, "a tag next to the digest says something the digest does not"
    for resources in (kustomize(schedule_dir("prod")), kustomize(train_dir("prod"))):
        for image in all_images(resources):
            assert "@sha256:" in image or image.startswith("registry.k8s.io/kubectl:"), image
    assert env_image("dev").endswith(":dev")


@pytest.mark.parametrize("env", ENVS)
def test_region_comes_from_the_namespaces_settings_only(env: str) -> None:
    settings = one(kustomize(schedule_dir(env)), "ConfigMap", "xfer-settings")["data"]
    assert re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", settings["AWS_REGION"]), settings
    for directory in (schedule_dir(env), train_dir(env)):
        resources = kustomize(directory)
        text = yaml.safe_dump(list(resources))
        if directory == schedule_dir(env):
            assert text.count("AWS_REGION") == 1, "AWS_REGION set somewhere but xfer-settings"
        else:
            assert "AWS_REGION" not in text, f"{directory}: AWS_REGION set in the RayJob"
        for where, spec in job_specs(resources):
            assert "runtimeEnvYAML" not in spec, f"{where}: KubeRay ignores it with our submitter"


# ------------------------------------------------------------ entrypoints, sizes


@pytest.mark.parametrize("env", ENVS)
def test_entrypoints_name_existing_scripts_and_valid_configs(env: str) -> None:
    specs = [*job_specs(kustomize(schedule_dir(env))), *job_specs(kustomize(train_dir(env)))]
    settings = settings_of(kustomize(schedule_dir(env)))
    commands = sorted(entrypoint_config(spec["entrypoint"], settings)[0] for _, spec in specs)
    assert commands == ["score", "score", "train"], commands


@pytest.mark.parametrize("env", ENVS)
def test_commands_carry_their_settings_in_the_config(env: str) -> None:
    """The nightly command is the config file and the bucket: the model, input and output
    are score.* keys, not flags written once per manifest; and no key it sets goes unread."""
    from xfer.configreads import unread_settings

    settings = settings_of(kustomize(schedule_dir(env)))
    specs = [*job_specs(kustomize(schedule_dir(env))), *job_specs(kustomize(train_dir(env)))]
    for where, spec in specs:
        command, args, cfg = entrypoint_config(spec["entrypoint"], settings)
        assert not unread_settings(cfg, command), f"{where}: {unread_settings(cfg, command)}"
        if command == "score":
            flags = (args.model, args.input, args.output)
            assert flags == (None, None, None), f"{where} repeats the config's score.*: {flags}"
            assert cfg.score.target(cfg.storage.root).model.startswith(f"s3://{BUCKET[env]}/")


@pytest.mark.parametrize("env", ENVS)
def test_everything_points_at_the_environments_bucket(env: str) -> None:
    """As the submitter runs it: its args expanded with the namespace's xfer-settings."""
    bucket = BUCKET[env]
    settings = settings_of(kustomize(schedule_dir(env)))
    assert settings["XFER_BUCKET"] == bucket
    for directory in (schedule_dir(env), train_dir(env)):
        resources = kustomize(directory)
        for where, spec in job_specs(resources):
            command, args, cfg = entrypoint_config(spec["entrypoint"], settings)
            words = [expand(w, settings) for w in shlex.split(spec["entrypoint"])]
            uris = [u for u in words if "s3://" in u]
            uris += [cfg.storage.root, cfg.model.weights, cfg.dataset_uri()]
            if command == "score":  # what it scores and writes: the config's, or flags
                night = cfg.score.target(cfg.storage.root, args.model, args.input, args.output)
                uris += [night.model, night.input, night.output]
                assert all(u.startswith("s3://") for u in uris[-3:]), f"{where}: {uris[-3:]}"
            for uri in (u[u.index("s3://") :] for u in uris if "s3://" in u):
                assert uri.startswith(f"s3://{bucket}/") or uri == f"s3://{bucket}", (
                    f"{env}: {where} uses {uri}, outside s3://{bucket}"
                )
        other = {"xfer-dev", "xfer-prod"} - {bucket}
        text = yaml.safe_dump(list(resources))
        assert not [b for b in other if b in text], f"{directory} names another bucket"


@pytest.mark.parametrize("env", ENVS)
def test_training_resources_match_its_config(env: str) -> None:
    job = one(kustomize(train_dir(env)), "RayJob", "xfer-train")
    _, _, cfg = entrypoint_config(job["spec"]["entrypoint"])
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu_groups = [
        g
        for g in groups
        if any(
            "nvidia.com/gpu" in c["resources"]["limits"]
            for c in g["template"]["spec"]["containers"]
        )
    ]
    assert bool(gpu_groups) == cfg.cluster.use_gpu, "GPU workers iff cluster.use_gpu"
    replicas = sum(g["replicas"] for g in gpu_groups)
    assert replicas == cfg.cluster.num_workers == TRAIN_WORKERS[env], (
        f"{env}: {replicas} GPU worker pods for cluster.num_workers={cfg.cluster.num_workers}"
    )
    assert job["spec"]["backoffLimit"] == 0, "a RayJob retry would restart training from scratch"
    for group in gpu_groups:
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"], (
            "MultiWorkerMirroredStrategy trains on a fixed set of workers: no autoscaling"
        )
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        c = cfg.cluster
        assert float(limits["nvidia.com/gpu"]) >= c.gpus_per_worker, f"{env}: GPUs per pod"
        assert float(limits["cpu"]) >= c.cpus_per_worker, f"{env}: cluster.cpus_per_worker"
        # Ray sees the memory limit as the node's memory; xfer asks Ray for this much.
        need = (c.memory_per_worker_gb or 0) * 2**30
        assert quantity(limits["memory"]) >= need, f"{env}: cluster.memory_per_worker_gb"


@pytest.mark.parametrize("env", ENVS)
def test_scoring_resources_match_its_config(env: str) -> None:
    for where, spec in job_specs(kustomize(schedule_dir(env))):
        command, _, cfg = entrypoint_config(spec["entrypoint"])
        assert command == "score", where
        gpus = cpus = 0.0
        for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
            (container,) = group["template"]["spec"]["containers"]
            limits = container["resources"]["limits"]
            gpus += group["replicas"] * float(limits.get("nvidia.com/gpu", 0))
            cpus += group["replicas"] * float(limits["cpu"])
        sc = cfg.score
        assert (gpus > 0) == sc.use_gpu, f"{where}: GPU workers iff score.use_gpu"
        if sc.use_gpu:
            assert gpus >= sc.num_actors * sc.gpus_per_actor, f"{where}: too few GPUs"
        assert cpus >= sc.num_actors * sc.cpus_per_actor, f"{where}: too few CPUs for the actors"


# ----------------------------------------------------------------- secrets, docs


@pytest.mark.parametrize("env", ENVS)
def test_overlay_binds_the_environments_iam_role(env: str) -> None:
    account = one(kustomize(schedule_dir(env)), "ServiceAccount", "xfer")
    arn = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(rf"arn:aws:iam::\d{{12}}:role/{BUCKET[env]}-jobs", arn), arn


@pytest.mark.parametrize("env", ENVS)
def test_no_secrets_in_manifests(env: str) -> None:
    for resources in (*schedules(env).values(), kustomize(train_dir(env))):
        nodes = [*resources, *(obj for _, obj in ray_objects(resources))]
        for r in nodes:
            assert not (r["kind"] == "Secret" and (r.get("data") or r.get("stringData"))), r
            for node in walk(r):
                assert not (node.get("name") in SECRET_ENV and "value" in node), (
                    f"{r['kind']}/{r['metadata'].get('name')}: literal {node['name']}"
                )
        settings = [r for r in resources if r["metadata"]["name"] == "xfer-settings"]
        for r in settings:
            assert not SECRET_ENV & set(r["data"]), "credentials in xfer-settings"


def test_no_aws_key_ids_anywhere() -> None:
    paths = [*K8S.rglob("*"), *(ROOT / "infra").rglob("*"), ROOT / "docs" / "runbook.md"]
    for path in (p for p in paths if p.is_file() and ".terraform" not in p.parts):
        assert not AWS_KEY_ID.search(path.read_text()), f"{path}: looks like an AWS key id"


def test_runbook_names_files_that_exist() -> None:
    """Every path the runbook names exists, or is one it has you create (and git ignores)."""
    text = (ROOT / "docs" / "runbook.md").read_text()
    paths = set(re.findall(r"(?<![\w/.-])((?:jobs|k8s|infra|docs|src)/[\w./-]*\w)", text))
    missing = sorted(p for p in paths if not (ROOT / p).exists() and not _git_ignored(p))
    assert paths and not missing, f"docs/runbook.md names missing files: {missing}"


def _git_ignored(path: str) -> bool:
    out = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
    return out.returncode == 0
