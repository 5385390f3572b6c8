"""The nightly report, next to each predictions partition: ``_summary.json`` and ``_report.html``.

    summary = write_nightly_report(partition_uri, classes, run_uri)   # writes both files
    report_night(partition_uri, classes, run_uri)   # the same, after a commit: a failure
                                                    # is one warning line, not an error

Per night: images scored, error rows (grouped by reason, with examples), counts and
shares per predicted class, the confidence histogram; and the same figures for the
model's own test split (``<run>/predictions/test.parquet``, scored by the same code
when the model was trained), with two simple drift signals. The night and the test
split are read part by part (:mod:`xfer.reports.nightstats`): the driver keeps counts, never
their rows. The drift signals:

- ``class_shift``: total variation distance between the predicted-class shares of the
  night and of the test split (0: the same mix, 1: no class in common);
- ``confidence_drop``: how much lower the night's mean confidence is.

A night is flagged when its class mix moved by more than 0.15 *and* by more than the
two sample sizes explain (a chi-square test of the two count vectors, p < 0.01: a
test split of a few dozen images differs from any night by chance), or when its mean
confidence dropped by more than 0.1. Not a verdict: a reason to look (new kinds of
images, a broken camera, a pipeline change).
A night of 0 images (an empty or missing input folder) is flagged too: its summary's
``look_at`` says "0 images". Names starting with ``_`` are ignored by Athena, Spark
and Hive, so the report does not disturb a table over the partition. Both files are
single PUTs after the commit: the night is committed whether or not they get
written (:func:`report_night` warns), and running the date again writes a missing
report without scoring again (:func:`committed_without_report`).
"""

from __future__ import annotations

import html
import json
import sys
from typing import Any

import numpy as np

from xfer.registry.layout import PREDICTIONS
from xfer.reports.nightstats import BINS, figures, read_stats
from xfer.store import storage
from xfer.store.commit import SUCCESS

CLASS_SHIFT_LIMIT = 0.15
CONFIDENCE_DROP_LIMIT = 0.10
SIGNIFICANCE = 0.01
SUMMARY = "_summary.json"
REPORT = "_report.html"


def _probabilities(summary: dict[str, Any]) -> str:
    t = summary.get("temperature")
    if summary.get("probabilities") == "calibrated" and t is not None:
        return f"calibrated (temperature {float(t):.3f})"
    return "uncalibrated (the network's own)"


def summarize_night(partition: str, classes: list[str], run_uri: str) -> dict[str, Any]:
    """The night's figures, streamed part by part (:mod:`xfer.reports.nightstats`), beside the
    model's test split's."""
    marker = storage.read_json(storage.join(partition, SUCCESS))
    stats = read_stats([storage.join(partition, f) for f in marker["files"]])
    night = figures(stats.scored, classes)
    summary: dict[str, Any] = {
        "partition": partition,
        "run_id": marker.get("run_id"),
        "model_name": marker.get("model_name"),
        "scored_at": marker.get("scored_at"),
        "input": marker.get("input"),
        "probabilities": marker.get("probabilities", "uncalibrated"),
        "temperature": marker.get("temperature"),
        "rows": stats.rows,
        "errors": stats.errors,
        "error_reasons": dict(stats.reasons.most_common(10)),
        "error_examples": stats.examples,
        "night": night,
        "test_split": None,
        "drift": None,
    }
    test_uri = storage.join(run_uri, PREDICTIONS, "test.parquet")
    if storage.exists(test_uri):
        ref = figures(read_stats([test_uri]).scored, classes)
        summary["test_split"] = ref
        summary["drift"] = drift(night, ref, classes)
    summary["look_at"] = _look_at(summary)
    return summary


def drift(night: dict[str, Any], ref: dict[str, Any], classes: list[str]) -> dict[str, Any] | None:
    """The two drift signals of a night against the test split (None: one scored nothing)."""
    if not (night["scored"] and ref["scored"]):
        return None
    shift = 0.5 * sum(abs(night["shares"][c] - ref["shares"][c]) for c in classes)
    drop = (ref["mean_confidence"] or 0) - (night["mean_confidence"] or 0)
    p = chi_square_p(
        [night["per_class"][c] for c in classes], [ref["per_class"][c] for c in classes]
    )
    moved = shift > CLASS_SHIFT_LIMIT and p < SIGNIFICANCE
    return {
        "class_shift": shift,
        "class_shift_p_value": p,
        "confidence_drop": drop,
        "flagged": bool(moved or drop > CONFIDENCE_DROP_LIMIT),
        "limits": {
            "class_shift": CLASS_SHIFT_LIMIT,
            "p_value": SIGNIFICANCE,
            "confidence_drop": CONFIDENCE_DROP_LIMIT,
        },
    }


def _look_at(summary: dict[str, Any]) -> list[str]:
    """What a person should look at tonight, each as one phrase (none: nothing)."""
    out = []
    if summary["rows"] == 0:
        out.append(f"0 images: nothing to score in {summary['input']} (a late or missing upload?)")
    if summary["drift"] and summary["drift"]["flagged"]:
        out.append("drift flagged: look at tonight's images")
    return out


def chi_square_p(a: list[int], b: list[int]) -> float:
    """p-value that counts ``a`` and ``b`` come from one class mix (chi-square, 2 x k)."""
    cols = [(x, y) for x, y in zip(a, b, strict=True) if x + y > 0]
    na, nb = sum(x for x, _ in cols), sum(y for _, y in cols)
    if len(cols) < 2 or not na or not nb:
        return 1.0
    n = na + nb
    stat = 0.0
    for x, y in cols:
        for observed, total in ((x, na), (y, nb)):
            expected = total * (x + y) / n
            stat += (observed - expected) ** 2 / expected
    return _gamma_q((len(cols) - 1) / 2, stat / 2)


def _gamma_q(s: float, x: float) -> float:
    """The regularised upper incomplete gamma function Q(s, x) (chi-square tail)."""
    import math

    if x <= 0:
        return 1.0
    log_prefix = s * math.log(x) - x - math.lgamma(s)
    if x < s + 1:  # series for P, then Q = 1 - P
        term = total = 1.0 / s
        k = s
        for _ in range(500):
            k += 1
            term *= x / k
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    # Continued fraction for Q (modified Lentz).
    tiny = 1e-300
    b = x + 1 - s
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 500):
        an = -i * (i - s)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return min(1.0, math.exp(log_prefix) * h)


def _plots(summary: dict[str, Any], classes: list[str]) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xfer.reports.plots import png

    night, ref = summary["night"], summary["test_split"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(classes))
    ax.bar(x - 0.2, [night["shares"][c] for c in classes], 0.4, label="tonight")
    if ref:
        ax.bar(x + 0.2, [ref["shares"][c] for c in classes], 0.4, label="model's test split")
    ax.set_xticks(x, classes, rotation=30, ha="right")
    ax.set_ylabel("share of predictions")
    ax.set_title("predicted classes")
    ax.legend()
    shares = png(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    centres = (np.arange(BINS) + 0.5) / BINS
    for shown, label in ((night, "tonight"), (ref, "model's test split")):
        if shown and shown["scored"]:
            hist = np.array(shown["confidence_histogram"], dtype=float)
            ax.plot(centres, hist / hist.sum(), "-o", label=label, markersize=4)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("share of images")
    ax.set_title("confidence")
    if ax.get_legend_handles_labels()[0]:  # a night of 0 images and no test split: none
        ax.legend()
    return shares, png(fig)


def _verdict(drift: dict[str, Any] | None) -> str:
    """The drift signals as one sentence of the page."""
    if drift is None:
        return "no test-split predictions of this model to compare with"
    return (
        f"class shift {drift['class_shift']:.3f} (limit {CLASS_SHIFT_LIMIT}, "
        f"p = {drift['class_shift_p_value']:.3g} against {SIGNIFICANCE}), "
        f"confidence drop {drift['confidence_drop']:+.3f} (limit {CONFIDENCE_DROP_LIMIT}): "
        + (
            "<b style='color:#b00'>look at tonight's images</b>"
            if drift["flagged"]
            else "as expected"
        )
    )


def _errors_section(summary: dict[str, Any]) -> list[str]:
    """The page's error rows: reasons with their counts, then the first examples."""
    esc = html.escape
    if not summary["errors"]:
        return ["<h2>Errors</h2>", "<p>None.</p>"]
    parts = ["<h2>Errors</h2>", "<table><tr><th>reason</th><th>rows</th></tr>"]
    for reason, n in summary["error_reasons"].items():
        parts.append(f"<tr><td style='text-align:left'>{esc(reason)}</td><td>{n}</td></tr>")
    parts.append("</table><h3>Examples</h3><table><tr><th>key</th><th>error</th></tr>")
    for e in summary["error_examples"]:
        parts.append(
            f"<tr><td style='text-align:left'><code>{esc(e['key'])}</code></td>"
            f"<td style='text-align:left'>{esc(e['error'])}</td></tr>"
        )
    parts.append("</table>")
    return parts


def render_nightly(summary: dict[str, Any], classes: list[str]) -> str:
    """The night's ``_report.html``: one page, its plots inline."""
    esc = html.escape
    verdict = _verdict(summary["drift"])
    shares, confidence = _plots(summary, classes)
    ref = summary["test_split"] or {}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>xfer night {esc(summary['partition'])}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
        "th{background:#f3f3f3}code{background:#f3f3f3;padding:1px 4px}</style></head><body>",
        f"<h1>Night <code>{esc(summary['partition'].rsplit('/', 1)[-1])}</code></h1>",
        f"<p>{summary['rows']} images from <code>{esc(str(summary['input']))}</code>, model "
        f"<b>{esc(str(summary['model_name']))}</b> (run <code>{esc(str(summary['run_id']))}</code>), "
        f"scored at {esc(str(summary['scored_at']))}; {summary['errors']} error row(s); "
        f"probabilities {_probabilities(summary)}.</p>",
        *(
            f"<p style='color:#b00'><b>Look at:</b> {esc(look)}.</p>"
            for look in summary.get("look_at", [])
        ),
        f"<p>Drift: {verdict}.</p>",
        "<h2>Predicted classes</h2><table><tr><th>class</th><th>tonight</th><th>share</th>"
        f"<th>test split share ({ref.get('scored', 0)} images)</th></tr>",
    ]
    for c in classes:
        ref_share = f"{ref['shares'][c]:.3f}" if ref else "-"
        parts.append(
            f"<tr><td>{esc(c)}</td><td>{summary['night']['per_class'][c]}</td>"
            f"<td>{summary['night']['shares'][c]:.3f}</td><td>{ref_share}</td></tr>"
        )
    parts.append("</table>")
    parts.append(f"<img alt='predicted classes' src='data:image/png;base64,{shares}'>")
    parts.append(f"<img alt='confidence histogram' src='data:image/png;base64,{confidence}'>")
    parts += _errors_section(summary)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_nightly_report(partition: str, classes: list[str], run_uri: str) -> dict[str, Any]:
    summary = summarize_night(partition, classes, run_uri)
    storage.write_bytes(
        storage.join(partition, SUMMARY), json.dumps(summary, indent=2).encode(), "application/json"
    )
    storage.write_bytes(
        storage.join(partition, REPORT), render_nightly(summary, classes).encode(), "text/html"
    )
    return summary


def report_night(partition: str, classes: list[str], run_uri: str) -> None:
    """Write the report of a committed night; a failure is one warning line, never the
    night's failure (it is committed: "nothing committed" would be a lie)."""
    try:
        summary = write_nightly_report(partition, classes, run_uri)
    except Exception as exc:  # anything: the store, the plots, the figures
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(
            f"[xfer] warning: the night at {partition} is committed but its report was not "
            f"written ({reason}); run the same date again to write it without scoring again",
            file=sys.stderr,
            flush=True,
        )
        return
    look = f" ({'; '.join(summary['look_at'])})" if summary["look_at"] else ""
    print(f"[xfer] nightly report: {storage.join(partition, REPORT)}{look}", flush=True)


def committed_without_report(partition: str, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The ``_SUCCESS`` of this same night (model, input, settings) when its report is
    missing: a re-run writes the report from it instead of scoring again."""
    marker_uri = storage.join(partition, SUCCESS)
    reported = all(storage.exists(storage.join(partition, f)) for f in (SUMMARY, REPORT))
    if reported or not storage.exists(marker_uri):
        return None
    marker = storage.read_json(marker_uri)
    return marker if marker.get("night") == identity else None
