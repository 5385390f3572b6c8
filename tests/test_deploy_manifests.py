"""The deployment files: KubeRay manifests (kustomize), the job image, Terraform.

    .venv/bin/pytest -q tests/test_deploy_manifests.py

Fast and offline, and nothing outside this repository is read: the KubeRay CRDs are
vendored in k8s/crds/. A small kustomize renderer below (resources, namespace, images,
JSON6902 patches: what the overlays use) renders the base and both overlays, and every
RayJob and RayCronJob is checked against its CRD's schema with unknown fields
rejected, as `kubectl apply --validate=strict` would. Entrypoints are parsed by xfer's
own CLI parser and their configs loaded, so a manifest cannot name a missing script,
config or key, or ask for GPUs that its config does not use.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import jsonschema
import pytest
import yaml

from xfer.cli import build_parser
from xfer.config import XferConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRDS = K8S / "crds"
TERRAFORM = ROOT / "infra" / "terraform"
IMAGE = "xfer-job"
RENDERINGS = ("base", "dev", "prod")
BUCKET = {"base": "xfer-prod", "dev": "xfer-dev", "prod": "xfer-prod"}
NAMESPACE = {"base": "xfer", "dev": "xfer-dev", "prod": "xfer-prod"}
TRAIN_WORKERS = {"base": 4, "dev": 1, "prod": 4}
SECRET_ENV = {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"}
AWS_KEY_ID = re.compile(r"AKIA[0-9A-Z]{16}")
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB of YAML


@functools.cache
def load_all(path: Path) -> tuple[Any, ...]:
    with open(path) as f:
        return tuple(doc for doc in yaml.load_all(f, Loader=Loader) if doc is not None)


def manifest_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


# ------------------------------------------------------------------ kustomize


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_json6902(doc: dict[str, Any], op: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove, test), in place."""
    assert op["path"].startswith("/"), f"JSON pointer must start with '/': {op['path']!r}"
    *parents, last = [_unescape(t) for t in op["path"][1:].split("/")]
    node: Any = doc
    for token in parents:
        node = node[int(token)] if isinstance(node, list) else node[token]
    kind = op["op"]
    if kind not in ("add", "replace", "remove", "test"):
        raise ValueError(f"unsupported JSON6902 op {kind!r} (the renderer knows four)")
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if kind == "add":
            node.insert(index, op["value"])
        elif kind == "replace":
            node[index] = op["value"]
        elif kind == "remove":
            del node[index]
        else:
            assert node[index] == op["value"], f"test failed at {op['path']}"
        return
    if kind in ("replace", "remove", "test") and last not in node:
        raise KeyError(f"{kind} {op['path']}: no such field")
    if kind in ("add", "replace"):
        node[last] = op["value"]
    elif kind == "remove":
        del node[last]
    else:
        assert node[last] == op["value"], f"test failed at {op['path']}"


def _containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container, at any depth: kustomize's images transformer reaches CRDs too."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def _split_image(ref: str) -> tuple[str, str]:
    name, sep, tag = ref.rpartition(":")
    return (name, tag) if sep and "/" not in tag else (ref, "")


def render(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize directory`, for the features the overlays use."""
    kust = load_all(directory / "kustomization.yaml")[0]
    known = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
    assert set(kust) <= known, f"{directory}: unsupported kustomize fields {set(kust) - known}"
    resources: list[dict[str, Any]] = []
    for entry in kust.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources += render(path)
        else:
            # kustomize's load restrictor: files must be inside the kustomization.
            assert directory.resolve() in path.parents, f"{entry} is outside {directory}"
            resources += copy.deepcopy(list(load_all(path)))
    ids = [(r["kind"], r["metadata"]["name"]) for r in resources]
    assert len(ids) == len(set(ids)), f"{directory}: duplicate resources {ids}"
    for patch in kust.get("patches", []):
        target = patch["target"]
        assert set(target) <= {"kind", "name"}, f"unsupported patch target {target}"
        assert isinstance(patch["patch"], str), "kustomize wants `patch:` as a string"
        matched = [
            r
            for r in resources
            if r["kind"] == target["kind"] and r["metadata"]["name"] == target["name"]
        ]
        assert matched, f"{directory}: patch target {target} matches nothing"
        for resource in matched:
            for op in yaml.safe_load(patch["patch"]):
                apply_json6902(resource, op)
    if "namespace" in kust:
        for resource in resources:
            resource["metadata"]["namespace"] = kust["namespace"]
    for image in kust.get("images", []):
        for resource in resources:
            for container in _containers(resource):
                name, tag = _split_image(container["image"])
                if name == image["name"]:
                    tag = image.get("newTag", tag)
                    container["image"] = image.get("newName", name) + (f":{tag}" if tag else "")
    return resources


@functools.cache
def rendered(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(K8S / ("base" if name == "base" else f"overlays/{name}")))


def expected_image(name: str) -> str:
    if name == "base":
        return f"{IMAGE}:latest"
    (image,) = load_all(K8S / "overlays" / name / "kustomization.yaml")[0]["images"]
    return f"{image['newName']}:{image['newTag']}"


def one(resources: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    (found,) = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def ray_objects(resources: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    """RayJobs and RayCronJobs, including RayJob templates held in ConfigMaps."""
    out = [(f"{r['kind']}/{r['metadata']['name']}", r) for r in resources]
    for r in resources:
        for key, text in (r.get("data") or {}).items() if r["kind"] == "ConfigMap" else ():
            for doc in yaml.safe_load_all(text):
                out.append((f"ConfigMap/{r['metadata']['name']}[{key}]", doc))
    kinds = ("RayJob", "RayCronJob")
    return [(w, d) for w, d in out if isinstance(d, dict) and d.get("kind") in kinds]


def job_specs(resources: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    """Every RayJob spec: RayJobs, templates, and RayCronJobs' jobTemplates."""
    return [
        (where, obj["spec"]["jobTemplate"] if obj["kind"] == "RayCronJob" else obj["spec"])
        for where, obj in ray_objects(resources)
    ]


# ---------------------------------------------------------------- CRD schemas


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3 structural schema -> JSON Schema that rejects unknown fields."""
    s = dict(schema)
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
    if "properties" in s:
        s["properties"] = {k: _strict(v) for k, v in s["properties"].items()}
        if not s.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in s:
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _strict(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = _strict(s["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [_strict(x) for x in s[key]]
    return s


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft4Validator:
    group, _, version = api_version.partition("/")
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in load_all(path):
            if crd["spec"]["group"] != group or crd["spec"]["names"]["kind"] != kind:
                continue
            for v in crd["spec"]["versions"]:
                if v["name"] == version:
                    assert v["served"] and not v.get("deprecated"), f"{api_version} {kind}"
                    return jsonschema.Draft4Validator(_strict(v["schema"]["openAPIV3Schema"]))
    raise LookupError(f"no CRD in {CRDS} serves {kind} {api_version}")


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """What `kubectl apply --validate=strict` would refuse (CEL rules aside)."""
    validator = crd_validator(obj["apiVersion"], obj["kind"])
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in validator.iter_errors(obj)
    ]
    meta = obj.get("metadata") or {}
    if not (meta.get("name") or meta.get("generateName")):
        errors.append("metadata: needs name or generateName")
    unknown = set(meta) - {"name", "generateName", "namespace", "labels", "annotations"}
    if unknown:
        errors.append(f"metadata: unexpected fields {sorted(unknown)}")
    return sorted(errors)


# ------------------------------------------------------------------ helpers


def pod_templates(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    cluster = spec["rayClusterSpec"]
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def head_container(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def gpu_groups(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        g
        for g in spec["rayClusterSpec"].get("workerGroupSpecs", [])
        if any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in _containers(g))
    ]


def quantity(value: Any) -> float:
    """Kubernetes quantities used here: plain numbers, millicores, binary suffixes."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def entrypoint_config(entrypoint: str) -> tuple[str, Any, XferConfig]:
    """(subcommand, parsed args, loaded config) of `python /opt/xfer/jobs/<x>.py ...`."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and argv[1].startswith("/opt/xfer/"), entrypoint
    script = ROOT / argv[1].removeprefix("/opt/xfer/")
    assert script.is_file(), f"{argv[1]}: no {script.relative_to(ROOT)} in the repo"
    command = {"jobs/train.py": "train", "jobs/score.py": "score"}[str(script.relative_to(ROOT))]
    args = build_parser().parse_args([command, *argv[2:]])
    assert args.config and args.config.startswith("/opt/xfer/"), f"no --config in {entrypoint}"
    config = ROOT / args.config.removeprefix("/opt/xfer/")
    assert config.is_file(), f"{args.config}: no {config.relative_to(ROOT)} in the repo"
    return command, args, load_config(str(config), args.overrides)


def env_vars(spec: dict[str, Any]) -> dict[str, str]:
    return yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


# ----------------------------------------------------------------- manifests


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_parses_and_opens_with_its_command(path: Path) -> None:
    assert load_all(path), f"{path} holds no documents"
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path}: should open with a comment giving its command"


@pytest.mark.parametrize("name", RENDERINGS)
def test_kustomization_renders(name: str) -> None:
    kinds = sorted(r["kind"] for r in rendered(name))
    assert kinds.count("RayJob") == 1 and kinds.count("RayCronJob") == 1, kinds
    for r in rendered(name):
        assert r["metadata"].get("namespace") == NAMESPACE[name], (
            f"{name}: {r['kind']}/{r['metadata']['name']} is not in namespace {NAMESPACE[name]}"
        )


@pytest.mark.parametrize("name", RENDERINGS)
def test_ray_objects_validate_against_crds(name: str) -> None:
    objects = ray_objects(rendered(name))
    assert len(objects) == 3, f"expected a RayJob, a RayCronJob and a template: {objects}"
    for where, obj in objects:
        errors = schema_errors(obj)
        assert not errors, f"{name}: {where} fails its CRD schema: {errors}"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda spec: spec.update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish"),
        (
            lambda spec: spec["rayClusterSpec"]["workerGroupSpecs"][0].update(replica=4),
            "replica",
        ),
        (lambda spec: head_container(spec).update(resource={}), "resource"),
        (lambda spec: spec.update(backoffLimit="0"), "is not of type"),
        (lambda spec: spec["rayClusterSpec"]["authOptions"].update(mode="tokens"), "tokens"),
    ],
    ids=["misspelt-top-level", "misspelt-worker-group", "misspelt-container", "type", "enum"],
)
def test_validator_rejects_what_kubectl_would(mutate: Any, expected: str) -> None:
    job = copy.deepcopy(one(rendered("base"), "RayJob", "xfer-train"))
    mutate(job["spec"])
    errors = schema_errors(job)
    assert any(expected in e for e in errors), f"not rejected; errors: {errors}"


def test_validator_needs_a_name() -> None:
    job = copy.deepcopy(one(rendered("base"), "RayJob", "xfer-train"))
    del job["metadata"]["name"]
    assert "metadata: needs name or generateName" in schema_errors(job)


@pytest.mark.parametrize("name", RENDERINGS)
def test_entrypoints_name_existing_scripts_and_valid_configs(name: str) -> None:
    specs = job_specs(rendered(name))
    commands = sorted(entrypoint_config(spec["entrypoint"])[0] for _, spec in specs)
    assert commands == ["score", "score", "train"], commands


@pytest.mark.parametrize("name", RENDERINGS)
def test_everything_points_at_the_environments_bucket(name: str) -> None:
    bucket = BUCKET[name]
    for where, spec in job_specs(rendered(name)):
        _, _, cfg = entrypoint_config(spec["entrypoint"])
        uris = [u for u in shlex.split(spec["entrypoint"]) if "s3://" in u]
        uris += [cfg.storage.root, cfg.model.weights, cfg.dataset_uri()]
        for uri in (u[u.index("s3://") :] for u in uris if "s3://" in u):
            assert uri.startswith(f"s3://{bucket}/") or uri == f"s3://{bucket}", (
                f"{name}: {where} uses {uri}, outside s3://{bucket}"
            )
    other = {"xfer-dev", "xfer-prod"} - {bucket}
    text = yaml.safe_dump(list(rendered(name)))
    assert not [b for b in other if b in text], f"{name} mentions another environment's bucket"


@pytest.mark.parametrize("name", RENDERINGS)
def test_training_resources_match_its_config(name: str) -> None:
    job = one(rendered(name), "RayJob", "xfer-train")
    _, _, cfg = entrypoint_config(job["spec"]["entrypoint"])
    groups = gpu_groups(job["spec"])
    assert bool(groups) == cfg.cluster.use_gpu, "GPU workers iff cluster.use_gpu"
    replicas = sum(g["replicas"] for g in groups)
    assert replicas == cfg.cluster.num_workers == TRAIN_WORKERS[name], (
        f"{name}: {replicas} GPU worker pods for cluster.num_workers={cfg.cluster.num_workers}"
    )
    for group in groups:
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"], (
            "MultiWorkerMirroredStrategy trains on a fixed set of workers: no autoscaling"
        )
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        c = cfg.cluster
        assert quantity(limits["nvidia.com/gpu"]) >= c.gpus_per_worker, f"{name}: GPUs per pod"
        assert quantity(limits["cpu"]) >= c.cpus_per_worker, f"{name}: cluster.cpus_per_worker"
        # Ray sees the memory limit as the node's memory; xfer asks Ray for this much.
        need = (c.memory_per_worker_gb or 0) * 2**30
        assert quantity(limits["memory"]) >= need, f"{name}: cluster.memory_per_worker_gb"


@pytest.mark.parametrize("name", RENDERINGS)
def test_scoring_resources_match_its_config(name: str) -> None:
    for where, spec in job_specs(rendered(name)):
        command, _, cfg = entrypoint_config(spec["entrypoint"])
        if command != "score":
            continue
        groups = gpu_groups(spec)
        assert bool(groups) == cfg.score.use_gpu, f"{where}: GPU workers iff score.use_gpu"
        gpus = cpus = 0.0
        for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
            (container,) = group["template"]["spec"]["containers"]
            limits = container["resources"]["limits"]
            gpus += group["replicas"] * quantity(limits.get("nvidia.com/gpu", 0))
            cpus += group["replicas"] * quantity(limits["cpu"])
        sc = cfg.score
        if sc.use_gpu:
            assert gpus >= sc.num_actors * sc.gpus_per_actor, f"{where}: too few GPUs"
        assert cpus >= sc.num_actors * sc.cpus_per_actor, f"{where}: too few CPUs for the actors"


@pytest.mark.parametrize("name", RENDERINGS)
def test_pods_are_set_up_alike(name: str) -> None:
    (ray_pin,) = [p for p in lock_pins() if p[0] == "ray"]
    for where, spec in job_specs(rendered(name)):
        assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: tear the cluster down"
        for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds"):
            assert spec.get(key, 0) > 0, f"{where}: {key}"
        assert "backoffLimit" in spec, f"{where}: backoffLimit"
        assert spec["rayClusterSpec"]["rayVersion"] == ray_pin[1], (
            f"{where}: rayVersion must be the image's ray ({ray_pin[1]})"
        )
        assert env_vars(spec).get("TF_USE_LEGACY_KERAS") == "1", where
        assert env_vars(spec).get("AWS_REGION"), where
        auth = spec["rayClusterSpec"].get("authOptions", {})
        assert auth.get("mode") == "token" and auth.get("secretName"), f"{where}: token auth"
        for group, template in pod_templates(spec):
            pod = template["spec"]
            assert pod.get("serviceAccountName") == "xfer", f"{where} {group}: IRSA account"
            (container,) = pod["containers"]
            assert container["image"] == expected_image(name), f"{where} {group}"
            res = container["resources"]
            for kind in ("cpu", "memory"):
                assert res["requests"][kind] == res["limits"][kind], f"{where} {group}: {kind}"
            gpu = "nvidia.com/gpu" in res["limits"]
            assert gpu == (group != "head"), f"{where} {group}: GPUs on workers only"
            tolerated = {t.get("key") for t in pod.get("tolerations", [])}
            assert not gpu or "nvidia.com/gpu" in tolerated, f"{where} {group}: GPU taint"


@pytest.mark.parametrize("name", RENDERINGS)
def test_exactly_one_nightly_scheduler_and_both_run_the_same_job(name: str) -> None:
    resources = rendered(name)
    ray_cron = one(resources, "RayCronJob", "xfer-nightly-score")
    cron = one(resources, "CronJob", "xfer-nightly-score")
    active = [r["kind"] for r in (ray_cron, cron) if not r["spec"].get("suspend")]
    assert len(active) == 1, f"{name}: active nightly schedulers {active}: one night, one run"
    for r in (ray_cron, cron):
        assert r["spec"]["schedule"] == "0 2 * * *" and r["spec"]["timeZone"] == "Etc/UTC"
    template = one(resources, "ConfigMap", "xfer-nightly-score-rayjob")
    rayjob = yaml.safe_load(template["data"]["rayjob.yaml"])
    assert rayjob["spec"] == ray_cron["spec"]["jobTemplate"], (
        f"{name}: the CronJob's RayJob template drifted from the RayCronJob's jobTemplate"
    )
    meta = rayjob["metadata"]
    assert "name" not in meta and meta["generateName"] == "xfer-nightly-score-"


def test_fallback_cronjob_runs_kubectl_create_with_narrow_rights() -> None:
    resources = rendered("base")
    spec = one(resources, "CronJob", "xfer-nightly-score")["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["kubectl", "create", "-f", "/templates/rayjob.yaml"]
    image, tag = _split_image(container["image"])
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
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "xfer-scheduler"}]


@pytest.mark.parametrize("name", ("dev", "prod"))
def test_overlay_binds_the_environments_iam_role(name: str) -> None:
    account = one(rendered(name), "ServiceAccount", "xfer")
    arn = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(rf"arn:aws:iam::\d{{12}}:role/{BUCKET[name]}-jobs", arn), arn


@pytest.mark.parametrize("name", RENDERINGS)
def test_no_secrets_in_manifests(name: str) -> None:
    resources = rendered(name)
    for r in resources:
        assert not (r["kind"] == "Secret" and (r.get("data") or r.get("stringData"))), r
        for node in walk(r):
            assert not (node.get("name") in SECRET_ENV and "value" in node), (
                f"{r['kind']}/{r['metadata']['name']}: literal {node['name']}"
            )
    for where, spec in job_specs(resources):
        assert not SECRET_ENV & set(env_vars(spec)), f"{where}: credentials in the runtime env"


def test_no_aws_key_ids_anywhere() -> None:
    paths = [*manifest_files(), *(ROOT / "infra").rglob("*"), ROOT / "docs" / "runbook.md"]
    for path in (p for p in paths if p.is_file()):
        assert not AWS_KEY_ID.search(path.read_text()), f"{path}: looks like an AWS key id"


# ---------------------------------------------------------------- Terraform


def _clean(node: Any) -> Any:
    """python-hcl2's output without its quoting and bookkeeping keys."""
    if isinstance(node, dict):
        skip = ("__is_block__", "__comments__")
        return {_clean(k): _clean(v) for k, v in node.items() if k not in skip}
    if isinstance(node, list):
        return [_clean(x) for x in node]
    if isinstance(node, str) and len(node) >= 2 and node[0] == node[-1] == '"':
        return node[1:-1]
    return node


@functools.cache
def terraform() -> dict[str, list[Any]]:
    merged: dict[str, list[Any]] = {}
    for path in sorted(TERRAFORM.glob("*.tf")):
        with open(path) as f:
            for key, blocks in _clean(hcl2.load(f)).items():
                merged.setdefault(key, []).extend(blocks)
    return merged


def tf_blocks(section: str, type_: str) -> dict[str, Any]:
    return {n: b for block in terraform().get(section, []) for n, b in block.get(type_, {}).items()}


def policy_statements() -> list[dict[str, Any]]:
    statements = []
    for doc in tf_blocks("data", "aws_iam_policy_document").values():
        statements += doc.get("statement", [])
        for dynamic in doc.get("dynamic", []):
            statements += dynamic["statement"]["content"]
    return statements


def test_terraform_files_parse_and_open_with_their_command() -> None:
    expected = {"versions.tf", "variables.tf", "main.tf", "iam.tf", "outputs.tf"}
    assert expected <= {p.name for p in TERRAFORM.glob("*.tf")}
    for path in TERRAFORM.glob("*.tf"):
        assert path.read_text().startswith("#"), f"{path}: should open with its command"
    assert terraform()["resource"], "no resources parsed"


def test_bucket_is_private_versioned_encrypted_and_cleans_tmp() -> None:
    def one_resource(type_: str) -> dict[str, Any]:
        (block,) = tf_blocks("resource", type_).values()
        return block

    one_resource("aws_s3_bucket")
    versioning = one_resource("aws_s3_bucket_versioning")
    assert versioning["versioning_configuration"][0]["status"] == "Enabled"
    (rule,) = one_resource("aws_s3_bucket_server_side_encryption_configuration")["rule"]
    assert rule["apply_server_side_encryption_by_default"][0]["sse_algorithm"]
    block = one_resource("aws_s3_bucket_public_access_block")
    for key in ("block_public_acls", "block_public_policy", "ignore_public_acls"):
        assert block[key] is True, key
    assert block["restrict_public_buckets"] is True
    ownership = one_resource("aws_s3_bucket_ownership_controls")
    assert ownership["rule"][0]["object_ownership"] == "BucketOwnerEnforced"
    rules = one_resource("aws_s3_bucket_lifecycle_configuration")["rule"]
    tmp = [r for r in rules if r["filter"][0].get("prefix") == "_tmp/"]
    assert tmp and tmp[0]["status"] == "Enabled" and tmp[0]["expiration"], "expire _tmp/"
    assert any(r.get("abort_incomplete_multipart_upload") for r in rules), "abort multipart"


def test_iam_is_least_privilege() -> None:
    statements = policy_statements()
    assert statements, "no aws_iam_policy_document statements found"
    for s in statements:
        where = s.get("sid", s)
        actions = s.get("actions", [])
        assert "not_actions" not in s and "not_resources" not in s, where
        assert not [a for a in actions if a == "*" or a.endswith(":*")], f"{where}: {actions}"
        resources = s.get("resources", [])
        assert isinstance(resources, list) and "*" not in resources, f"{where}: {resources}"
        if "s3:ListBucket" in actions:
            conditions = {c["variable"] for c in s.get("condition", [])}
            assert conditions == {"s3:prefix"}, f"{where}: ListBucket must be prefix-bound"
    by_sid = {s.get("sid"): s for s in statements}
    writes = [r.rsplit("/", 2)[-2] for r in by_sid["WriteJobOutputs"]["resources"]]
    assert sorted(writes) == ["_tmp", "features", "models", "predictions", "runs"], writes
    reads = {r.split("}/", 1)[1] for r in by_sid["ReadJobObjects"]["resources"]}
    for prefix in ("datasets", "weights", "runs", "models", "predictions", "_tmp"):
        assert f"{prefix}/*" in reads, f"jobs must read {prefix}/"


def test_role_trusts_only_the_service_account() -> None:
    (trust,) = tf_blocks("data", "aws_iam_policy_document")["trust"]["statement"]
    assert trust["actions"] == ["sts:AssumeRoleWithWebIdentity"]
    assert trust["principals"][0]["type"] == "Federated"
    conditions = {c["variable"].rsplit(":", 1)[-1]: c for c in trust["condition"]}
    assert set(conditions) == {"sub", "aud"}
    assert {c["test"] for c in conditions.values()} == {"StringEquals"}
    assert conditions["aud"]["values"] == ["sts.amazonaws.com"]
    assert "system:serviceaccount:" in conditions["sub"]["values"][0]


def test_terraform_variables_and_outputs() -> None:
    variables = {n: v for block in terraform()["variable"] for n, v in block.items()}
    for name, var in variables.items():
        assert var.get("description") and var.get("type"), f"variable {name}: description, type"
    outputs = {n for block in terraform()["output"] for n in block}
    assert {"bucket_name", "bucket_arn", "role_arn", "policy_arn"} <= outputs, outputs


# ------------------------------------------------------------------ the image


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
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"runs as {users}"
    (base,) = [arg for op, arg in instructions if op == "FROM"]
    assert base.strip() == f"tensorflow/tensorflow:{dict(lock_pins())['tensorflow']}-gpu"
    assert re.search(r"^ENV TF_USE_LEGACY_KERAS=1\b", text, re.M), "TF_USE_LEGACY_KERAS=1"
    assert re.search(r"pip install .*-r \S*requirements\.lock", text), "install the lock"
    assert "COPY infra/requirements.lock" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored), "keep .git and .venv out of the context"


def test_runbook_names_files_that_exist() -> None:
    text = (ROOT / "docs" / "runbook.md").read_text()
    paths = set(re.findall(r"(?<![\w/.-])((?:jobs|k8s|infra|docs|src)/[\w./-]*\w)", text))
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert paths and not missing, f"docs/runbook.md names missing files: {missing}"
