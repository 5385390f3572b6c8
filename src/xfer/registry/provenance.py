"""Which xfer a process runs (version, a hash of its source, where it was imported
from), and the checksum of a file that a run or a dataset records (:func:`file_sha256`).

    code_identity()  ->  {"version": "0.1.0", "sha256": "3f2a…", "path": "/…/xfer",
                          "git_commit": "…" | None}

On a cluster the code reaches the workers with the job (the runtime env's
``py_modules``), and an older xfer installed in the nodes' image must not win
silently. The driver sends its identity to every worker; a worker that imported
other code (a different hash) stops at once with a message saying where each came
from, and every worker logs the identity it runs.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from typing import Any

import xfer

PACKAGE_DIR = os.path.dirname(os.path.abspath(xfer.__file__))


def file_sha256(path: str) -> str:
    """sha256 of a local file, read in 1 MiB blocks (weights, shards, feature files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def source_sha256() -> str:
    """sha256 over the package's ``.py`` files (relative path and bytes, in order)."""
    digest = hashlib.sha256()
    for dirpath, dirnames, names in os.walk(PACKAGE_DIR):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(dirpath, name)
            digest.update(os.path.relpath(path, PACKAGE_DIR).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout the code came from (``XFER_GIT_COMMIT`` in images)."""
    if os.environ.get("XFER_GIT_COMMIT"):
        return os.environ["XFER_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PACKAGE_DIR,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def code_identity() -> dict[str, Any]:
    return {
        "version": xfer.__version__,
        "sha256": source_sha256(),
        "path": PACKAGE_DIR,
        "git_commit": git_commit(),
    }


def describe(identity: dict[str, Any]) -> str:
    commit = identity.get("git_commit")
    at = f", commit {commit[:12]}" if commit else ""
    return (
        f"xfer {identity['version']} (code {identity['sha256'][:12]}{at}) from {identity['path']}"
    )


def version_line() -> str:
    """`xfer --version`: this code's identity and the stack it runs on (read from the
    installed packages' metadata, without importing TensorFlow or Ray)."""
    import platform
    from importlib import metadata

    def installed(dist: str) -> str:
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            return f"{dist} not installed"

    stack = ", ".join(installed(d) for d in ("tensorflow", "tf-keras", "ray", "boto3", "pyarrow"))
    return f"{describe(code_identity())}\n{stack}, Python {platform.python_version()}"


def check_same_code(expected: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """This process's identity; raises if it is not the code the driver runs."""
    from xfer.errors import XferError

    mine = code_identity()
    if expected and expected.get("sha256") != mine["sha256"]:
        raise XferError(
            f"{where} runs {describe(mine)}, but the driver runs {describe(expected)}: the "
            "job's runtime env must ship the code (jobs/runtime_env.yaml: py_modules: [src/xfer])"
        )
    return mine
