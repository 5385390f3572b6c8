"""A child process for the crash matrix: stage one version of a set, wait, commit it.

    python tests/commitops.py dataset|partition FINAL VERSION N
    python tests/commitops.py xfer ARGS...      (an xfer command, once told to go)

It stages N objects (each holding VERSION) the way xfer names them (a dataset's
version folder, a partition's token in the name), prints ``staged``, waits for a
line on stdin (so the test can aim a fault at this pid), then commits through
:mod:`xfer.store.commit` with the marker written last.
"""

from __future__ import annotations

import json
import sys

from xfer.scoring.scoreplan import write_table_manifest
from xfer.store import commit, storage

MARKERS = {"dataset": "manifest.json", "partition": "_SUCCESS"}


def names(kind: str, version: str, n: int) -> list[str]:
    if kind == "dataset":
        return [f"{version}/train/part-{i:05d}.parquet" for i in range(n)]
    return [f"part-{i:05d}-{version}.parquet" for i in range(n)]


def main(kind: str, final: str, version: str, n: int) -> None:
    staging = commit.staging_prefix(final)
    files = names(kind, version, n)
    for name in files:
        storage.write_bytes(storage.join(staging, name), version.encode())
    body = json.dumps({"version": version, "files": files}).encode()
    print("staged", flush=True)
    sys.stdin.readline()
    if kind == "dataset":
        commit.commit_prefix(staging, final, marker=MARKERS[kind], marker_body=body)
    else:
        commit.commit_partition(
            staging,
            final,
            MARKERS[kind],
            body,
            keep=files,
            before_delete=lambda _: write_table_manifest(final, files),
        )
    print("committed", flush=True)


def xfer_when_told(args: list[str]) -> int:
    """Run an ``xfer`` command once a line arrives on stdin."""
    from xfer.cli import main as xfer_main

    print("staged", flush=True)
    sys.stdin.readline()
    return xfer_main(args)


if __name__ == "__main__":
    if sys.argv[1] == "xfer":
        raise SystemExit(xfer_when_told(sys.argv[2:]))
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
