"""Temperature scaling: probabilities that mean what they say.

A network trained with cross-entropy is usually over-confident: of the images it
gives 0.99, fewer than 99% are right. Temperature scaling (Guo et al., 2017) divides
the logits by one number ``T`` fitted on held-out labelled images (the validation
split, after training) to minimise their negative log-likelihood. ``T`` > 1 softens,
``T`` < 1 sharpens; the predicted class never changes (dividing by ``T`` > 0 keeps
the order of the logits), so accuracy, the gate and the confusion matrix are
unchanged, and only the probabilities move.

The model's outputs are probabilities (sigmoid or softmax), so the logits are taken
back as ``log p`` (a softmax is invariant to the constant that drops): for a binary
model ``[1 - p, p]`` gives ``softmax(log([1-p, p]) / T) = sigmoid(logit(p) / T)``.
Probabilities are clipped at :data:`EPS` first, so a saturated 1.0 stays finite.
Scoring (numpy, :func:`apply_temperature`) and the SavedModel export (in the graph,
:mod:`xfer.models.export`) apply exactly this.

``T`` is stored in the model's record (``model/model_info.json`` → ``calibration``);
a model without it is uncalibrated (``T`` = 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-7
# A temperature outside this range says more about the validation split (a handful of
# images, all right with certainty) than about the model: the fit stops at the bound.
T_BOUNDS = (0.05, 20.0)
# Fewer validation images than this and the fitted T is noise: the model stays uncalibrated.
MIN_EXAMPLES = 10


def apply_temperature(probs: Any, temperature: float) -> Any:
    """``softmax(log(clip(p)) / T)`` row by row, for probabilities ``[n, classes]``."""
    p = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0 or p.size == 0:
        return p
    logits = np.log(np.clip(p, EPS, 1.0)) / float(temperature)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: Any, labels: Any) -> float:
    """Mean negative log-likelihood of the true classes."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], EPS, 1.0))))


def fit_temperature(probs: Any, labels: Any) -> float:
    """The ``T`` minimising the NLL of ``labels`` under ``apply_temperature(probs, T)``.

    One bounded scalar minimisation over ``log T`` (scipy), which is convex in the
    logits; the same probabilities and labels always give the same ``T``.
    """
    from scipy.optimize import minimize_scalar

    lo, hi = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    result = minimize_scalar(
        lambda log_t: nll(apply_temperature(probs, float(np.exp(log_t))), labels),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(np.exp(result.x))


def expected_calibration_error(probs: Any, labels: Any, bins: int = 10) -> float | None:
    """ECE of the top-class probability, as the report's reliability table bins it."""
    from xfer.reports.report import calibration

    p = np.asarray(probs, dtype=np.float64)
    if not len(p):
        return None
    top = p.argmax(axis=1)
    return calibration(p.max(axis=1).tolist(), (top == np.asarray(labels)).tolist(), bins=bins)[
        "ece"
    ]


def calibrate(probs: Any, labels: Any, split: str = "val") -> dict[str, Any]:
    """The calibration record of a model: ``T`` and what it did on the images it was fitted on.

    Too few images (< :data:`MIN_EXAMPLES`) leave the model uncalibrated, and say so.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    record: dict[str, Any] = {"method": "temperature", "fitted_on": split, "examples": len(y)}
    if len(y) < MIN_EXAMPLES:
        reason = f"the {split} split has {len(y)} scored images (fewer than {MIN_EXAMPLES})"
        return {**record, "temperature": 1.0, "calibrated": False, "reason": reason}
    t = fit_temperature(p, y)
    after = apply_temperature(p, t)
    return {
        **record,
        "temperature": t,
        "calibrated": True,
        "nll_before": nll(p, y),
        "nll_after": nll(after, y),
        "ece_before": expected_calibration_error(p, y),
        "ece_after": expected_calibration_error(after, y),
    }


def temperature_of(info: dict[str, Any]) -> float | None:
    """``T`` from a model record (``model_info.json``); None when it was never calibrated."""
    cal = info.get("calibration") or {}
    return float(cal["temperature"]) if cal.get("calibrated") else None


def file_metadata(temperature: float | None) -> dict[str, str]:
    """What a predictions file says of its probabilities (Parquet schema metadata)."""
    if temperature is None:
        return {"xfer.probabilities": "uncalibrated"}
    return {"xfer.probabilities": "calibrated", "xfer.temperature": repr(float(temperature))}
