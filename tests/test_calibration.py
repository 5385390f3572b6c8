"""Temperature scaling: fitted on the validation split, kept in the model's record,
applied by scoring (and the SavedModel export), and said in every predictions file.

The statistics are checked on a model whose over-confidence is known (its logits are
the truth's times 3), fitted on one half and measured on the other; the plumbing on
the session's real trained run.
"""

from __future__ import annotations

import numpy as np
import pytest

from xfer.config import load_config
from xfer.models.calibration import (
    apply_temperature,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    nll,
)
from xfer.registry import layout
from xfer.store import storage
from xfer.train.outputs import labelled_probabilities


def overconfident(n: int, seed: int, factor: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z); the model says sigmoid(factor * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    p = 1 / (1 + np.exp(-factor * z))
    return np.stack([1 - p, p], axis=1), labels


def test_the_temperature_fitted_on_one_split_lowers_the_ece_on_another():
    fit_probs, fit_labels = overconfident(2000, seed=1)
    held_probs, held_labels = overconfident(2000, seed=2)
    t = fit_temperature(fit_probs, fit_labels)
    assert t == pytest.approx(3.0, rel=0.15)
    before = expected_calibration_error(held_probs, held_labels)
    after = expected_calibration_error(apply_temperature(held_probs, t), held_labels)
    assert after < before / 2, (before, after)
    assert nll(apply_temperature(held_probs, t), held_labels) < nll(held_probs, held_labels)
    # The predicted class never changes: accuracy, the gate and the confusion matrix stay.
    assert (apply_temperature(held_probs, t).argmax(1) == held_probs.argmax(1)).all()


def test_an_underconfident_model_is_sharpened_and_multiclass_works_too():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (3000, 4))
    labels = np.array([rng.choice(4, p=np.exp(r) / np.exp(r).sum()) for r in logits])
    soft = np.exp(logits / 2.5)
    soft /= soft.sum(axis=1, keepdims=True)
    t = fit_temperature(soft[:1500], labels[:1500])
    assert t == pytest.approx(1 / 2.5, rel=0.15)
    after = expected_calibration_error(apply_temperature(soft[1500:], t), labels[1500:])
    assert after < expected_calibration_error(soft[1500:], labels[1500:])


def test_too_few_images_leave_the_model_uncalibrated_and_say_why():
    probs, labels = overconfident(6, seed=4)
    record = calibrate(probs, labels)
    assert not record["calibrated"] and record["temperature"] == 1.0
    assert "6 scored images" in record["reason"]


@pytest.mark.slow
def test_a_run_is_calibrated_on_its_validation_split_and_scoring_applies_it(
    trained_run, target_dataset, session_root, ray_local
):
    from xfer.data.manifest import load_manifest
    from xfer.registry.layout import resolve_model
    from xfer.scoring.score import write_predictions

    info = storage.read_json(f"{trained_run.run_uri}/{layout.MODEL_DIR}/{layout.MODEL_INFO}")
    record = info["calibration"]
    val = load_manifest(target_dataset).splits["val"].rows
    assert record["calibrated"] and record["fitted_on"] == "val" and record["examples"] == val
    assert record["nll_after"] <= record["nll_before"] + 1e-12
    t = record["temperature"]
    assert trained_run.metrics["calibration"]["temperature"] == t

    # The run's test predictions say they are calibrated, and are: the network's own
    # probabilities (scored with score.calibrated=false) with T applied.
    table = storage.read_parquet(f"{trained_run.run_uri}/{layout.PREDICTIONS}/test.parquet")
    meta = table.schema.metadata
    assert meta[b"xfer.probabilities"] == b"calibrated"
    assert float(meta[b"xfer.temperature"]) == t
    ref = resolve_model(trained_run.run_uri)
    assert ref.temperature == t
    from xfer.raycluster import ensure_ray

    ensure_ray(num_cpus=2)  # a CLI test's error path may have stopped the session's Ray
    raw_uri = f"{session_root}/scratch/uncalibrated"
    sc = load_config(None, ["score.calibrated=false"]).score
    write_predictions(ref, target_dataset, sc, raw_uri, single_file="t.parquet", split="test")
    raw = storage.read_parquet(f"{raw_uri}/t.parquet")
    assert raw.schema.metadata[b"xfer.probabilities"] == b"uncalibrated"
    by_key = dict(zip(raw.column("key").to_pylist(), labelled_probabilities(raw)[0], strict=True))
    probs, _ = labelled_probabilities(table)
    expected = apply_temperature(np.stack([by_key[k] for k in table.column("key").to_pylist()]), t)
    np.testing.assert_allclose(probs, expected, atol=1e-9)
    cal = trained_run.metrics["test"]["calibration"]
    assert cal["calibrated"] and cal["temperature"] == t
    assert cal["ece_uncalibrated"] == pytest.approx(
        expected_calibration_error(
            np.stack(list(by_key.values())), raw.column("true_index").to_numpy()
        ),
        abs=1e-6,
    )
    assert "probabilities calibrated: temperature" in trained_run.describe()
    report = storage.read_text(f"{trained_run.run_uri}/{layout.REPORT}")
    assert f"T = {t:.3f}" in report
