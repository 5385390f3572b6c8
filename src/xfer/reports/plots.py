"""The report's plots, as embedded PNG data URIs (matplotlib, headless).

:func:`png` turns a figure into a ``data:image/png`` URI; the run report
(:mod:`xfer.reports.report`) and the nightly report (:mod:`xfer.reports.nightly`) embed them, so each
report is one self-contained HTML file.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np


def png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def learning_curves(history: dict[str, list[dict[str, float]]]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(phase, r) for phase in ("head", "fine_tune") for r in history.get(phase, [])]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(1, len(rows) + 1)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for prefix, style in (("", "-o"), ("val_", "--s")):
            ys = [r.get(prefix + metric, np.nan) for _, r in rows]
            if not all(np.isnan(ys)):
                ax.plot(
                    x,
                    ys,
                    style,
                    label=("validation " if prefix else "train ") + metric,
                    markersize=4,
                )
        n_head = len(history.get("head", []))
        if 0 < n_head < len(rows):
            ax.axvline(n_head + 0.5, color="grey", linestyle=":", label="fine-tuning starts")
        ax.set_xlabel("epoch (head, then fine-tune)")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return png(fig)


def confusion_plot(cm: list[list[int]], classes: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = np.array(cm)
    size = max(3.5, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(arr, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            ax.text(
                j,
                i,
                str(arr[i, j]),
                ha="center",
                va="center",
                color="white" if arr[i, j] > arr.max() / 2 else "black",
            )
    ax.set_title("test confusion matrix")
    return png(fig)


def reliability_plot(cal: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    bins = cal["bins"]
    ax.bar(
        [(b["low"] + b["high"]) / 2 for b in bins],
        [b["accuracy"] for b in bins],
        width=[b["high"] - b["low"] for b in bins],
        edgecolor="black",
        alpha=0.7,
        label="accuracy in the bin",
    )
    for b in bins:
        ax.text((b["low"] + b["high"]) / 2, 0.02, str(b["count"]), ha="center", fontsize=7)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ece = cal.get("ece")
    ax.set_title(f"reliability (ECE {ece:.3f})" if ece is not None else "reliability")
    ax.legend(loc="upper left", fontsize=8)
    return png(fig)
