"""A run's test-set metrics from its predictions, and `report.html` with plots.

The report is one self-contained HTML file (plots and thumbnails embedded): learning
curves for both phases, the gate, the failures and resumes, the confusion matrix,
per-class precision and recall, the test images the model got most confidently
wrong (per true class), a reliability diagram, and lineage. Open it from the run's
prefix; nothing else is needed.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
from typing import Any

import numpy as np

from xfer.reports.plots import confusion_plot, learning_curves, reliability_plot


def classification_metrics(
    true: list[int], predicted: list[int], classes: list[str]
) -> dict[str, Any]:
    """Confusion matrix and per-class precision/recall/F1 (rows: true, cols: predicted)."""
    k = len(classes)
    cm = np.zeros((k, k), dtype=int)
    for t, p in zip(true, predicted, strict=True):
        cm[t, p] += 1
    per_class = {}
    for i, name in enumerate(classes):
        tp = int(cm[i, i])
        predicted_i = int(cm[:, i].sum())
        support = int(cm[i, :].sum())
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    total = int(cm.sum())
    return {
        "accuracy": float(np.trace(cm) / total) if total else 0.0,
        "examples": total,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def calibration(confidence: list[float], correct: list[bool], bins: int = 10) -> dict[str, Any]:
    """Reliability per confidence bin and the expected calibration error (ECE)."""
    conf = np.asarray(confidence, dtype=float)
    ok = np.asarray(correct, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows, ece = [], 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        n = int(inside.sum())
        if n:
            acc, mean = float(ok[inside].mean()), float(conf[inside].mean())
            ece += n / len(conf) * abs(acc - mean)
            rows.append(
                {
                    "low": float(lo),
                    "high": float(hi),
                    "count": n,
                    "confidence": mean,
                    "accuracy": acc,
                }
            )
    return {"bins": rows, "ece": ece if len(conf) else None}


def mistakes(table: Any, per_class: int = 6) -> list[dict[str, Any]]:
    """The most confident wrong predictions, up to ``per_class`` per true class."""
    from xfer.scoring.predictions import (
        KEY,
        PREDICTED_INDEX,
        PREDICTED_LABEL,
        PROBABILITY,
        TRUE_INDEX,
        TRUE_LABEL,
    )

    shown = (KEY, TRUE_LABEL, PREDICTED_LABEL, PROBABILITY)
    rows = [
        r
        for r in table.select([*shown, TRUE_INDEX, PREDICTED_INDEX]).to_pylist()
        if r[PREDICTED_INDEX] is not None and r[TRUE_INDEX] != r[PREDICTED_INDEX]
    ]
    rows.sort(key=lambda r: -r[PROBABILITY])
    out: list[dict[str, Any]] = []
    taken: dict[str, int] = {}
    for r in rows:
        if taken.get(r[TRUE_LABEL], 0) < per_class:
            taken[r[TRUE_LABEL]] = taken.get(r[TRUE_LABEL], 0) + 1
            out.append({k: r[k] for k in shown})
    return out


THUMB_SIDE = 112


def thumbnails(shard_uris: list[str], keys: set[str]) -> dict[str, str]:
    """key -> a small JPEG (base64) of the image as the shards hold it."""
    import pyarrow.compute as pc
    from PIL import Image

    from xfer.store import storage

    out: dict[str, str] = {}
    if not keys:
        return out
    for uri in shard_uris:
        table = storage.read_parquet(uri, columns=["key", "image"])
        table = table.filter(pc.is_in(table.column("key"), value_set=pa_array(sorted(keys))))
        for key, data in zip(
            table.column("key").to_pylist(), table.column("image").to_pylist(), strict=True
        ):
            try:
                with Image.open(io.BytesIO(data)) as img:
                    thumb = img.convert("RGB")
                    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
                    buf = io.BytesIO()
                    thumb.save(buf, format="JPEG", quality=85)
                out[key] = base64.b64encode(buf.getvalue()).decode()
            except Exception:  # an image the report cannot show is left out, not fatal
                continue
    return out


def pa_array(values: list[str]) -> Any:
    import pyarrow as pa

    return pa.array(values, pa.string())


def _mistakes_section(
    wrong: list[dict[str, Any]], thumbs: dict[str, str], examples: Any
) -> list[str]:
    esc = html.escape
    if not wrong:
        return [
            f"<h2>Most confident mistakes</h2><p>None: every one of the {examples} test images is right.</p>"
        ]
    parts = [
        "<h2>Most confident mistakes</h2><p>The test images the model got wrong with the "
        "highest probability, per true class (from the shards, as the model saw them).</p>"
    ]
    for label in dict.fromkeys(w["true_label"] for w in wrong):
        parts.append(f"<h3>true class {esc(label)}</h3><div class='gallery'>")
        for w in (w for w in wrong if w["true_label"] == label):
            src = thumbs.get(w["key"])
            img = (
                f"<img alt='{esc(w['key'])}' src='data:image/jpeg;base64,{src}'>"
                if src
                else "<div class='missing'>(image unavailable)</div>"
            )
            parts.append(
                f"<figure>{img}<figcaption>predicted <b>{esc(w['predicted_label'])}</b> "
                f"{100 * w['probability']:.1f}%<br><code>{esc(w['key'])}</code></figcaption></figure>"
            )
        parts.append("</div>")
    return parts


STYLE = (
    "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
    "th{background:#f3f3f3}code{background:#f3f3f3;padding:1px 4px}"
    ".gallery{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:150px;font-size:12px}"
    "figure img{max-width:140px;max-height:140px;border:1px solid #ccc}"
    "figcaption code{word-break:break-all;font-size:10px}</style>"
)


def render_report(
    metrics: dict[str, Any], lineage: dict[str, Any], thumbs: dict[str, str] | None = None
) -> str:
    """The HTML of report.html (``thumbs``: the mistakes' thumbnails, by key)."""
    esc = html.escape
    test = metrics.get("test") or {}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>xfer run {esc(metrics['run_id'])}</title>",
        f"{STYLE}</head><body>",
        f"<h1>Run <code>{esc(metrics['run_id'])}</code></h1>",
        f"<p>model <b>{esc(metrics.get('model_name', ''))}</b>, base <b>{esc(metrics['base'])}</b>, "
        f"{metrics['workers']} worker(s), dataset <code>{esc(metrics['dataset'])}</code></p>",
        *_summary_section(metrics["phases"], test),
        *_gate_section(metrics.get("gate") or {}),
        *_failures_section(metrics.get("failures") or [], metrics.get("resume_changes")),
    ]
    curves = learning_curves(metrics.get("history", {}))
    if curves:
        parts.append(
            f"<h2>Learning curves</h2><img alt='learning curves' src='data:image/png;base64,{curves}'>"
        )
    if test.get("confusion_matrix"):
        parts.extend(_test_section(test, metrics["classes"]))
    if "mistakes" in test:
        parts.extend(_mistakes_section(test["mistakes"], thumbs or {}, test.get("examples")))
    parts.extend(_calibration_section(test.get("calibration") or {}, metrics.get("calibration")))
    parts.extend(_lineage_section(lineage))
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary_section(phases: dict[str, Any], test: dict[str, Any]) -> list[str]:
    parts = [
        "<h2>Summary</h2><table><tr><th>phase</th><th>epochs</th><th>val accuracy (last)</th>"
        "<th>wall time (s)</th><th>images/s</th></tr>"
    ]
    for phase, info in phases.items():
        parts.append(
            f"<tr><td>{phase}</td><td>{info['epochs']}</td><td>{_fmt(info.get('val_accuracy'))}</td>"
            f"<td>{_fmt(info.get('seconds'), 1)}</td><td>{_fmt(info.get('images_per_s'), 1)}</td></tr>"
        )
    parts.append("</table>")
    if test:
        parts.append(
            f"<p>Test accuracy <b>{_fmt(test.get('accuracy'))}</b>, loss {_fmt(test.get('loss'))} "
            f"on {test.get('examples', '?')} images.</p>"
        )
    return parts


def _test_section(test: dict[str, Any], classes: list[str]) -> list[str]:
    """The confusion matrix and per-class precision, recall and F1."""
    esc = html.escape
    cm = confusion_plot(test["confusion_matrix"], classes)
    parts = [
        "<h2>Test set</h2>",
        f"<img alt='confusion matrix' src='data:image/png;base64,{cm}'>",
        "<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>",
    ]
    for name, m in test["per_class"].items():
        parts.append(
            f"<tr><td>{esc(name)}</td><td>{_fmt(m['precision'])}</td><td>{_fmt(m['recall'])}</td>"
            f"<td>{_fmt(m['f1'])}</td><td>{m['support']}</td></tr>"
        )
    parts.append("</table>")
    return parts


def _lineage_section(lineage: dict[str, Any]) -> list[str]:
    """One row per setting; ``code.workers`` one row per rank, as the code it ran."""
    esc = html.escape
    parts = ["<h2>Lineage</h2><table>"]
    for key, value in lineage_rows(lineage):
        parts.append(
            f"<tr><th style='text-align:left'>{esc(key)}</th><td style='text-align:left'>"
            f"<code>{esc(value)}</code></td></tr>"
        )
    parts.append("</table>")
    return parts


def lineage_rows(lineage: dict[str, Any]) -> list[tuple[str, str]]:
    """The lineage as (key, text) rows: what each rank ran reads as the driver's line
    does (``xfer 0.1 (code 1a2b3c4d5e6f, commit ...) from /path``), not as a dict."""
    from xfer.registry.provenance import describe

    rows: list[tuple[str, str]] = []
    for key, value in flatten(lineage):
        if key == "code.workers" and isinstance(value, list):
            for entry in value:
                try:
                    text = describe(entry)
                except (KeyError, TypeError):  # an older journal entry: its fields as recorded
                    text = ", ".join(f"{k} {v}" for k, v in dict(entry).items() if k != "rank")
                rows.append((f"code.workers rank {entry.get('rank', '?')}", text))
        else:
            rows.append((key, "-" if value is None else str(value)))
    return rows


def _gate_section(gate: dict[str, Any]) -> list[str]:
    """The quality gate, and the comparison with the published model if there was one."""
    if not gate:
        return []
    esc = html.escape
    rows = [
        "<h2>Gate</h2><table><tr><th>check</th><th>this run</th><th>needed</th><th>result</th></tr>",
        f"<tr><td>{esc(str(gate.get('metric')))}</td><td>{_fmt(gate.get('value'))}</td>"
        f"<td>&ge; {_fmt(gate.get('min_test_accuracy'))}</td>"
        f"<td>{'passed' if (gate.get('value') or 0) >= gate.get('min_test_accuracy', 0) else 'failed'}"
        "</td></tr>",
    ]
    recall = gate.get("class_recall")
    if recall:
        worst = min(recall["recall"].values(), default=0.0)
        rows.append(
            f"<tr><td>lowest class recall</td><td>{_fmt(worst)}</td><td>&ge; {_fmt(recall['floor'])}</td>"
            f"<td>{'failed: ' + esc(', '.join(recall['below'])) if recall['below'] else 'passed'}</td></tr>"
        )
    champion = gate.get("vs_published")
    if champion:
        rows.append(_champion_row(champion))
    rows.append("</table>")
    rows.append(
        f"<p>Published: <b>{'yes' if gate.get('published') else 'no'}</b>"
        f" (<code>{esc(str(gate.get('latest', '')))}</code>).</p>"
    )
    return rows


def _champion_row(vs: dict[str, Any]) -> str:
    """The paired comparison with the published model, as one row of the gate's table."""
    esc = html.escape
    what = (
        f"test accuracy vs the published run <code>{esc(vs['run_id'])}</code>, same images, "
        "same code"
    )
    if "pairs" not in vs:
        return (
            f"<tr><td>{what}</td><td>{_fmt(vs.get('challenger_accuracy'))}</td><td>-</td>"
            f"<td>{'published over it' if vs['beaten'] else 'not published'}"
            f"{' (' + esc(vs['reason']) + ')' if vs.get('reason') else ''}</td></tr>"
        )
    lo, hi = vs["interval"]
    needed = "better beyond noise" if vs["mode"] == "better" else "not worse beyond noise"
    return (
        f"<tr><td style='text-align:left'>{what}: {vs['pairs']} paired images; only this run right "
        f"<b>{vs['challenger_only']}</b>, only the champion right <b>{vs['champion_only']}</b>; "
        f"McNemar exact p = {vs['p_value']:.3g}; difference {100 * vs['difference']:+.1f} points, "
        f"{100 * vs['confidence']:.0f}% bootstrap interval [{100 * lo:+.1f}, {100 * hi:+.1f}]</td>"
        f"<td>{_fmt(vs['challenger_accuracy'])} vs {_fmt(vs['accuracy'])}</td>"
        f"<td>{needed} (alpha {vs['alpha']})</td>"
        f"<td>{esc(vs['verdict'])}: {'passed' if vs['beaten'] else 'not published'}</td></tr>"
    )


def _calibration_section(cal: dict[str, Any], fitted: dict[str, Any] | None) -> list[str]:
    """The test split's reliability diagram, and what temperature scaling did to it."""
    if not cal.get("bins"):
        return []
    parts = [
        "<h2>Calibration</h2><p>How far the predicted probability can be taken at its "
        "word: per confidence bin, the share of test images that were right (counts "
        f"along the bottom). Expected calibration error <b>{_fmt(cal['ece'])}</b>"
    ]
    if cal.get("calibrated"):
        parts.append(
            f" with temperature scaling (T = {cal['temperature']:.3f}, fitted on "
            f"{(fitted or {}).get('examples', '?')} validation images), "
            f"{_fmt(cal.get('ece_uncalibrated'))} with the network's own probabilities. "
            "Predictions files carry the calibrated probabilities (their metadata says so)."
        )
    else:
        why = (fitted or {}).get("reason") or "output.calibrate is off"
        parts.append(
            f"; the probabilities are the network's own, not calibrated ({html.escape(why)})."
        )
    parts.append(
        f"</p><img alt='reliability diagram' src='data:image/png;base64,{reliability_plot(cal)}'>"
    )
    return ["".join(parts)]


def _failures_section(failures: list[dict[str, Any]], changes: list[str] | None) -> list[str]:
    """Each failure of the run and how it was recovered; says so when there were none."""
    esc = html.escape
    if not failures:
        return ["<h2>Failures</h2><p>None: the run went through in one attempt.</p>"]
    rows = [
        "<h2>Failures</h2><table><tr><th>attempt</th><th>failed in</th><th>rank</th>"
        "<th>at (UTC)</th><th>error</th><th>resumed by</th><th>resumed from</th>"
        "<th>epochs redone</th><th>learning rate after resume</th></tr>"
    ]
    for f in failures:
        where = f["stage"] + (f" ({f['phase']} epoch {f['epoch']})" if f.get("phase") else "")
        start = f.get("resumed_from")
        start_text = f"{start['phase']} epoch {start['epoch']}" if start else "the start"
        opt = f.get("optimizer_after_resume") or {}
        lr = opt.get("learning_rate")
        rows.append(
            f"<tr><td>{f['attempt']}</td><td>{esc(where)}</td><td>{f.get('rank', '-')}</td>"
            f"<td>{esc(str(f.get('at')))}</td><td style='text-align:left'>{esc(str(f.get('error')))}</td>"
            f"<td>{esc(f['resumed_by'])}</td><td>{esc(start_text)}</td><td>{f['epochs_redone']}</td>"
            f"<td>{'-' if lr is None else f'{lr:.3g}'}</td></tr>"
        )
    rows.append("</table>")
    if changes:
        rows.append("<p>Settings changed on resume: " + esc("; ".join(changes)) + "</p>")
    return rows


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.extend(flatten(v, f"{prefix}{k}."))
        else:
            out.append((f"{prefix}{k}", v))
    return out
