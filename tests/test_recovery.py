"""Recovery, proven by killing real training workers with SIGKILL at every failure point.

Each case runs the same small two-phase training (2 Ray workers under MWMS, the head
phase on the feature cache) with one rank told to stop at a point and wait; the test
reads that worker's pid from ``<run>/_fault_injected`` and sends SIGKILL, as an
OOM killer or a lost machine would. Ray Train restarts the worker group
(``cluster.max_failures``) and the run must then:

- end committed (``_SUCCESS``);
- record the failure in ``metrics.json`` (stage, phase, epoch, rank, time, epochs redone);
- lose at most one finished epoch (here none: the kill comes seconds after the last
  checkpoint was reported, so Ray Train has registered it);
- go on with the right optimizer: the phase's own learning rate, and the step count
  of the checkpoint (zero at a phase boundary);
- reach a test accuracy within ``ACCURACY_TOLERANCE`` of the uninterrupted run with
  the same seed (the same data order; only the augmentation draws after a restart
  differ).
"""

from __future__ import annotations

import os
import signal

import pytest

from xfer.config import load_config
from xfer.store import storage
from xfer.train.driver import train

from .conftest import train_overrides
from .faultwatch import FaultWatcher

pytestmark = pytest.mark.slow

HEAD_LR, FT_LR = 0.005, 0.0003
EPOCHS = {"head": 3, "fine_tune": 2}
# The test split has 14 images: one image is 7 points. A resumed run may differ from
# the uninterrupted one by the augmentation it draws after the restart; two images
# either way is noise, more would be a resume that lost or corrupted training.
ACCURACY_TOLERANCE = 2 / 14 + 1e-9


def _overrides(root: str, weights: str, **extra: object) -> list[str]:
    settings = {
        "model.head.features": "cached",
        "train.head.epochs": EPOCHS["head"],
        "train.head.learning_rate": HEAD_LR,
        "train.fine_tune.epochs": EPOCHS["fine_tune"],
        "train.fine_tune.learning_rate": FT_LR,
        "cluster.max_failures": 2,
        "output.model_name": "shapes-recovery",
        "output.publish": "false",
        "output.predictions": "false",
        "train.seed": 3,
    }
    return train_overrides(root, weights, **{**settings, **extra})


def run_with_kill(root: str, weights: str, **fault: object):
    def kill(info: dict) -> None:
        os.kill(info["pid"], signal.SIGKILL)

    with FaultWatcher(root, kill) as watch:
        result = train(load_config(None, _overrides(root, weights, **fault)))
    assert watch.fired is not None, "the worker never reached its fault point"
    return result, watch.fired


@pytest.fixture(scope="module")
def uninterrupted(session_root, pretrained_weights, target_dataset):
    return train(load_config(None, _overrides(session_root, pretrained_weights)))


def expected_optimizer(resumed_from: dict | None, steps: int) -> tuple[float, int]:
    """Learning rate and step count the resumed attempt must go on with."""
    if resumed_from is None:
        return HEAD_LR, 0
    phase, epoch = resumed_from["phase"], resumed_from["epoch"]
    if phase == "head" and epoch == EPOCHS["head"]:
        return FT_LR, 0  # a phase boundary: a new optimizer
    return (HEAD_LR if phase == "head" else FT_LR), epoch * steps


# (fault settings, expected stage, phase and 1-based epoch the run failed in)
CASES = {
    "feature_cache": (
        {"fault.point": "feature_cache", "fault.rank": 1},
        ("feature_cache", None, None),
    ),
    "mid_head": (
        {"fault.point": "batch", "fault.phase": "head", "fault.epoch": 1, "fault.rank": 0},
        ("train", "head", 2),
    ),
    "first_fine_tune_epoch": (
        {"fault.point": "batch", "fault.phase": "fine_tune", "fault.epoch": 0, "fault.rank": 1},
        ("train", "fine_tune", 1),
    ),
    "mid_fine_tune": (
        {"fault.point": "batch", "fault.phase": "fine_tune", "fault.epoch": 1, "fault.rank": 1},
        ("train", "fine_tune", 2),
    ),
    "test_evaluation": (
        {"fault.point": "test_evaluation", "fault.rank": 0},
        ("test_evaluation", None, None),
    ),
    "model_save": ({"fault.point": "model_save", "fault.rank": 1}, ("model_save", None, None)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_at_each_failure_point_recovers(
    case, uninterrupted, session_root, pretrained_weights
):
    fault, (stage, phase, epoch) = CASES[case]
    if case == "feature_cache":  # make the run build the cache, not hit it
        storage.delete_prefix(uninterrupted.metrics["feature_cache"]["uri"])
    fault = {**fault, "fault.action": "hang"}
    result, killed = run_with_kill(session_root, pretrained_weights, **fault)
    m = result.metrics
    assert storage.exists(f"{result.run_uri}/_SUCCESS")
    assert killed["rank"] == fault["fault.rank"]

    [failure] = m["failures"]
    assert (failure["stage"], failure["phase"], failure["epoch"]) == (stage, phase, epoch)
    assert failure["rank"] == killed["rank"], failure
    assert failure["resumed_by"] == "ray_train_restart" and failure["at"]
    assert failure["epochs_redone"] <= 1, failure
    # Where it resumed: the last finished epoch before the failure (or one earlier,
    # which the epochs_redone count must then show).
    finished = {"feature_cache": 0, "test_evaluation": 5, "model_save": 5}.get(
        stage, (EPOCHS["head"] if phase == "fine_tune" else 0) + (epoch or 1) - 1
    )
    start = failure["resumed_from"]
    at = (
        0
        if start is None
        else start["epoch"] + (EPOCHS["head"] if start["phase"] == "fine_tune" else 0)
    )
    assert finished - at == failure["epochs_redone"], failure
    lr, iterations = expected_optimizer(start, m["steps_per_epoch"])
    opt = failure["optimizer_after_resume"]
    assert opt["learning_rate"] == pytest.approx(lr) and opt["iterations"] == iterations, failure

    # Every epoch once, each at its phase's own learning rate.
    for name, rate in (("head", HEAD_LR), ("fine_tune", FT_LR)):
        rows = m["history"][name]
        assert [r["epoch"] for r in rows] == list(range(1, EPOCHS[name] + 1))
        assert all(r["learning_rate"] == pytest.approx(rate) for r in rows), rows
    reference = uninterrupted.test_accuracy
    assert abs(result.test_accuracy - reference) <= ACCURACY_TOLERANCE, (
        result.test_accuracy,
        reference,
    )
    assert f"failure (attempt {failure['attempt']})" in result.describe()
    report = storage.read_text(f"{result.run_uri}/report.html")
    assert "<h2>Failures</h2>" in report and f"<td>{stage}" in report


def test_uninterrupted_run_records_no_failure(uninterrupted):
    m = uninterrupted.metrics
    assert m["failures"] == []
    assert [r["learning_rate"] for r in m["history"]["fine_tune"]] == pytest.approx([FT_LR] * 2)


def test_a_finished_run_that_lost_its_success_marker_resumes(
    uninterrupted, session_root, pretrained_weights
):
    """Every phase done, outputs written, _SUCCESS gone: the resume by id evaluates,
    saves and commits again from the final checkpoint, training nothing twice."""
    run_uri = uninterrupted.run_uri
    storage.delete(f"{run_uri}/_SUCCESS")
    result = train(
        load_config(
            None,
            [
                *_overrides(session_root, pretrained_weights),
                f"output.run_id={uninterrupted.run_id}",
            ],
        )
    )
    assert storage.exists(f"{run_uri}/_SUCCESS")
    m = result.metrics
    assert m["failures"] == []  # the first attempt had completed; nothing failed
    assert m["history"] == uninterrupted.metrics["history"]
    assert result.test_accuracy == uninterrupted.test_accuracy
    assert m["test"]["loss"] == pytest.approx(uninterrupted.metrics["test"]["loss"], rel=1e-5)
