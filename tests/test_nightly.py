"""The nightly report beside each committed night: its figures, drift signal and page."""

from __future__ import annotations

from xfer.config import load_config
from xfer.data.synth import synthesize
from xfer.scoring.score import score
from xfer.store import storage

from .test_score import make_inputs


def test_chi_square_p_values():
    from xfer.reports.nightly import chi_square_p

    assert chi_square_p([50, 50], [50, 50]) == 1.0
    assert abs(chi_square_p([41, 37, 42], [10, 11, 26]) - 0.052) < 0.001  # by hand
    assert chi_square_p([40, 0], [15, 15]) < 1e-5
    assert chi_square_p([5, 0], [0, 0]) == 1.0  # nothing to compare with


def test_each_night_gets_a_report_with_errors_and_a_drift_signal(trained_run, session_root, bucket):
    from xfer.reports.nightly import REPORT, SUMMARY

    cfg = load_config(None, [f"storage.root={session_root}", "score.batch_size=4"])
    # A night like the training data (both classes), with three unreadable files.
    make_inputs(f"{bucket}/usual")
    score(cfg, f"{session_root}/models/shapes", f"{bucket}/usual", f"{bucket}/n", "2026-05-01")
    usual = storage.read_json(f"{bucket}/n/dt=2026-05-01/{SUMMARY}")
    assert usual["rows"] == 11 and usual["errors"] == 3 and len(usual["error_examples"]) == 3
    assert sum(usual["error_reasons"].values()) == 3
    assert sum(usual["night"]["per_class"].values()) == usual["night"]["scored"] == 8
    assert sum(usual["night"]["confidence_histogram"]) == 8
    test_split = usual["test_split"]
    assert test_split["scored"] == trained_run.metrics["test"]["examples"]
    # A night of one kind of image only: the predicted mix moves away from the test split's.
    # 200 of them: the test split it is compared with has only 14 images, so a smaller
    # night leaves the p-value near the bar when the tiny model mistakes a few rings.
    synthesize(f"{bucket}/odd", ["ring", "star"], per_class=200, size=60, seed=7)
    storage.delete_prefix(f"{bucket}/odd/star")
    score(cfg, f"{session_root}/models/shapes", f"{bucket}/odd", f"{bucket}/n", "2026-05-02")
    odd = storage.read_json(f"{bucket}/n/dt=2026-05-02/{SUMMARY}")
    assert odd["errors"] == 0
    assert odd["drift"]["class_shift"] > usual["drift"]["class_shift"]
    assert odd["drift"]["class_shift"] > 0.15 and odd["drift"]["class_shift_p_value"] < 0.01
    assert odd["drift"]["flagged"]
    page = storage.read_text(f"{bucket}/n/dt=2026-05-02/{REPORT}")
    assert "look at tonight's images" in page and "confidence histogram" in page
    usual_page = storage.read_text(f"{bucket}/n/dt=2026-05-01/{REPORT}")
    assert "bad/notes.txt" in usual_page and "not an image" in usual_page
    # The report files do not disturb a table over the partition (names start with _).
    marker = storage.read_json(f"{bucket}/n/dt=2026-05-01/_SUCCESS")
    assert all(not f.startswith("_") for f in marker["files"])
