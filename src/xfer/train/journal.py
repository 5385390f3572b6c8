"""The run's journal: every attempt of a training run, where it started, how it ended.

    <run>/_journal/attempt-00001.json          rank 0: start point, then each stage it enters
    <run>/_journal/error-<ms>-r<rank>.json     the Ray Train controller: a worker's failure
    <run>/_journal/error-<ms>-driver.json      the driver: a run that failed as a whole
    <run>/_journal/code-r<rank>.json           each rank: the xfer code it runs (lineage)
    <run>/_journal/dataset.json                the driver: the dataset the run started on
    <run>/_journal/start-<ms>-driver.json      the driver: each start, past its checks

A checkpoint says where a run *is*, not what happened to it: a worker killed before
the first checkpoint of an attempt restarts from zero and leaves nothing behind, and
a checkpoint that Ray Train had not registered yet makes the next attempt redo an
epoch without a word. The journal keeps that trace. An attempt is one start of the
worker group (a Ray Train restart after a worker died, or ``output.run_id=`` resuming
the run later); every attempt that was followed by another one failed, and
:func:`failures` turns those into records for ``metrics.json`` and the report: what
failed (the stage, phase and epoch it was in), which rank, when, where the next
attempt resumed from, and how many finished epochs it had to redo.

Each writer owns its own objects (one file per attempt, one per error), so no write
ever races another. Journal writes are best effort: a store that is briefly away
costs a line in the record, never the run.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ray.train import UserCallback

from xfer.errors import NotFoundError, StorageError
from xfer.store import storage

JOURNAL = "_journal"

# Stages an attempt goes through, in order; training stages also carry phase + epoch.
STAGES = (
    "starting",
    "feature_cache",
    "train",
    "test_evaluation",
    "model_save",
    "final_report",
    "outputs",  # on the driver: predictions, metrics, report, _SUCCESS
)


def _now() -> float:
    return time.time()


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def _attempt_uri(run_uri: str, n: int) -> str:
    return storage.join(run_uri, JOURNAL, f"attempt-{n:05d}.json")


def _write(uri: str, obj: dict[str, Any]) -> None:
    try:
        storage.write_json(uri, obj)
    except StorageError as exc:  # never fail a run over its own bookkeeping
        print(f"[xfer] warning: could not write the run journal ({exc})", flush=True)


def _names(run_uri: str) -> list[str]:
    try:
        files = storage.list_files(storage.join(run_uri, JOURNAL))
    except NotFoundError:
        return []
    return [storage.basename(f.uri) for f in files]


def _entries(run_uri: str) -> list[tuple[str, dict[str, Any]]]:
    return [(n, storage.read_json(storage.join(run_uri, JOURNAL, n))) for n in _names(run_uri)]


@dataclass
class Journal:
    """Rank 0's record of the attempt it runs."""

    run_uri: str
    driver: str  # a token per `xfer train` call: tells Ray Train restarts from resumes by id
    record: dict[str, Any] = field(default_factory=dict)

    def begin(self, resumed_from: dict[str, Any] | None, position: int) -> int:
        names = [name for name in _names(self.run_uri) if name.startswith("attempt-")]
        number = 1 + max((int(re.sub(r"\D", "", n)) for n in names), default=0)
        self.record = {
            "attempt": number,
            "driver": self.driver,
            "started_at": _now(),
            "resumed_from": resumed_from,
            "start_position": position,
            "optimizer": None,
        }
        self.stage("starting", position=position)
        return number

    def stage(
        self, name: str, *, position: int, phase: str | None = None, epoch: int | None = None
    ) -> None:
        """Enter a stage; ``epoch`` is the 1-based epoch in progress, ``position`` the
        epochs finished across phases so far."""
        assert name in STAGES, name
        self.record["stage"] = {"name": name, "phase": phase, "epoch": epoch}
        self.record["position"] = position
        self.record["updated_at"] = _now()
        _write(_attempt_uri(self.run_uri, self.record["attempt"]), self.record)

    def note(self, **fields: Any) -> None:
        self.record.update(fields)
        _write(_attempt_uri(self.run_uri, self.record["attempt"]), self.record)


def record_code(run_uri: str, rank: int, identity: dict[str, Any]) -> None:
    """Which xfer a rank runs (the latest attempt's), for the run's lineage."""
    _write(storage.join(run_uri, JOURNAL, f"code-r{rank:05d}.json"), {"rank": rank, **identity})


def worker_code(run_uri: str) -> list[dict[str, Any]]:
    return [e for name, e in _entries(run_uri) if name.startswith("code-")]


DATASET = "dataset.json"


def record_dataset(run_uri: str, uri: str, checksum: str, exclusion: Any = None) -> None:
    """The dataset a new run starts on, and the sha256 of its data.exclude list (an
    :class:`xfer.data.exclude.Exclusion`): a resume must train on the same rows."""
    body = {"uri": uri, "manifest_checksum": checksum}
    if exclusion is not None:
        body.update(exclude_uri=exclusion.uri, exclude_sha256=exclusion.sha256)
    storage.write_json(storage.join(run_uri, JOURNAL, DATASET), body)


def recorded_dataset(run_uri: str) -> dict[str, Any] | None:
    """What :func:`record_dataset` wrote, or None (a run started before it existed)."""
    try:
        return storage.read_json(storage.join(run_uri, JOURNAL, DATASET))
    except NotFoundError:
        return None


def record_start(run_uri: str, resumed: bool, max_failures: int) -> None:
    """A driver starts the run or resumes it: the first is when the run started
    (whatever its id), a later one a resume (xfer.registry.runstatus)."""
    now = _now()
    uri = storage.join(run_uri, JOURNAL, f"start-{int(now * 1000):015d}-driver.json")
    _write(uri, {"at": now, "resumed": resumed, "max_failures": max_failures})


def record_error(run_uri: str, rank: int | None, message: str) -> None:
    """One failure seen by the controller (a worker's rank) or the driver (rank None)."""
    now = _now()
    who = "driver" if rank is None else f"r{rank:05d}"
    uri = storage.join(run_uri, JOURNAL, f"error-{int(now * 1000):015d}-{who}.json")
    _write(uri, {"rank": rank, "error": message[:500], "at": now})


def describe_exception(exc: BaseException) -> str:
    """One line: the exception's type and its most telling line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    telling = [ln for ln in lines if "error" in ln.lower() and not ln.startswith("File ")]
    text = (telling[-1] if telling else (lines[0] if lines else "")).strip()
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


class FailureRecorder(UserCallback):
    """For ``RunConfig(callbacks=...)``: runs in the Ray Train controller and journals
    each failed worker's error once (with its rank)."""

    def __init__(self, run_uri: str):
        self.run_uri = run_uri
        self.seen: set[tuple[int, str]] = set()

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank, exc in sorted(worker_exceptions.items()):
            message = describe_exception(exc)
            if (rank, message) not in self.seen:
                self.seen.add((rank, message))
                record_error(self.run_uri, rank, message)


def failures(run_uri: str) -> list[dict[str, Any]]:
    """Every failed attempt of the run: what failed, where it resumed, what was redone."""
    entries = _entries(run_uri)
    attempts = sorted(
        (e for name, e in entries if name.startswith("attempt-")), key=lambda a: a["attempt"]
    )
    errors = sorted((e for name, e in entries if name.startswith("error-")), key=lambda e: e["at"])
    out = []
    for this, after in itertools.pairwise(attempts):
        if this.get("completed"):
            continue
        window = [e for e in errors if this["started_at"] <= e["at"] < after["started_at"]]
        worker_errors = [e for e in window if e["rank"] is not None]
        ranks = sorted({e["rank"] for e in worker_errors})
        stage = this.get("stage") or {"name": "starting", "phase": None, "epoch": None}
        at = min((e["at"] for e in window), default=this.get("updated_at", this["started_at"]))
        resumed = after.get("start_position", 0)
        out.append(
            {
                "attempt": this["attempt"],
                "stage": stage["name"],
                "phase": stage.get("phase"),
                "epoch": stage.get("epoch"),
                "rank": _first_rank(worker_errors),
                "ranks_failed": ranks,
                "error": (worker_errors or window or [{"error": None}])[0]["error"],
                "at": _iso(at),
                "resumed_by": "ray_train_restart"
                if after.get("driver") == this.get("driver")
                else "run_id",
                "resumed_from": after.get("resumed_from"),
                "optimizer_after_resume": after.get("optimizer"),
                "epochs_redone": max(0, int(this.get("position", 0)) - int(resumed)),
            }
        )
    return out


# A worker process or its node that is gone, as Ray reports it; the other ranks then
# fail in the collectives it left (their errors are consequences, not the cause).
# (Ray Train reports a worker it can no longer reach as a failed health check.)
LOST_PROCESS = (
    "WorkerHealthCheckFailedError",
    "WorkerHealthCheckTimeoutError",
    "ActorDiedError",
    "ActorUnavailableError",
    "NodeDiedError",
    "WorkerCrashedError",
)


def _first_rank(errors: list[dict[str, Any]]) -> int | None:
    """The rank that failed first; a lost process outranks the collectives it broke."""
    lost = [e for e in errors if (e["error"] or "").startswith(LOST_PROCESS)]
    pick = lost or errors
    return pick[0]["rank"] if pick else None


def _attempts(run_uri: str) -> list[dict[str, Any]]:
    found = [e for name, e in _entries(run_uri) if name.startswith("attempt-")]
    return sorted(found, key=lambda a: a["attempt"])


def last_position(run_uri: str) -> int:
    """Epochs finished across phases when the run's latest attempt was last heard of."""
    attempts = _attempts(run_uri)
    return int(attempts[-1].get("position", 0)) if attempts else 0


def enter_outputs(run_uri: str) -> None:
    """The driver took over from the workers (predictions, metrics, report, _SUCCESS)."""
    _note_last(run_uri, stage={"name": "outputs", "phase": None, "epoch": None})


def mark_complete(run_uri: str) -> None:
    """The run committed: a later attempt (its _SUCCESS was lost) is not a failure."""
    _note_last(run_uri, completed=True)


def _note_last(run_uri: str, **fields: Any) -> None:
    attempts = _attempts(run_uri)
    if attempts:
        last = {**attempts[-1], **fields, "updated_at": _now()}
        _write(_attempt_uri(run_uri, last["attempt"]), last)
