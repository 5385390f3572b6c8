"""One place each for bucket, region and account, per environment; runbook sections cited.

    .venv/bin/pytest -q tests/test_k8s_settings.py

k8s/overlays/<env>/settings/xfer-settings.yaml names the environment's bucket, region,
AWS account and IAM role; the pods load it, the jobs' commands use $(XFER_BUCKET)
(expanded by Kubernetes in the submitter's args, as tests/deploy.py's expand() does),
and Terraform reads the same file (tests/test_terraform.py). Renaming is changing that
one file: a copy of k8s/ with only it changed must render with none of the old values.
"""

from __future__ import annotations

import filecmp
import re
import shlex
from pathlib import Path

import pytest
import yaml

from .deploy import (
    CREDENTIALS,
    ENVS,
    K8S,
    ROOT,
    entrypoint_config,
    env_image,
    expand,
    job_specs,
    kustomize,
    one,
    schedule_dir,
    settings_of,
    settings_path,
    train_dir,
    variant,
)

OLD = {"bucket": "xfer-{env}", "region": "us-east-1", "account": "123456789012"}
NEW = {
    "XFER_BUCKET": "acme-ml-{env}-2",
    "AWS_REGION": "eu-west-3",
    "XFER_AWS_ACCOUNT": "210987654321",
}
VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def renamed(env: str) -> tuple[tuple[str, str], ...]:
    return tuple((key, value.format(env=env)) for key, value in NEW.items())


def changed_files(left: Path, right: Path) -> list[str]:
    """Files that differ between two directory trees (added, removed or changed)."""
    cmp = filecmp.dircmp(left, right, ignore=["crds"])
    found = [*cmp.left_only, *cmp.right_only, *cmp.diff_files, *cmp.funny_files]
    for name, sub in cmp.subdirs.items():
        found += [f"{name}/{f}" for f in changed_files(Path(sub.left), Path(sub.right))]
    return found


@pytest.mark.parametrize("mode", CREDENTIALS)
@pytest.mark.parametrize("scheduler", ["raycronjob", "cronjob"])
@pytest.mark.parametrize("env", ENVS)
def test_renaming_bucket_region_and_account_is_one_edit(env: str, scheduler: str, mode: str):
    base = variant(env, scheduler, credentials=mode)
    root = variant(env, scheduler, credentials=mode, settings=renamed(env))
    path = settings_path(env, root).relative_to(root)
    assert changed_files(base, root) == [str(path)], "the rename took more than one file"
    settings = settings_of(kustomize(schedule_dir(env, root)))
    new = dict(renamed(env))
    assert {k: settings[k] for k in new} == new
    bucket = new["XFER_BUCKET"]
    for directory in (schedule_dir(env, root), train_dir(env, root)):
        resources = kustomize(directory)
        specs = job_specs(resources)
        assert specs, directory
        for where, spec in specs:
            command, args, cfg = entrypoint_config(spec["entrypoint"], settings)
            words = [expand(w, settings) for w in shlex.split(spec["entrypoint"])]
            uris = [w[w.index("s3://") :] for w in words if "s3://" in w]
            uris += [
                u for u in (cfg.storage.root, cfg.model.weights, cfg.dataset_uri()) if "://" in u
            ]
            if command == "score":
                night = cfg.score.target(cfg.storage.root, args.model, args.input, args.output)
                uris += [night.model, night.input, night.output]
            outside = [u for u in uris if not (u + "/").startswith(f"s3://{bucket}/")]
            assert not outside, f"{where}: {outside} after renaming the bucket to {bucket}"
        # The image is a setting of its own (image/kustomization.yaml: its registry may
        # be another account's or region's); everything else must have moved.
        text = yaml.safe_dump(list(resources)).replace(env_image(env), "<image>")
        for what, old in OLD.items():
            stale = f"s3://{old.format(env=env)}" if what == "bucket" else old
            assert stale not in text, f"{directory}: still names the old {what} {stale}"


@pytest.mark.parametrize("env", ENVS)
def test_every_reference_in_a_command_is_a_setting_its_container_loads(env: str) -> None:
    """Kubernetes leaves $(NAME) as written when the container has no NAME: check both."""
    settings = settings_of(kustomize(schedule_dir(env)))
    for directory in (schedule_dir(env), train_dir(env)):
        for where, spec in job_specs(kustomize(directory)):
            (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"]
            names = {n for word in submitter["args"] for n in VARIABLE.findall(word)}
            assert names, f"{where}: the bucket should come from the settings"
            assert names <= set(settings), f"{where}: {sorted(names - set(settings))}"
            refs = [e["configMapRef"]["name"] for e in submitter.get("envFrom", [])]
            assert "xfer-settings" in refs, f"{where}: the submitter does not load xfer-settings"


@pytest.mark.parametrize("env", ENVS)
def test_the_settings_are_named_once_in_k8s(env: str) -> None:
    """No k8s/ file but the settings spells the bucket as a URI or the account or region."""
    settings = yaml.safe_load(settings_path(env).read_text())["data"]
    values = [f"s3://{settings['XFER_BUCKET']}", f":{settings['XFER_AWS_ACCOUNT']}:"]
    for path in K8S.rglob("*.yaml"):
        if "crds" in path.parts or path == settings_path(env):
            continue
        text = path.read_text()
        for value in values:
            assert value not in text, f"{path.relative_to(ROOT)} names {value}"
    rendered = kustomize(schedule_dir(env))
    assert one(rendered, "ConfigMap", "xfer-settings")["data"] == settings


def test_jobs_runtime_env_pins_no_region_or_bucket() -> None:
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    pinned = set(env.get("env_vars", {})) & {"AWS_REGION", "AWS_DEFAULT_REGION", "XFER_BUCKET"}
    assert not pinned, f"jobs/runtime_env.yaml pins {pinned} for every submitted job"


# ---------------------------------------------------------- runbook sections cited


def runbook_headings() -> set[str]:
    text = (ROOT / "docs" / "runbook.md").read_text()
    return {m.group(1).strip() for m in re.finditer(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def cited_sections(path: Path) -> list[str]:
    """Sections cited as (docs/runbook.md, "Heading"), across wrapped comment lines."""
    lines = [ln.strip().lstrip("#").strip() for ln in path.read_text().splitlines()]
    text = " ".join(lines)
    return re.findall(r'docs/runbook\.md,\s+"([^"]+)"', text)


def test_k8s_comments_cite_runbook_sections_that_exist() -> None:
    headings = runbook_headings()
    paths = [p for p in K8S.rglob("*") if p.is_file() and "crds" not in p.parts]
    cited = {(str(p.relative_to(ROOT)), s) for p in paths for s in cited_sections(p)}
    assert cited, "no k8s/ file cites a runbook section"
    missing = sorted((p, s) for p, s in cited if s not in headings)
    assert not missing, f"k8s/ cites runbook sections that do not exist: {missing}"
