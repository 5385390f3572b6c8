"""The crash matrix: every write step of a commit, hit by an error reply or a SIGKILL.

For each multi-write commit (a dataset: copies into a new version folder, then
``manifest.json``, then the old version deleted, then the staging; a predictions
partition: token-named parts, then ``_SUCCESS``, then the table manifest Athena
reads, then the old parts, then the staging), a real child process commits a new version through the fault proxy in
front of the embedded S3 server, and at one write step the proxy either (a) answers
503 SlowDown until the child gives up (no outage budget), or (b) lets the write land
and SIGKILLs the child before it hears the answer. After each, a reader that follows
the marker must find the old version or the new one whole (every file the marker
names, each holding that version), never neither and never a mix; then the command
run again from scratch must leave the newest version whole and nothing else beside
its marker. The table of outcomes is printed (``pytest -s`` shows it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from xfer.errors import NotFoundError
from xfer.scoring.scoreplan import table_manifest_uri
from xfer.store import commit, storage

from .commitops import MARKERS, names
from .faultproxy import FaultProxy

SCRIPT = Path(__file__).with_name("commitops.py")
N = 3
# (step name, S3 operation, pattern in the request path, matches to skip)
STEPS = {
    "dataset": [
        ("copy first file", "COPY", r"/ds/v-[^/]+/train/part-00000", 0),
        ("copy last file", "COPY", rf"/ds/v-[^/]+/train/part-{N - 1:05d}", 0),
        ("write marker", "PUT", r"/ds/manifest\.json", 0),
        ("delete old version", "POST", r"\?delete", 0),
        ("delete staging", "POST", r"\?delete", 1),
    ],
    "partition": [
        ("copy first part", "COPY", r"/dt(=|%3D)[^/]+/part-00000-", 0),
        ("copy last part", "COPY", rf"/dt(=|%3D)[^/]+/part-{N - 1:05d}-", 0),
        ("write marker", "PUT", r"/dt(=|%3D)[^/]+/_SUCCESS", 0),
        ("write table manifest", "PUT", r"/_symlink_format_manifest/", 0),
        ("delete old parts", "POST", r"\?delete", 0),
        ("delete staging", "POST", r"\?delete", 1),
    ],
}
FINAL = {"dataset": "ds", "partition": "preds/dt=2026-01-05"}


def commit_version(proxy: FaultProxy, kind: str, final: str, fault: tuple | None) -> int:
    """Run the child; aim ``fault`` (action, op, pattern, skip) at it. Its exit code."""
    version = commit.version_name(uuid.uuid4().hex)
    return run_child(proxy, [kind, final, version, str(N)], fault)


def run_child(proxy: FaultProxy, args: list[str], fault: tuple | None) -> int:
    env = proxy.env()
    # No store-outage budget in the child (it sets none): an error reply ends the command.
    env["XFER_S3_MAX_ATTEMPTS"] = "2"
    child = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline().strip() == "staged", child.stderr.read() if child.stderr else ""
    rule = None
    if fault:
        action, op, pattern, skip = fault
        extra = {"pid": child.pid, "times": 1} if action == "kill" else {"times": 1000}
        rule = proxy.add(op, pattern, action, skip=skip, **extra)
    child.stdin.write("go\n")
    child.stdin.flush()
    child.wait(timeout=120)
    if rule is not None:
        assert rule.hits >= 1, f"the fault at {fault} never fired"
    proxy.clear()
    return child.returncode


def whole_version(kind: str, final: str) -> str | None:
    """The version a marker-following reader sees, checked whole; None if none."""
    try:
        marker = storage.read_json(storage.join(final, MARKERS[kind]))
    except NotFoundError:
        return None
    version = marker["version"]
    assert marker["files"] == names(kind, version, N)
    for name in marker["files"]:
        body = storage.read_bytes(storage.join(final, name))
        assert body == version.encode(), f"{name} holds {body!r}, the marker says {version}: a mix"
    if kind == "partition":  # what Athena/Trino read: one version too, maybe the old one
        listed = storage.read_text(table_manifest_uri(final)).split()
        bodies = {storage.read_bytes(uri) for uri in listed}
        assert len(listed) == N and len(bodies) == 1, f"the table manifest mixes {bodies}"
    return version


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dataset", "partition"])
def test_crash_matrix(fault_proxy: FaultProxy, bucket: str, kind: str) -> None:
    final = f"{bucket}/{FINAL[kind]}"
    assert commit_version(fault_proxy, kind, final, None) == 0
    table = [f"{kind} commit: step | fault | exit | reader sees | after a second run"]
    for step, op, pattern, skip in STEPS[kind]:
        for action in ("slowdown", "kill"):
            old = whole_version(kind, final)
            code = commit_version(fault_proxy, kind, final, (action, op, pattern, skip))
            assert code != 0, f"{step}/{action}: the fault did not stop the commit"
            seen = whole_version(kind, final)
            assert seen is not None, f"{step}/{action}: neither version is readable"
            sees = "old" if seen == old else "new"
            assert commit_version(fault_proxy, kind, final, None) == 0
            newest = whole_version(kind, final)
            assert newest not in (None, old, seen) or newest == seen  # a fresh version
            listed = sorted(f.uri for f in storage.list_files(final))
            expected = sorted(
                storage.join(final, n) for n in [*names(kind, newest or "", N), MARKERS[kind]]
            )
            assert listed == expected, f"{step}/{action}: leftovers after the rerun: {listed}"
            table.append(f"{step} | {action} | {code} | {sees} whole | new whole, no leftovers")
    staged = storage.list_files(f"{bucket}/_tmp")
    # Only commits that died before deleting their staging left one (a lifecycle rule expires it).
    assert len({f.uri.split("/_tmp/")[1].split("/")[0] for f in staged}) <= 2 * len(STEPS[kind])
    print("\n" + "\n".join(table))
    print(json.dumps({"cases": len(table) - 1}))


POINTER_STEPS = [
    ("write latest.json", "PUT", r"/models/ptr/latest\.json", 0),
    ("write history", "PUT", r"/models/ptr/history/", 0),
]


@pytest.mark.slow
def test_crash_matrix_promote(fault_proxy: FaultProxy, bucket: str) -> None:
    """`xfer runs promote B` while A is published: latest.json names A or B, never
    nothing; promoting again leaves B published; a rollback then reaches A."""
    from xfer.registry import layout

    from .test_pointers import fake_run

    root = f"{bucket}/xfer"
    for run in ("A", "B"):
        fake_run(root, run)
    model = layout.model_uri(root, "ptr")

    def xfer(*args: str, fault: tuple | None = None) -> int:
        # No outage budget: an error reply ends the command, as in the other children.
        overrides = [f"storage.root={root}", "storage.outage_seconds=0"]
        return run_child(fault_proxy, ["xfer", *args, *overrides], fault)

    table = ["promote: step | fault | exit | latest.json names | promote again, then rollback"]
    for step, op, pattern, skip in POINTER_STEPS:
        for action in ("slowdown", "kill"):
            assert xfer("runs", "promote", "A", "--force") == 0
            code = xfer("runs", "promote", "B", "--force", fault=(action, op, pattern, skip))
            assert code != 0, f"{step}/{action}: the fault did not stop the command"
            seen = layout.read_pointer(model)
            assert seen is not None and seen["run_id"] in ("A", "B"), f"{step}/{action}: {seen}"
            layout.resolve_model(model)  # a reader can load what it names
            assert xfer("runs", "promote", "B", "--force") == 0
            assert layout.read_pointer(model)["run_id"] == "B"  # type: ignore[index]
            assert xfer("runs", "rollback", "ptr") == 0
            back = layout.read_pointer(model)
            assert back is not None and back["run_id"] == "A", f"{step}/{action}: {back}"
            table.append(f"{step} | {action} | {code} | {seen['run_id']} | B, then A")
    print("\n" + "\n".join(table))
