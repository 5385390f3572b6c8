"""The run index: what `xfer runs list` shows of each run, one small object per run.

    <root>/runs/_index/<model name>/<first start, ms, 15 digits>-<run id>.json

Without it, listing runs reads every run's config, ``_SUCCESS``, metrics and journal:
four requests a run, 4,000 for a thousand runs. With it, `xfer runs list` lists this
prefix and ``runs/`` (one request per 1,000 runs each), sorts by the keys (when each
run first started; the model name filters ``--model``), and reads only the runs it
shows: one GET of a complete run's entry, and for a run that is not complete what
the index cannot know, from the run's own files (is it still running, did it fail,
has it committed since its entry was written).

The driver writes a run's entry when it starts (running), and rewrites it when the
run commits (complete, with the table's figures) or fails. A resume rewrites the same
key: the run's first start comes from its journal. The index is a cache and the run
folder stays the truth: a write that fails is a warning, never a failed run; a run
without an entry (written before the index, or whose write failed) is found by
listing ``runs/`` and summarized from its own files; an entry without a run folder
is ignored. Nothing here writes while listing: read-only credentials list runs.
Names under ``runs/`` that start with ``_`` or ``.`` are never runs.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xfer import console
from xfer.errors import DataError, NotFoundError
from xfer.registry import layout
from xfer.registry.runstatus import RunSummary, figures, first_start, iso, summarize
from xfer.store import storage

if TYPE_CHECKING:
    from xfer.config import XferConfig

INDEX = "_index"
# Runs read at once while listing (each read is one or a few small requests).
READERS = 16
_NAME = re.compile(r"(\d{15})-(.+)\.json")


def index_prefix(root: str) -> str:
    return storage.join(layout.runs_prefix(root), INDEX)


def is_run_name(name: str) -> bool:
    """``runs/_index`` (and any other ``_``/``.`` name under ``runs/``) is not a run."""
    return not name.startswith(("_", "."))


@dataclass(frozen=True)
class Entry:
    """One run's index object, as its key names it."""

    uri: str
    model_name: str
    start_ms: int
    run_id: str

    @property
    def started(self) -> str:
        return iso(self.start_ms / 1000)


def entry_uri(root: str, model_name: str, start_ms: int, run_id: str) -> str:
    return storage.join(index_prefix(root), model_name, f"{start_ms:015d}-{run_id}.json")


def _parse(uri: str, prefix: str) -> Entry | None:
    model, _, name = uri[len(prefix) + 1 :].partition("/")
    m = _NAME.fullmatch(name)
    return Entry(uri, model, int(m[1]), m[2]) if model and m else None


def entries(root: str) -> dict[str, Entry]:
    """Run id -> its entry (a run with two, after a lost journal write: its first)."""
    prefix = index_prefix(root)
    out: dict[str, Entry] = {}
    for info in storage.list_files(prefix):
        e = _parse(info.uri, prefix)
        if e and (e.run_id not in out or e.start_ms < out[e.run_id].start_ms):
            out[e.run_id] = e
    return out


# ------------------------------------------------------------------ writing


class IndexWriter:
    """The driver's side: this run's entry, rewritten as the run moves on.

    Every method is best effort: the index is a cache, so a store that refuses or is
    away costs a warning line, never the run.
    """

    def __init__(self, cfg: XferConfig, run_id: str, run_uri: str):
        self.root = cfg.storage.root
        self.run_uri = run_uri
        self.model_name = cfg.output.model_name
        self.fields = {
            "run_id": run_id,
            "model_name": cfg.output.model_name,
            "dataset": cfg.data.dataset,
            "base": cfg.model.base,
        }
        self.uri: str | None = None

    def started(self) -> None:
        """After the driver's start record: the entry at the run's first start."""
        try:
            first = first_start(self.run_uri) or time.time()
            start_ms = int(first * 1000)
            self.uri = entry_uri(self.root, self.model_name, start_ms, self.fields["run_id"])
            self.fields["started"] = iso(first)
            self._write("running", figures(None))
        except Exception as exc:
            _warn(exc)

    def failed(self) -> None:
        self._write("failed", figures(None))

    def committed(self, metrics: dict[str, Any]) -> None:
        """After ``_SUCCESS``: an entry never says complete before the run is."""
        self._write("complete", figures(metrics))

    def _write(self, status: str, figs: dict[str, Any]) -> None:
        if self.uri is None:  # its start could not be written: no key to write to
            return
        body = {**self.fields, "status": status, **figs, "written_at": iso(time.time())}
        try:
            storage.write_json(self.uri, body)
        except Exception as exc:
            _warn(exc)


def _warn(exc: BaseException) -> None:
    print(f"{console.TAG} warning: could not write the run index ({exc})", flush=True)


# ------------------------------------------------------------------ reading


@dataclass(frozen=True)
class RunList:
    runs: list[RunSummary]  # the newest ``limit`` of them, newest first
    total: int  # every run that matched


def newest(
    root: str, names: list[str], model: str | None, limit: int | None, published: dict[str, str]
) -> RunList:
    """The newest ``limit`` runs (all: None) among the run folders ``names``."""
    present = set(names)
    indexed = [e for e in entries(root).values() if e.run_id in present]
    unindexed = sorted(present - {e.run_id for e in indexed})
    legacy = _each(lambda n: summarize(root, n, published), unindexed)
    if model:
        indexed = [e for e in indexed if e.model_name == model]
        legacy = [s for s in legacy if s.model_name == model]
    found: list[Entry | RunSummary] = [*indexed, *legacy]
    found.sort(key=lambda r: (r.started, r.run_id), reverse=True)
    shown = found[:limit] if limit is not None else found
    return RunList(_each(lambda r: _summary(root, r, published), shown), len(found))


def _each(fn: Any, items: list[Any]) -> list[Any]:
    if len(items) < 2:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(READERS, len(items))) as pool:
        return list(pool.map(fn, items))


def _summary(root: str, run: Entry | RunSummary, published: dict[str, str]) -> RunSummary:
    """A complete run as its entry says; any other as its own files say now."""
    if isinstance(run, RunSummary):
        return run
    try:
        body = storage.read_json(run.uri)
    except (NotFoundError, DataError):  # gone since the listing, or not JSON: ask the run
        body = {}
    if body.get("status") != "complete":
        return summarize(root, run.run_id, published)
    return RunSummary(
        run_id=run.run_id,
        uri=layout.run_uri(root, run.run_id),
        status="complete",
        model_name=run.model_name,
        dataset=str(body.get("dataset", "")),
        base=str(body.get("base", "")),
        published=run.run_id in published,
        started=run.started,
        where="",
        **{name: body.get(name) for name in figures(None)},  # what the entry recorded
    )
