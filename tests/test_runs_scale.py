"""`xfer runs list` over hundreds of runs: its store requests grow with the runs it
shows, not with the runs kept (xfer.registry.runindex).

The 300 runs are written by the writers the driver uses (the resolved config, the
journal's start and error records, metrics.json, _SUCCESS, the run index), each
run started a minute after the one before (the journal's clock, set per thread),
with ids that carry no time. Among them: runs written before the index (no entry),
entries the run has moved past (a commit or a failure whose index write was lost),
a failed run and a running one. Requests are counted at the S3 server's door, by the
fault proxy's log.
"""

from __future__ import annotations

import secrets
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from xfer.cli import main
from xfer.config import resolved_dict
from xfer.registry.layout import CONFIG, METRICS, write_success
from xfer.registry.runindex import IndexWriter, index_prefix
from xfer.registry.runs import find_runs, list_runs
from xfer.registry.runstatus import iso
from xfer.store import storage
from xfer.train import journal
from xfer.train.outputs import phase_summary

from .conftest import config_for

RUNS = 300
T0 = 1_780_000_000.0  # the oldest run's start; run i starts i minutes later
LIMIT = 20
# Run i (0: oldest) -> what happened to it; every other run committed.
FATES = {
    299: "running",
    298: "failed",
    297: "unindexed",  # written before the index existed
    296: "commit_lost",  # committed, its index entry still says running
    295: "failure_lost",  # failed, its index entry still says running
    290: "unindexed",
    100: "unindexed",
    5: "unindexed",
}
SHOWN_STATUS = {"running": "running", "failed": "failed", "failure_lost": "failed"}
_clock = threading.local()


@dataclass(frozen=True)
class Runs:
    root: str
    ids: list[str]  # by start, oldest first
    models: list[str]


def _metrics(run_id: str, model: str, i: int) -> dict[str, object]:
    epoch = {"seconds": 10.0, "images_per_s": 50.0, "loss": 0.4, "val_accuracy": 0.8}
    accuracy = 0.5 + (i % 40) / 100
    return {
        "run_id": run_id,
        "model_name": model,
        "dataset": "s3://b/datasets/target",
        "base": "mobilenet_v2",
        "phases": {"head": phase_summary([epoch]), "fine_tune": phase_summary([epoch])},
        "test": {"accuracy": accuracy},
        "gate": {"metric": "test_accuracy", "value": accuracy, "passed": accuracy > 0.6},
        "wall_time_s": 120.0 + i,
    }


def _write_run(root: str, i: int, run_id: str, model: str) -> None:
    """One run as the driver leaves it (xfer.train.driver, outputs)."""
    fate = FATES.get(i, "complete")
    cfg = config_for(root, f"output.model_name={model}")
    run_uri = cfg.run_uri(run_id)
    _clock.now = T0 + 60 * i
    storage.write_yaml(storage.join(run_uri, CONFIG), resolved_dict(cfg))
    journal.record_start(run_uri, resumed=False, max_failures=0)
    index = IndexWriter(cfg, run_id, run_uri)
    if fate != "unindexed":
        index.started()
    if fate in ("failed", "failure_lost"):
        _clock.now += 30
        journal.record_error(run_uri, None, "RuntimeError: a worker failed")
        if fate == "failed":
            index.failed()
    if fate in ("complete", "unindexed", "commit_lost"):
        metrics = _metrics(run_id, model, i)
        storage.write_json(storage.join(run_uri, METRICS), metrics)
        write_success(run_uri, run_id)
        if fate == "complete":
            index.committed(metrics)


@pytest.fixture(scope="module")
def many_runs(s3_server) -> Runs:
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    root = f"s3://{name}/root"
    ids = [f"raysubmit_{secrets.token_hex(6)}" for _ in range(RUNS)]
    models = ["alpha" if i % 3 else "beta" for i in range(RUNS)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(journal, "_now", lambda: _clock.now)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: _write_run(root, i, ids[i], models[i]), range(RUNS)))
    return Runs(root, ids, models)


def _expected(runs: Runs, model: str | None = None) -> list[int]:
    """Run numbers newest first (by start), of ``model`` if given."""
    return [i for i in reversed(range(RUNS)) if model is None or runs.models[i] == model]


def test_runs_list_reads_only_the_runs_it_shows(many_runs, fault_proxy):
    found = find_runs(many_runs.root, limit=LIMIT)
    requests = fault_proxy.requests()
    unindexed = sum(1 for fate in FATES.values() if fate == "unindexed")
    # Two listings (runs/, runs/_index/: one page each up to 1,000 runs), the models'
    # pointers, at most 5 requests per run shown or without an entry: not 4 per run.
    assert len(requests) <= 6 + 5 * (LIMIT + unindexed), [r.path for r in requests]
    assert len(fault_proxy.requests("LIST")) <= 3 + 2 * (len(SHOWN_STATUS) + unindexed)
    assert found.total == RUNS and len(found.runs) == LIMIT
    # Only the runs shown have their entry read.
    index_gets = fault_proxy.requests("GET", r"/root/runs/_index/.+\.json")
    assert len(index_gets) <= LIMIT


def test_newest_first_by_start_with_every_status_and_runs_without_an_entry(many_runs):
    listed = list_runs(many_runs.root, limit=LIMIT)
    newest = _expected(many_runs)[:LIMIT]
    assert [r.run_id for r in listed] == [many_runs.ids[i] for i in newest]
    for i, r in zip(newest, listed, strict=True):
        assert r.status == SHOWN_STATUS.get(FATES.get(i, ""), "complete"), (i, r)
        assert r.model_name == many_runs.models[i]
    complete = [r for r in listed if r.status == "complete"]
    assert all(r.test_accuracy is not None and r.wall_s for r in complete)
    assert listed[0].where.startswith("starting, last heard")
    # Every run is there with --all, the ones written before the index included, and
    # the index's own folder is not a run.
    everything = list_runs(many_runs.root)
    assert [r.run_id for r in everything] == [many_runs.ids[i] for i in _expected(many_runs)]
    assert storage.list_files(index_prefix(many_runs.root))


def test_model_filter_reads_no_other_models_runs(many_runs, fault_proxy):
    found = find_runs(many_runs.root, model="beta", limit=LIMIT)
    beta = _expected(many_runs, "beta")
    assert [r.run_id for r in found.runs] == [many_runs.ids[i] for i in beta[:LIMIT]]
    assert found.total == len(beta)
    unindexed = sum(1 for fate in FATES.values() if fate == "unindexed")
    assert len(fault_proxy.requests()) <= 6 + 5 * (LIMIT + unindexed)


def test_cli_limit_all_and_the_line_saying_what_was_left_out(many_runs, capsys):
    def xfer_runs_list(*args: str) -> tuple[str, str]:
        assert main(["runs", "list", *args, f"storage.root={many_runs.root}"]) == 0
        out = capsys.readouterr()
        return out.out, out.err

    out, err = xfer_runs_list("--limit", "5")
    rows = out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == [many_runs.ids[i] for i in range(299, 294, -1)]
    assert "showing the newest 5 of 300 runs; --all lists them all" in err
    out, err = xfer_runs_list("--all")
    assert len(out.splitlines()) == 1 + RUNS and "showing" not in err
    with pytest.raises(SystemExit) as refused:
        main(["runs", "list", "--limit", "0"])
    assert (
        refused.value.code == 2 and "--limit: '0' is not a whole number" in capsys.readouterr().err
    )


def test_an_index_write_the_store_refuses_is_a_warning_and_the_run_still_lists(
    bucket, fault_proxy, capsys
):
    """The driver's every index write goes through IndexWriter: refused (403) or not,
    it returns, and the run (with no entry) is listed from its own files."""
    root = f"{bucket}/root"
    cfg = config_for(root, "output.model_name=alpha")
    run_id = "raysubmit_refused"
    run_uri = cfg.run_uri(run_id)
    fault_proxy.add("PUT", r"/runs/_index/", "denied")
    storage.write_yaml(storage.join(run_uri, CONFIG), resolved_dict(cfg))
    journal.record_start(run_uri, resumed=False, max_failures=0)
    index = IndexWriter(cfg, run_id, run_uri)
    index.started()
    metrics = _metrics(run_id, "alpha", 30)
    storage.write_json(storage.join(run_uri, METRICS), metrics)
    write_success(run_uri, run_id)
    index.committed(metrics)
    assert fault_proxy.requests("PUT", r"/runs/_index/")  # it was tried, and refused
    assert "warning: could not write the run index" in capsys.readouterr().out
    assert not storage.list_files(index_prefix(root))
    [run] = list_runs(root)
    assert (run.run_id, run.status, run.test_accuracy) == (run_id, "complete", 0.8)


def test_a_resumed_run_keeps_one_entry_at_its_first_start(bucket, monkeypatch):
    """A failed run resumed by id: the driver's second start rewrites the same entry
    (running again), keyed by the run's first start."""
    root = f"{bucket}/root"
    cfg = config_for(root, "output.model_name=alpha")
    run_id = "raysubmit_resumed"
    run_uri = cfg.run_uri(run_id)
    monkeypatch.setattr(journal, "_now", lambda: _clock.now)
    storage.write_yaml(storage.join(run_uri, CONFIG), resolved_dict(cfg))
    for at, resumed in ((T0, False), (T0 + 3600, True)):
        _clock.now = at
        journal.record_start(run_uri, resumed=resumed, max_failures=0)
        index = IndexWriter(cfg, run_id, run_uri)
        index.started()
        if not resumed:
            _clock.now += 60
            journal.record_error(run_uri, None, "RuntimeError: a worker failed")
            index.failed()
    [entry] = storage.list_files(index_prefix(root))
    assert entry.uri.endswith(f"/alpha/{int(T0 * 1000):015d}-{run_id}.json")
    assert storage.read_json(entry.uri)["status"] == "running"
    [run] = list_runs(root)
    assert (run.status, run.started) == ("running", iso(T0))
    assert run.where == f"starting, last heard {iso(T0 + 3600)}"  # no worker began yet
