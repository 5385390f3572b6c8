"""Published-model pointers and the run commit, against the real embedded S3 (and a
local root): promote and rollback, two publishers racing for ``latest.json``, a
pointer to a run that is gone, what `xfer runs list` says of a resumed run, and
(slow, real training) a challenger keeping its own test predictions and a run whose
publication failed finishing it when resumed."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from xfer.config import load_config
from xfer.data.manifest import Manifest, SplitInfo
from xfer.errors import XferError
from xfer.registry import layout
from xfer.registry.layout import PointerMoved, publish_pointer, read_pointer_for_update
from xfer.registry.runs import promote, rollback, show, summarize
from xfer.store import storage
from xfer.store.commit import SUCCESS
from xfer.train.gate import gate_and_publish
from xfer.train.journal import JOURNAL, recorded_dataset

from .conftest import config_for, run_xfer
from .test_runs import xfer_runs

MODEL = "ptr"


def fake_run(root: str, run_id: str, passed: bool = True, value: float = 0.9) -> str:
    """A committed run as training leaves one, minus the weights: what pointers read."""
    uri = layout.run_uri(root, run_id)
    storage.write_yaml(f"{uri}/{layout.CONFIG}", {"output": {"model_name": MODEL}})
    storage.write_json(
        f"{uri}/{layout.MODEL_DIR}/{layout.MODEL_INFO}",
        {"file": layout.MODEL_FILE, "classes": ["ring", "star"], "image_size": 8},
    )
    gate = {"metric": "test_accuracy", "value": value, "passed": passed, "min_test_accuracy": 0.5}
    storage.write_json(
        f"{uri}/{layout.METRICS}", {"run_id": run_id, "model_name": MODEL, "gate": gate}
    )
    layout.write_success(uri, run_id)
    return uri


def latest(root: str) -> dict[str, Any]:
    return storage.read_json(f"{layout.model_uri(root, MODEL)}/{layout.LATEST}")


def history(root: str) -> list[dict[str, Any]]:
    return layout.history(layout.model_uri(root, MODEL))


def test_promoting_the_published_run_again_changes_nothing_and_rollback_reaches_the_run_before(
    root,
):
    for run in ("A", "B"):
        fake_run(root, run)
    promote(root, "A")
    first = xfer_runs(root, "promote", "B", "--force")
    again = xfer_runs(root, "promote", "B", "--force")
    assert first.returncode == 0 and again.returncode == 0, again.stderr
    assert "already the published ptr: nothing changed" in again.stdout
    assert [p["run_id"] for p in history(root)] == ["A", "B"]
    assert latest(root)["previous_run_id"] == "A"
    back = xfer_runs(root, "rollback", MODEL)
    assert back.returncode == 0, back.stderr
    assert latest(root)["run_id"] == "A" and latest(root)["rolled_back_from"] == "B"


def test_rollback_skips_a_run_that_was_published_twice_in_a_row(root):
    """Histories written before promote became idempotent hold B after B."""
    for run in ("A", "B"):
        fake_run(root, run)
    model = layout.model_uri(root, MODEL)
    for run, previous in (("A", None), ("B", "A"), ("B", "B")):
        uri = layout.run_uri(root, run)
        publish_pointer(model, MODEL, run, uri, "test_accuracy", 0.9, previous_run_id=previous)
    pointer = rollback(root, MODEL)
    assert pointer["run_id"] == "A" and pointer["previous_run_id"] is None
    with pytest.raises(XferError, match="nothing to roll back to"):
        rollback(root, MODEL)


def test_of_two_publishers_that_read_the_same_champion_exactly_one_wins(root):
    for run in ("A", "B", "C"):
        fake_run(root, run)
    promote(root, "A")
    model = layout.model_uri(root, MODEL)
    seen = read_pointer_for_update(model)  # both compared with A
    start = threading.Barrier(2)
    won: list[str] = []
    lost: dict[str, str | None] = {}

    def publish(run: str) -> None:
        start.wait()
        try:
            publish_pointer(
                model, MODEL, run, layout.run_uri(root, run), "test_accuracy", 0.9, seen
            )
            won.append(run)
        except PointerMoved as exc:
            lost[run] = exc.current

    threads = [threading.Thread(target=publish, args=(run,)) for run in ("B", "C")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 1, (won, lost)
    assert list(lost.values()) == won  # the loser names the winner
    assert latest(root)["run_id"] == won[0] and latest(root)["previous_run_id"] == "A"
    assert [p["run_id"] for p in history(root)] == ["A", won[0]]


def test_a_first_publication_does_not_overwrite_one_made_meanwhile(root):
    """No pointer when read: the PUT must find none (If-None-Match)."""
    for run in ("A", "B"):
        fake_run(root, run)
    model = layout.model_uri(root, MODEL)
    seen = read_pointer_for_update(model)
    assert seen.pointer is None
    promote(root, "A")
    with pytest.raises(PointerMoved) as moved:
        publish_pointer(model, MODEL, "B", layout.run_uri(root, "B"), "test_accuracy", 0.9, seen)
    assert moved.value.current == "A" and latest(root)["run_id"] == "A"


def gate_config(root: str, vs_published: bool):
    return config_for(
        root,
        f"output.model_name={MODEL}",
        "output.gate.min_test_accuracy=0.5",
        f"output.gate.vs_published={str(vs_published).lower()}",
    )


def test_the_gate_publishes_only_over_the_champion_it_read(root):
    for run in ("A", "B", "C"):
        fake_run(root, run)
    promote(root, "A")
    cfg = gate_config(root, vs_published=False)
    seen = read_pointer_for_update(cfg.model_uri())  # run B's gate begins: the champion is A
    promote(root, "C")  # meanwhile
    gate = gate_and_publish(
        cfg,
        None,
        "B",
        layout.run_uri(root, "B"),
        {},
        "test_accuracy",
        0.9,
        seen,  # type: ignore[arg-type]
    )
    assert gate["passed"] and not gate["published"]
    assert gate["lost_race"] == {"compared_with": "A", "champion_now": "C"}
    assert latest(root)["run_id"] == "C"
    run = layout.run_uri(root, "B")  # metrics.json records it; `xfer runs show` says it
    storage.write_json(f"{run}/{layout.METRICS}", {"run_id": "B", "gate": gate})
    assert "not published: the champion changed to C while this run was gated" in show(root, "B")


def test_a_pointer_to_a_deleted_run_is_replaced_with_a_warning(root, capsys):
    for run in ("A", "B"):
        fake_run(root, run)
    promote(root, "A")
    storage.delete_prefix(layout.run_uri(root, "A"))
    cfg = gate_config(root, vs_published=True)
    gate = gate_and_publish(
        cfg,
        None,
        "B",
        layout.run_uri(root, "B"),
        {"accuracy": 0.9},
        "test_accuracy",
        0.9,  # type: ignore[arg-type]
    )
    vs = gate["vs_published"]
    assert vs["run_id"] == "A" and vs["missing"] and vs["beaten"]
    assert gate["published"] and latest(root)["run_id"] == "B"
    assert "warning: gate: the champion run A is missing" in capsys.readouterr().out


def test_a_resumed_run_is_listed_as_running_not_failed(root):
    uri = fake_run(root, "R")
    storage.delete(f"{uri}/{SUCCESS}")
    journal = f"{uri}/{JOURNAL}"
    stage = {"name": "train", "phase": "head", "epoch": 2}
    storage.write_json(f"{journal}/attempt-00001.json", {"attempt": 1, "started_at": 1000.0})
    storage.write_json(f"{journal}/error-{1500 * 1000:015d}-driver.json", {"at": 1500.0})
    assert summarize(root, "R").status == "failed"
    storage.write_json(
        f"{journal}/attempt-00002.json",
        {"attempt": 2, "started_at": 2000.0, "stage": stage, "updated_at": 2100.0},
    )
    assert summarize(root, "R").status == "running"


# ------------------------------------------------------------ real training runs

QUICK = {
    "output.model_name": "ptr-trained",
    "train.head.epochs": 1,
    "train.fine_tune.epochs": 0,
    "output.gate.min_test_accuracy": 0.0,
}


@pytest.mark.slow
def test_a_challenger_keeps_its_test_predictions_and_a_failed_publication_finishes_on_resume(
    bucket, pretrained_weights, target_dataset, s3_server, monkeypatch
):
    """The champion scored into gate/ leaves the run's predictions/test.parquet alone
    (the nightly report reads it); a publication the store refused leaves the run
    uncommitted, and resuming it by id publishes it."""
    from xfer.train.driver import train

    from .conftest import train_overrides
    from .faultproxy import FaultProxy

    root = f"{bucket}/xfer"

    def overrides(**extra: object) -> list[str]:
        settings = {**QUICK, "data.dataset": target_dataset, **extra}
        return train_overrides(root, pretrained_weights, **settings)

    champion = train(load_config(None, overrides()))
    assert champion.published
    # Not worse beyond noise than the champion it equals: published.
    challenger = overrides(**{"output.gate.vs_published": "true", "output.gate.mode": "not_worse"})
    with FaultProxy(s3_server.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        # Refused (403): a 5xx would be ridden out for storage.outage_seconds first.
        refused = proxy.add("PUT", r"/models/ptr-trained/latest\.json", "denied")
        with pytest.raises(XferError):
            train(load_config(None, challenger))
        assert refused.hits > 0
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    run_id = next(r for r in storage.list_dirs(layout.runs_prefix(root)) if r != champion.run_id)
    run = layout.run_uri(root, run_id)
    model = layout.model_uri(root, "ptr-trained")
    assert not storage.exists(f"{run}/{SUCCESS}") and not storage.exists(f"{run}/metrics.json")
    assert storage.read_json(f"{model}/latest.json")["run_id"] == champion.run_id

    resumed = train(load_config(None, [*challenger, f"output.run_id={run_id}"]))
    assert resumed.published and resumed.metrics["gate"]["published"]
    assert resumed.metrics["gate"]["vs_published"]["run_id"] == champion.run_id
    assert storage.read_json(f"{model}/latest.json")["run_id"] == run_id
    assert storage.exists(f"{run}/{SUCCESS}")
    for kept in ("predictions/test.parquet", "predictions/_SUCCESS", "gate/published-test.parquet"):
        assert storage.exists(f"{run}/{kept}"), kept
    # The dataset the run started on, which a resume must find unchanged.
    lineage = storage.read_json(f"{run}/lineage.json")["dataset"]
    assert recorded_dataset(run)["manifest_checksum"] == lineage["manifest_checksum"]


def write_tiny_dataset(root: str, rows: int) -> Manifest:
    """A manifest (no shards needed: the resume is refused before any read)."""
    counts = {"ring": rows, "star": rows}
    manifest = Manifest(
        name="tiny",
        classes=["ring", "star"],
        splits={"train": SplitInfo(rows=2 * rows, shards=[], class_counts=counts)},
        source={},
        settings={},
        rejected={},
        uri=layout.dataset_uri(root, "tiny"),
    )
    storage.write_bytes(f"{manifest.uri}/manifest.json", manifest.to_json())
    return manifest


def test_a_resume_on_a_changed_dataset_is_refused(root):
    from xfer.config import resolved_dict
    from xfer.train.journal import record_dataset

    overrides = [
        f"storage.root={root}",
        "data.dataset=tiny",
        "model.weights=none",
        "train.fine_tune.epochs=0",
        f"output.model_name={MODEL}",
    ]
    first = write_tiny_dataset(root, rows=5)
    run = layout.run_uri(root, "R")
    storage.write_yaml(f"{run}/{layout.CONFIG}", resolved_dict(load_config(None, overrides)))
    record_dataset(run, first.uri, first.checksum)  # as the run's first attempt did
    changed = write_tiny_dataset(root, rows=6)
    out = run_xfer("train", *overrides, "output.run_id=R")
    assert out.returncode == 2, out.stderr[-2000:]
    [line] = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert "the dataset" in line and "changed since the run started" in line
    assert first.checksum[:12] in line and changed.checksum[:12] in line
