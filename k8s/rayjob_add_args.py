"""Append arguments to the command of the RayJobs in a manifest (stdin to stdout).

    kubectl kustomize k8s/overlays/prod/train \\
        | .venv/bin/python k8s/rayjob_add_args.py output.run_id=<run_id> \\
        | kubectl create -f -

What an xfer RayJob runs is its submitter's args (jobs/kuberay_submit.sh submits them,
word by word); its spec.entrypoint says the same for people. Both get the arguments, so
the two stay equal. Other documents pass through unchanged. Used by docs/runbook.md to
resume a run by id and to score a past date.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

import yaml


def add_args(doc: Any, args: list[str]) -> Any:
    if not isinstance(doc, dict) or doc.get("kind") != "RayJob":
        return doc
    spec = doc["spec"]
    (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"]
    if shlex.split(spec["entrypoint"]) != submitter["args"]:
        raise SystemExit("rayjob_add_args: the RayJob's entrypoint and submitter args differ")
    submitter["args"] = [*submitter["args"], *args]
    spec["entrypoint"] = shlex.join(submitter["args"])
    return doc


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    docs = [add_args(doc, argv) for doc in yaml.safe_load_all(sys.stdin) if doc is not None]
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
