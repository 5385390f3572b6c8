"""What `ray job submit --working-dir .` uploads: code and configs, never secrets or state.

Packed by Ray's own packager with the excludes of the shipped jobs/runtime_env.yaml,
from a tree laid out like this checkout after the runbook's set-up steps (an
``s3.env`` of keys, Terraform variables and state, a Ray token).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).parent.parent

SECRETS = (
    "s3.env",
    "prod.env",
    "infra/terraform/envs/prod/prod.tfvars",
    "infra/terraform/terraform.tfstate",
    "infra/terraform/terraform.tfstate.backup",
    "infra/terraform/.terraform/providers/lock",
    "auth_token",
)
CODE = ("jobs/train.py", "jobs/configs/local.yaml", "src/xfer/__init__.py", "src/xfer/cli.py")


def test_the_upload_carries_code_but_no_secrets(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    tree = tmp_path / "checkout"
    for name in (*SECRETS, *CODE):
        path = tree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("AWS_SECRET_ACCESS_KEY=not-for-upload\n" if name in SECRETS else "# code\n")
    target = tmp_path / "upload.zip"
    create_package(str(tree), target, include_gitignore=True, excludes=env["excludes"])
    names = set(zipfile.ZipFile(target).namelist())
    assert set(CODE) <= names, names
    assert not names & set(SECRETS), names & set(SECRETS)
    assert not any(".terraform" in n for n in names)


def test_the_package_is_shipped_to_every_worker():
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert env["py_modules"] == ["src/xfer"]
    assert (ROOT / env["py_modules"][0] / "__init__.py").is_file()
    assert env["env_vars"]["TF_USE_LEGACY_KERAS"] == "1"
