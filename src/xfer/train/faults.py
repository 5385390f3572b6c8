"""Fault injection for the recovery tests: fail one rank once, at a chosen point.

    fault.rank=1 fault.point=batch fault.phase=fine_tune fault.epoch=1 fault.action=hang

The first time the configured rank reaches the point in a run it writes
``<run>/_fault_injected`` (its pid, host, rank and point), then either exits
(``exit``) or waits to be killed from outside (``hang``): the failure-matrix tests
read the pid and send SIGKILL, as a node's OOM killer or a lost machine would. The
marker makes it fire once, so the restarted worker runs through.
"""

from __future__ import annotations

import os
import socket
import time

from xfer.config import FaultConfig
from xfer.store import storage

FAULT_MARKER = "_fault_injected"
HANG_LIMIT_S = 600  # a hung worker nobody kills gives up, so a broken test cannot hang CI


def maybe_fail(
    fault: FaultConfig,
    run_uri: str,
    rank: int,
    point: str,
    phase: str | None = None,
    epoch: int | None = None,
    batch: int | None = None,
) -> None:
    if fault.rank != rank or fault.point != point:
        return
    if point in ("epoch", "batch") and (phase, epoch) != (fault.phase, fault.epoch):
        return
    if point == "batch" and batch != fault.batch:
        return
    marker = storage.join(run_uri, FAULT_MARKER)
    if storage.exists(marker):
        return
    where = {"rank": rank, "point": point, "phase": phase, "epoch": epoch, "batch": batch}
    storage.write_json(marker, {**where, "pid": os.getpid(), "host": socket.gethostname()})
    print(f"[xfer] fault injection ({fault.action}): {where}", flush=True)
    if fault.action == "exit":
        os._exit(17)
    deadline = time.monotonic() + HANG_LIMIT_S
    while time.monotonic() < deadline:
        time.sleep(0.2)
    os._exit(18)
