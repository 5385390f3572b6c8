"""The deployment files as the deploy tests read them (test_k8s_*.py, test_terraform.py).

Kustomizations are rendered by `kubectl kustomize`, the renderer `kubectl apply -k` uses.
KubeRay objects are checked against the CRDs vendored in k8s/crds/, with unknown fields
rejected as `kubectl apply --validate=strict` would; RayJob templates held in ConfigMaps
(the nightly RayJob) are checked as RayJobs too. Nothing outside the repository is read.
"""

from __future__ import annotations

import atexit
import functools
import json
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from xfer.cli import build_parser
from xfer.config import XferConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRDS = K8S / "crds"
TERRAFORM = ROOT / "infra" / "terraform"
ENVS = ("dev", "prod")
IMAGE = "xfer-job"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB of YAML

Resources = tuple[dict[str, Any], ...]


@functools.cache
def load_all(path: Path) -> tuple[Any, ...]:
    with open(path) as f:
        return tuple(doc for doc in yaml.load_all(f, Loader=Loader) if doc is not None)


def kustomizations() -> list[Path]:
    """Every kustomization directory under k8s/ that renders on its own (no Components)."""
    dirs = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        if load_all(path)[0].get("kind", "Kustomization") == "Kustomization":
            dirs.append(path.parent)
    return dirs


def schedule_dir(env: str, root: Path = K8S) -> Path:
    return root / "overlays" / env


def train_dir(env: str, root: Path = K8S) -> Path:
    return root / "overlays" / env / "train"


@functools.cache
def kustomize(directory: Path) -> Resources:
    """`kubectl kustomize directory`, parsed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed to render k8s/ (`kubectl kustomize`); install it")
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc is not None)


RAYCRONJOB_LINE = "  - ../../schedulers/raycronjob\n"
CRONJOB_LINE = "  # - ../../schedulers/cronjob\n"
CREDENTIALS = ("irsa", "static-keys")
CREDENTIALS_LINE = "  - ../../../components/credentials/{}\n"
SETTINGS = Path("settings") / "xfer-settings.yaml"


def settings_path(env: str, root: Path = K8S) -> Path:
    """The environment's settings: bucket, region, account, role (for k8s and Terraform)."""
    return schedule_dir(env, root) / SETTINGS


def _swap_line(path: Path, active: str, inactive: str) -> None:
    """Comment out the line ``active`` and uncomment ``inactive`` (both list entries)."""
    text = path.read_text()
    off = inactive.replace("  - ", "  # - ", 1)
    assert text.count(active) == 1 and text.count(off) == 1, (path, active, inactive)
    text = text.replace(active, active.replace("  - ", "  # - ", 1))
    path.write_text(text.replace(off, inactive))


@functools.cache
def variant(
    env: str,
    scheduler: str = "raycronjob",
    image: str | None = None,
    credentials: str = "irsa",
    settings: tuple[tuple[str, str], ...] = (),
) -> Path:
    """A copy of k8s/ with documented edits made, as an operator would make them.

    variant(env, "cronjob") swaps the scheduler lines of the env's overlay (docs/runbook.md,
    "Switch the nightly scheduler"); variant(env, image="<name>@<digest>") names another
    image in the env's image component; variant(env, credentials="static-keys") swaps the
    credentials lines of the env's settings component; variant(env, settings=((key,
    value), ...)) changes values in the env's settings/xfer-settings.yaml, line by line.
    Returns the copy's k8s/ directory.
    """
    root = Path(tempfile.mkdtemp(prefix=f"xfer-k8s-{env}-")) / "k8s"
    atexit.register(shutil.rmtree, root.parent, True)
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("crds"))
    if scheduler == "cronjob":
        path = schedule_dir(env, root) / "kustomization.yaml"
        _swap_line(path, RAYCRONJOB_LINE, CRONJOB_LINE.replace("  # - ", "  - "))
    if credentials != "irsa":
        path = schedule_dir(env, root) / "settings" / "kustomization.yaml"
        _swap_line(path, CREDENTIALS_LINE.format("irsa"), CREDENTIALS_LINE.format(credentials))
    if settings:
        path = settings_path(env, root)
        lines = path.read_text().splitlines(keepends=True)
        for key, value in settings:
            (i,) = [i for i, ln in enumerate(lines) if ln.startswith(f"  {key}: ")]
            lines[i] = f"  {key}: {json.dumps(value)}\n"
        path.write_text("".join(lines))
    if image is not None:
        path = root / "overlays" / env / "image" / "kustomization.yaml"
        component = yaml.safe_load(path.read_text())
        name, _, digest = image.partition("@")
        component["images"] = [{"name": IMAGE, "newName": name, "digest": digest}]
        path.write_text(yaml.safe_dump(component))
    return root


def schedules(env: str) -> dict[str, Resources]:
    """The env's schedule rendered with each scheduler: as shipped, and switched."""
    return {
        "raycronjob": kustomize(schedule_dir(env)),
        "cronjob": kustomize(schedule_dir(env, variant(env, "cronjob"))),
    }


def renderings() -> list[str]:
    """Names of everything that makes pods, for rendering(): schedules (either scheduler)
    and training runs, with either credentials mode ("+static-keys"; IRSA by default)."""
    names = []
    for env in ENVS:
        for mode in CREDENTIALS:
            suffix = "" if mode == "irsa" else f"+{mode}"
            names += [f"{env}{suffix}", f"{env}+cronjob{suffix}", f"{env}/train{suffix}"]
    return names


def rendering(name: str) -> Resources:
    """`kubectl kustomize` of a rendering named by renderings(), e.g. prod+cronjob."""
    first, *options = name.split("+")
    env, _, train = first.partition("/")
    scheduler = "cronjob" if "cronjob" in options else "raycronjob"
    mode = "static-keys" if "static-keys" in options else "irsa"
    shipped = (scheduler, mode) == ("raycronjob", "irsa")
    root = K8S if shipped else variant(env, scheduler, credentials=mode)
    return kustomize(train_dir(env, root) if train else schedule_dir(env, root))


def one(resources: Resources, kind: str, name: str) -> dict[str, Any]:
    (found,) = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def ray_objects(resources: Resources) -> list[tuple[str, dict[str, Any]]]:
    """RayJobs and RayCronJobs, including RayJob templates held in ConfigMaps."""
    out = [(f"{r['kind']}/{r['metadata']['name']}", r) for r in resources]
    for r in resources:
        for key, text in (r.get("data") or {}).items() if r["kind"] == "ConfigMap" else ():
            for doc in yaml.safe_load_all(text):
                out.append((f"ConfigMap/{r['metadata']['name']}[{key}]", doc))
    kinds = ("RayJob", "RayCronJob")
    return [(w, d) for w, d in out if isinstance(d, dict) and d.get("kind") in kinds]


def job_specs(resources: Resources) -> list[tuple[str, dict[str, Any]]]:
    """Every RayJob spec: RayJobs, templates, and RayCronJobs' jobTemplates."""
    return [
        (where, obj["spec"]["jobTemplate"] if obj["kind"] == "RayCronJob" else obj["spec"])
        for where, obj in ray_objects(resources)
    ]


def ray_pods(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group, pod spec) of the Ray head and every worker group of a RayJob spec."""
    cluster = spec["rayClusterSpec"]
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def pod_specs(resources: Resources) -> list[tuple[str, dict[str, Any]]]:
    """Every pod these resources make: Ray heads and workers, RayJob submitters, CronJobs."""
    pods = []
    for where, spec in job_specs(resources):
        pods += [(f"{where} {group}", pod) for group, pod in ray_pods(spec)]
        submitter = spec.get("submitterPodTemplate")
        pods.append((f"{where} submitter", (submitter or {}).get("spec")))
    for r in resources:
        if r["kind"] == "CronJob":
            template = r["spec"]["jobTemplate"]["spec"]["template"]
            pods.append((f"CronJob/{r['metadata']['name']}", template["spec"]))
    return pods


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def all_images(resources: Resources) -> list[str]:
    """Every container image, in resources and in RayJob templates held in ConfigMaps."""
    nodes = [*resources, *(obj for _, obj in ray_objects(resources))]
    return [n["image"] for node in nodes for n in walk(node) if "image" in n and "name" in n]


def quantity(value: Any) -> float:
    """Kubernetes quantities used here: plain numbers, millicores, binary suffixes."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def env_image(env: str) -> str:
    (image,) = load_all(K8S / "overlays" / env / "image" / "kustomization.yaml")[0]["images"]
    assert image["name"] == IMAGE
    if "digest" in image:
        return f"{image['newName']}@{image['digest']}"
    return f"{image['newName']}:{image['newTag']}"


def settings_of(resources: Resources) -> dict[str, str]:
    """The data of the xfer-settings ConfigMap these resources hold."""
    return dict(one(resources, "ConfigMap", "xfer-settings")["data"])


_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of a container's command and args: $(NAME) becomes the
    variable's value when the container has it, and stays as written when not; $$ is $."""

    def value(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _REFERENCE.sub(value, text)


def entrypoint_config(
    entrypoint: str, env: dict[str, str] | None = None
) -> tuple[str, Any, XferConfig]:
    """(subcommand, parsed args, loaded config) of `python /opt/xfer/jobs/<x>.py ...`, its
    words expanded as Kubernetes expands the submitter's args with ``env`` (its settings)."""
    argv = [expand(word, env or {}) for word in shlex.split(entrypoint)]
    assert argv[0] == "python" and argv[1].startswith("/opt/xfer/"), entrypoint
    script = ROOT / argv[1].removeprefix("/opt/xfer/")
    assert script.is_file(), f"{argv[1]}: no {script.relative_to(ROOT)} in the repo"
    command = {"jobs/train.py": "train", "jobs/score.py": "score"}[str(script.relative_to(ROOT))]
    args = build_parser().parse_args([command, *argv[2:]])
    assert args.config and args.config.startswith("/opt/xfer/"), f"no --config in {entrypoint}"
    config = ROOT / args.config.removeprefix("/opt/xfer/")
    assert config.is_file(), f"{args.config}: no {config.relative_to(ROOT)} in the repo"
    return command, args, load_config(str(config), args.overrides)


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
