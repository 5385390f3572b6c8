"""Terraform (infra/terraform): the xfer module, and one root with its own state per env.

    .venv/bin/pytest -q tests/test_terraform.py

Offline: `terraform fmt -check` and `terraform console` (each environment's settings.tf
read against a renamed settings file) when terraform is installed, and the HCL parsed
with python-hcl2 for the rest (the bucket, the least-privilege role, each environment's
state key, names, and bucket, region and account from its k8s settings).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest

from .deploy import (
    ENVS,
    ROOT,
    TERRAFORM,
    kustomize,
    one,
    schedule_dir,
    settings_of,
    settings_path,
    variant,
)

MODULE = TERRAFORM / "modules" / "xfer"


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


def parse(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return _clean(hcl2.load(f))


@functools.cache
def terraform(directory: Path) -> dict[str, list[Any]]:
    """Every .tf file of one module or root, merged by top-level block type."""
    merged: dict[str, list[Any]] = {}
    for path in sorted(directory.glob("*.tf")):
        for key, blocks in parse(path).items():
            merged.setdefault(key, []).extend(blocks)
    return merged


def tf_blocks(directory: Path, section: str, type_: str) -> dict[str, Any]:
    return {
        n: b
        for block in terraform(directory).get(section, [])
        for n, b in block.get(type_, {}).items()
    }


def env_root(env: str) -> Path:
    return TERRAFORM / "envs" / env


def policy_statements() -> list[dict[str, Any]]:
    statements = []
    for doc in tf_blocks(MODULE, "data", "aws_iam_policy_document").values():
        statements += doc.get("statement", [])
        for dynamic in doc.get("dynamic", []):
            statements += dynamic["statement"]["content"]
    return statements


# ------------------------------------------------------------------ format


def test_terraform_fmt_check() -> None:
    terraform_bin = shutil.which("terraform")
    if terraform_bin is None:
        pytest.skip("terraform is not installed: `terraform fmt -check` not run (CI runs it)")
    out = subprocess.run(
        [terraform_bin, "fmt", "-check", "-recursive", "-diff", str(TERRAFORM)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, f"terraform fmt -recursive infra/terraform wants:\n{out.stdout}"


@pytest.mark.parametrize("directory", [MODULE, *(env_root(e) for e in ENVS)], ids=lambda p: p.name)
def test_terraform_files_parse_and_open_with_their_command(directory: Path) -> None:
    paths = sorted(directory.glob("*.tf"))
    assert {p.name for p in paths} >= {"main.tf", "variables.tf", "outputs.tf"}
    for path in paths:
        assert path.read_text().startswith("#"), f"{path}: should open with its command"
    assert terraform(directory), f"{directory}: nothing parsed"


# ------------------------------------------------------------------ the module


def test_module_configures_no_provider_and_no_backend() -> None:
    assert "provider" not in terraform(MODULE), "the environments configure the provider"
    for block in terraform(MODULE).get("terraform", []):
        assert "backend" not in block, "a module with a backend would share one state"


def test_bucket_is_private_versioned_encrypted_and_cleans_tmp() -> None:
    def one_resource(type_: str) -> dict[str, Any]:
        (block,) = tf_blocks(MODULE, "resource", type_).values()
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
    (trust,) = tf_blocks(MODULE, "data", "aws_iam_policy_document")["trust"]["statement"]
    assert trust["actions"] == ["sts:AssumeRoleWithWebIdentity"]
    assert trust["principals"][0]["type"] == "Federated"
    conditions = {c["variable"].rsplit(":", 1)[-1]: c for c in trust["condition"]}
    assert set(conditions) == {"sub", "aud"}
    assert {c["test"] for c in conditions.values()} == {"StringEquals"}
    assert conditions["aud"]["values"] == ["sts.amazonaws.com"]
    assert "system:serviceaccount:" in conditions["sub"]["values"][0]


@pytest.mark.parametrize("directory", [MODULE, *(env_root(e) for e in ENVS)], ids=lambda p: p.name)
def test_variables_and_outputs_are_described(directory: Path) -> None:
    variables = {n: v for block in terraform(directory)["variable"] for n, v in block.items()}
    for name, var in variables.items():
        assert var.get("description") and var.get("type"), f"variable {name}: description, type"
    outputs = {n for block in terraform(directory)["output"] for n in block}
    assert {"bucket_name", "bucket_arn", "role_arn", "policy_arn"} <= outputs, outputs


# ------------------------------------------------------------ the environments


def test_each_environment_has_a_state_of_its_own() -> None:
    keys = {}
    for env in ENVS:
        (settings,) = terraform(env_root(env))["terraform"]
        (backend,) = settings["backend"]
        assert set(backend) == {"s3"}, f"{env}: a remote backend, not local state"
        s3 = backend["s3"]
        assert s3["encrypt"] is True and s3["use_lockfile"] is True, f"{env}: {s3}"
        keys[env] = s3["key"]
        assert env in s3["key"].split("/"), f"{env}: state key {s3['key']}"
        partial = parse(env_root(env) / "backend.hcl")
        assert partial.get("bucket") and "key" not in partial, f"{env}: key belongs in main.tf"
    assert len(set(keys.values())) == len(ENVS), f"environments share a state: {keys}"


@pytest.mark.parametrize("env", ENVS)
def test_environment_names_match_its_k8s_overlay(env: str) -> None:
    (call,) = [block["xfer"] for block in terraform(env_root(env))["module"]]
    assert call["source"] == "../../modules/xfer"
    resources = kustomize(schedule_dir(env))
    namespace = one(resources, "Namespace", f"xfer-{env}")["metadata"]["name"]
    assert call["namespace"] == namespace, f"{env}: the role trusts another namespace"
    assert call["service_account"] == one(resources, "ServiceAccount", "xfer")["metadata"]["name"]
    account = one(resources, "ServiceAccount", "xfer")["metadata"]["annotations"]
    role = account["eks.amazonaws.com/role-arn"].rsplit("/", 1)[1]
    assert role == settings_of(resources)["XFER_IAM_ROLE"], f"{env}: the overlay names another role"
    assert call["bucket_name"] == "${local.settings.XFER_BUCKET}", call["bucket_name"]
    assert call["role_name"] == "${local.settings.XFER_IAM_ROLE}", call["role_name"]
    assert "${local.settings.XFER_AWS_ACCOUNT}" in call["oidc_provider_arn"], "the role's account"


@pytest.mark.parametrize("env", ENVS)
def test_region_account_and_bucket_come_from_the_k8s_settings(env: str) -> None:
    """Written once, in k8s/overlays/<env>/settings/xfer-settings.yaml: no variable, no tfvars."""
    (provider,) = [p["aws"] for p in terraform(env_root(env))["provider"]]
    assert provider["region"] == "${local.settings.AWS_REGION}", provider
    assert provider["allowed_account_ids"] == ["${local.settings.XFER_AWS_ACCOUNT}"], provider
    variables = {n for block in terraform(env_root(env))["variable"] for n in block}
    assert not variables & {"region", "bucket_name", "account_id"}, variables
    example = parse(env_root(env) / "terraform.tfvars.example")
    assert not set(example) & {"region", "bucket_name", "oidc_provider_arn"}, example
    (local,) = [block["settings"] for block in terraform(env_root(env))["locals"]]
    (relative,) = re.findall(r'file\("\$\{path\.module\}/([^"]+)"\)', local)
    assert (env_root(env) / relative).resolve() == settings_path(env).resolve(), relative


@pytest.mark.parametrize("env", ENVS)
def test_terraform_reads_a_renamed_settings_file(env: str, tmp_path: Path) -> None:
    """`terraform console` evaluates the environment's settings.tf against a settings file
    with another bucket, region and account: Terraform follows the one edit too."""
    terraform_bin = shutil.which("terraform")
    if terraform_bin is None:
        pytest.skip("terraform is not installed: settings.tf not evaluated")
    renamed = {"XFER_BUCKET": f"acme-ml-{env}-2", "AWS_REGION": "eu-west-3"}
    renamed["XFER_AWS_ACCOUNT"] = "210987654321"
    root = variant(env, settings=tuple(renamed.items()))
    tf_dir = tmp_path / env_root(env).relative_to(ROOT)
    tf_dir.mkdir(parents=True)
    shutil.copy(env_root(env) / "settings.tf", tf_dir)
    target = tmp_path / settings_path(env, root).relative_to(root.parent)
    target.parent.mkdir(parents=True)
    shutil.copy(settings_path(env, root), target)
    out = subprocess.run(
        [terraform_bin, f"-chdir={tf_dir}", "console"],
        input="jsonencode(local.settings)\n",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"},
    )
    assert out.returncode == 0, out.stderr
    settings = json.loads(json.loads(out.stdout.strip()))
    assert {k: settings[k] for k in renamed} == renamed, settings
    assert settings["XFER_IAM_ROLE"] == f"xfer-{env}-jobs"
