"""What state a run is in, read from what it wrote: config, ``_SUCCESS``, metrics, journal.

A run is *complete* once its ``_SUCCESS`` exists, *failed* once a driver recorded a
failure of the whole run after the run's latest start, and *running* otherwise (with
when it was last heard of: a driver killed outright records nothing).

When a run started is its first driver start record (``_journal/start-<ms>-driver.json``,
written by :func:`xfer.train.journal.record_start` past the driver's checks), whatever
the run id (a ``raysubmit_…`` submission id carries no time). Each resume by id writes
another one, so a failed run that was resumed is running again as soon as its new
driver starts, before its workers do. Runs written before those records existed: the
time in a ``YYYYmmdd-HHMMSS-…`` id, else the first attempt's start, else blank (listed
last).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from xfer.errors import NotFoundError
from xfer.registry import layout
from xfer.registry.layout import CONFIG, METRICS, read_pointer
from xfer.store import storage


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    uri: str
    status: str  # complete | failed | running
    model_name: str
    dataset: str
    base: str
    head_val: float | None
    fine_tune_val: float | None
    test_accuracy: float | None
    gate_passed: bool | None
    published: bool
    started: str  # ISO time, UTC
    wall_s: float | None
    where: str  # running or failed: the last stage heard of


def iso(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds") if t else ""


def _started_from_id(run_id: str) -> str:
    try:
        t = dt.datetime.strptime(run_id[:15], "%Y%m%d-%H%M%S").replace(tzinfo=dt.timezone.utc)
        return t.isoformat(timespec="seconds")
    except ValueError:
        return ""


def read(uri: str, kind: str = "json") -> Any:
    try:
        return storage.read_yaml(uri) if kind == "yaml" else storage.read_json(uri)
    except NotFoundError:
        return None


def _stage_text(stage: dict[str, Any] | None) -> str:
    if not stage:
        return "starting"
    text = str(stage.get("name", ""))
    if stage.get("phase"):
        text += f" {stage['phase']}"
    if stage.get("epoch"):
        text += f" epoch {stage['epoch']}"
    return text


def published_runs(root: str) -> dict[str, str]:
    """run id -> model name, for every model's current ``latest.json``."""
    out = {}
    for name in storage.list_dirs(layout.models_prefix(root)):
        pointer = read_pointer(layout.model_uri(root, name))
        if pointer:
            out[pointer["run_id"]] = name
    return out


@dataclass
class _Journal:
    """The run's journal, as far as its state needs it (one LIST; attempts read if asked)."""

    starts: list[float]  # each driver start, in order: the run's start, then resumes
    driver_failed_at: float  # the driver's latest record of a failed run (0: none)
    attempts: list[dict[str, Any]]  # read only for a run that is not complete


def _stamp(name: str) -> float:
    """``start-<ms>-driver.json`` / ``error-<ms>-driver.json`` -> seconds."""
    return int(name.split("-")[1]) / 1000


def _journal(uri: str, read_attempts: bool) -> _Journal:
    from xfer.train.journal import JOURNAL

    try:
        files = storage.list_files(storage.join(uri, JOURNAL))
    except NotFoundError:
        files = []
    j = _Journal([], 0.0, [])
    for info in files:
        name = storage.basename(info.uri)
        if name.startswith("start-") and name.endswith("-driver.json"):
            j.starts.append(_stamp(name))
        elif name.startswith("error-") and name.endswith("-driver.json"):
            j.driver_failed_at = max(j.driver_failed_at, _stamp(name))
        elif name.startswith("attempt-") and read_attempts:
            j.attempts.append(read(info.uri) or {})
    j.starts.sort()
    j.attempts.sort(key=lambda a: a.get("attempt", 0))
    return j


def _started(uri: str, run_id: str, j: _Journal) -> str:
    from xfer.train.journal import JOURNAL

    if j.starts:
        return iso(j.starts[0])
    if _started_from_id(run_id):
        return _started_from_id(run_id)
    first = j.attempts[0] if j.attempts else read(storage.join(uri, JOURNAL, "attempt-00001.json"))
    return iso((first or {}).get("started_at"))


def _state(j: _Journal) -> tuple[str, str]:
    """A run that is not complete: failed or running, and where it was last heard of."""
    last = j.attempts[-1] if j.attempts else {}
    attempt_at = float(last.get("started_at") or 0)
    driver_at = j.starts[-1] if j.starts else 0.0
    # The latest start wins: a run resumed after a failure is running again.
    status = "failed" if j.driver_failed_at > max(attempt_at, driver_at) else "running"
    if driver_at > attempt_at:  # a driver started (or resumed) it; no worker has yet
        return status, f"{'resuming' if last else 'starting'}, last heard {iso(driver_at)}"
    return status, f"{_stage_text(last.get('stage'))}, last heard {iso(last.get('updated_at'))}"


def first_start(uri: str) -> float | None:
    """When the run's first driver started it (its first start record), or None."""
    starts = _journal(uri, read_attempts=False).starts
    return starts[0] if starts else None


def figures(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """What the runs table shows of a committed run's ``metrics.json`` (None: not committed)."""
    m = metrics or {}
    phases = m.get("phases", {})
    return {
        "head_val": phases.get("head", {}).get("val_accuracy"),
        "fine_tune_val": phases.get("fine_tune", {}).get("val_accuracy"),
        "test_accuracy": m.get("test", {}).get("accuracy"),
        "gate_passed": m.get("gate", {}).get("passed") if metrics else None,
        "wall_s": m.get("wall_time_s"),
    }


def summarize(root: str, run_id: str, published: dict[str, str] | None = None) -> RunSummary:
    """The run as its own files say (config, ``_SUCCESS``, metrics, journal): 3-4 requests."""
    uri = layout.run_uri(root, run_id)
    config = read(storage.join(uri, CONFIG), "yaml") or {}
    if published is None:
        published = published_runs(root)
    metrics = read(storage.join(uri, METRICS)) if layout.is_complete(uri) else None
    journal = _journal(uri, read_attempts=not metrics)
    status, where = ("complete", "") if metrics else _state(journal)
    return RunSummary(
        run_id=run_id,
        uri=uri,
        status=status,
        model_name=str((config.get("output") or {}).get("model_name", "")),
        dataset=str((config.get("data") or {}).get("dataset", "")),
        base=str((config.get("model") or {}).get("base", "")),
        published=run_id in published,
        started=_started(uri, run_id, journal),
        where=where,
        **figures(metrics),
    )
