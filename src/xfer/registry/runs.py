"""`xfer runs`: the runs and published models in the object store, as an operator sees them.

    xfer runs list [--model NAME] [--limit N | --all]   the newest runs (50), newest first
    xfer runs show RUN                  metrics, lineage, failures, where everything is
    xfer runs compare RUN RUN           the settings that differ, the metrics side by side
    xfer runs promote RUN [--force]     publish a complete run (its gate must have passed)
    xfer runs rollback MODEL [--force]  publish again the run published before the current one

RUN is a run id (under ``<storage.root>/runs/``) or a run URI. The storage settings
come from ``--config`` and ``key=value`` overrides, as for the other commands.
A run's status (complete, failed, running) and when it started come from
:mod:`xfer.registry.runstatus`; runs list newest first by that start, whatever their ids.
Listing reads the run index (:mod:`xfer.registry.runindex`), not every run: its cost grows
with the runs shown, not with the runs kept.

Publishing is one atomic PUT of ``models/<name>/latest.json``; every pointer ever
written is also kept under ``models/<name>/history/``. A rollback is a publication
like any other (``action: rollback``), so the history reads as what happened.
"""

from __future__ import annotations

from typing import Any

from xfer.console import percent
from xfer.errors import NotFoundError, XferError
from xfer.registry import layout
from xfer.registry.layout import (
    CALIBRATION,
    CONFIG,
    CONSOLE_LOG,
    GATE_PREDICTIONS,
    LATEST,
    LINEAGE,
    METRICS,
    MODEL_DIR,
    PREDICTIONS,
    REPORT,
    TENSORBOARD,
    PointerMoved,
    PointerRead,
    publish_pointer,
    read_pointer_for_update,
)
from xfer.registry.runindex import RunList, is_run_name, newest
from xfer.registry.runstatus import RunSummary, published_runs, read, summarize
from xfer.reports.report import flatten
from xfer.store import storage
from xfer.store.commit import SUCCESS
from xfer.store.uris import is_uri
from xfer.train.gate import lost_race_text
from xfer.train.outputs import versus_text


def find_runs(root: str, model: str | None = None, limit: int | None = None) -> RunList:
    """The newest ``limit`` runs (None: all), through the run index (xfer.registry.runindex):
    a listing of ``runs/`` and one of the index, then only the runs shown are read."""
    names = [n for n in storage.list_dirs(layout.runs_prefix(root)) if is_run_name(n)]
    return newest(root, names, model, limit, published_runs(root))


def list_runs(root: str, model: str | None = None, limit: int | None = None) -> list[RunSummary]:
    return find_runs(root, model, limit).runs


def not_shown(found: RunList) -> str:
    """The line under a table that left runs out ('' when it shows them all)."""
    if found.total <= len(found.runs):
        return ""
    return (
        f"showing the newest {len(found.runs)} of {found.total:,} runs; "
        "--all lists them all, --limit N the newest N"
    )


def format_table(runs: list[RunSummary]) -> str:
    header = (
        "RUN",
        "MODEL",
        "DATASET",
        "BASE",
        "STATUS",
        "HEAD",
        "FINE-TUNE",
        "TEST",
        "PUB",
        "STARTED",
        "WALL",
    )
    rows = [header]
    for r in runs:
        status = r.status if r.status == "complete" else f"{r.status} ({r.where})"
        rows.append(
            (
                r.run_id,
                r.model_name,
                storage.basename(r.dataset.rstrip("/")) or "-",
                r.base,
                status,
                percent(r.head_val, "-"),
                percent(r.fine_tune_val, "-"),
                percent(r.test_accuracy, "-"),
                "yes" if r.published else "",
                r.started.replace("+00:00", "Z"),
                "-" if r.wall_s is None else f"{r.wall_s / 60:.1f}m",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def run_uri(root: str, run: str) -> str:
    uri = run.rstrip("/") if is_uri(run) else layout.run_uri(root, run)
    if not storage.exists(storage.join(uri, CONFIG)):
        raise XferError(f"no run {run!r} (nothing at {uri}); `xfer runs list` shows the runs")
    return uri


def show(root: str, run: str) -> str:
    uri = run_uri(root, run)
    r = summarize(root, storage.basename(uri))
    lines = [
        f"run {r.run_id}: {r.status}" + (f" ({r.where})" if r.where else ""),
        f"  model {r.model_name}, base {r.base}, dataset {r.dataset}",
        f"  started {r.started}" + ("" if r.wall_s is None else f", wall {r.wall_s / 60:.1f} min"),
    ]
    if r.status == "complete":
        m = storage.read_json(storage.join(uri, METRICS))
        for phase, p in m.get("phases", {}).items():
            lines.append(
                f"  {phase:<9} {p.get('epochs')} epoch(s), val accuracy {percent(p.get('val_accuracy'), '-')}, "
                f"{p.get('images_per_s', 0):.1f} images/s"
            )
        lines.append(f"  test accuracy {percent(r.test_accuracy, '-')}")
        gate = m.get("gate", {})
        lines.append(
            f"  gate: {gate.get('metric')} {percent(gate.get('value'), '-')} >= {gate.get('min_test_accuracy')}: "
            + ("passed" if gate.get("passed") else "not passed")
            + ("; published (latest)" if r.published else "")
        )
        if gate.get("vs_published"):
            lines.append("  " + versus_text(gate["vs_published"]).removeprefix("; "))
        if gate.get("lost_race"):
            lines.append(f"  {lost_race_text(r.run_id, gate['lost_race'])}")
        for failure in m.get("failures", []):
            lines.append(
                f"  failure: attempt {failure['attempt']}, {failure['stage']}"
                f" {failure.get('phase') or ''} epoch {failure.get('epoch')}, rank {failure.get('rank')},"
                f" {failure.get('epochs_redone')} epoch(s) redone"
            )
        lin = read(storage.join(uri, LINEAGE)) or {}
        code = lin.get("code", {})
        lines.append(
            f"  lineage: dataset checksum {str(lin.get('dataset', {}).get('manifest_checksum', ''))[:12]}, "
            f"weights {str(lin.get('weights', {}).get('sha256', ''))[:12] or '-'}, code {str(code.get('sha256', ''))[:12]}"
        )
    lines.append("  where:")
    for name, what in (
        (CONFIG, "the resolved config"),
        (f"{MODEL_DIR}/", "the model (loads with tf_keras alone)"),
        (f"{MODEL_DIR}/saved_model/", "the SavedModel for TF Serving (image bytes in)"),
        (METRICS, "metrics per phase and epoch, test metrics, failures, gate"),
        (REPORT, "the report"),
        (f"{PREDICTIONS}/test.parquet", "predictions on the test split"),
        (f"{GATE_PREDICTIONS}/", "the published model's predictions on it (champion/challenger)"),
        (f"{CALIBRATION}/val.parquet", "the validation split, on which the temperature was fitted"),
        (CONSOLE_LOG, "everything Ray and TensorFlow printed"),
        (f"{TENSORBOARD}/", "per-epoch scalars"),
    ):
        lines.append(f"    {storage.join(uri, name):<70} {what}")
    return "\n".join(lines)


def compare(root: str, a: str, b: str) -> str:
    ua, ub = run_uri(root, a), run_uri(root, b)
    ca = dict(flatten(storage.read_yaml(storage.join(ua, CONFIG)) or {}))
    cb = dict(flatten(storage.read_yaml(storage.join(ub, CONFIG)) or {}))
    ra, rb = summarize(root, storage.basename(ua)), summarize(root, storage.basename(ub))
    width = max(len(ra.run_id), len(rb.run_id), 10)
    lines = [f"{'':<32} {ra.run_id:<{width}} {rb.run_id:<{width}}"]
    for label, va, vb in (
        ("status", ra.status, rb.status),
        ("val accuracy after head", percent(ra.head_val, "-"), percent(rb.head_val, "-")),
        (
            "val accuracy after fine-tune",
            percent(ra.fine_tune_val, "-"),
            percent(rb.fine_tune_val, "-"),
        ),
        ("test accuracy", percent(ra.test_accuracy, "-"), percent(rb.test_accuracy, "-")),
        ("published", "yes" if ra.published else "no", "yes" if rb.published else "no"),
    ):
        lines.append(f"{label:<32} {va:<{width}} {vb:<{width}}")
    if None not in (ra.test_accuracy, rb.test_accuracy):
        diff = 100 * (rb.test_accuracy - ra.test_accuracy)  # type: ignore[operator]
        lines.append(f"{'test accuracy, second - first':<32} {diff:+.1f} points")
    lines.extend(paired_lines(ua, ub))
    differ = [
        k for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k) and k != "output.run_id"
    ]
    lines.append("settings that differ:" if differ else "settings: the same")
    for key in differ:
        lines.append(f"  {key:<30} {ca.get(key)!s:<{width}} {cb.get(key)!s:<{width}}")
    return "\n".join(lines)


def paired_lines(first: str, second: str, alpha: float = 0.05) -> list[str]:
    """Both runs' test predictions compared image by image (:mod:`xfer.registry.paired`)."""
    from xfer.registry.paired import compare as paired_compare
    from xfer.registry.paired import outcomes

    tables = []
    for uri in (second, first):
        try:
            tables.append(storage.read_parquet(storage.join(uri, PREDICTIONS, "test.parquet")))
        except NotFoundError:
            return [f"paired comparison: {storage.basename(uri)} kept no test predictions"]
    right, other, left_out = outcomes(*tables)
    if not len(right):
        return ["paired comparison: the two test splits share no scored image"]
    cmp = paired_compare(right, other, alpha)
    lo, hi = cmp.interval
    lines = [
        f"paired on the test split: {cmp.pairs} images both scored; only the second right "
        f"{cmp.challenger_only}, only the first right {cmp.champion_only}",
        f"  McNemar exact p = {cmp.p_two_sided:.3g} (two-sided); second - first "
        f"{100 * cmp.difference:+.1f} points, {100 * cmp.confidence:.0f}% bootstrap interval "
        f"[{100 * lo:+.1f}, {100 * hi:+.1f}]",
    ]
    if left_out["challenger_only_keys"] or left_out["champion_only_keys"]:
        lines.append(
            f"  images only one run scored: {left_out['challenger_only_keys']} (second), "
            f"{left_out['champion_only_keys']} (first): their test splits differ"
        )
    return lines


# ----------------------------------------------------------------- publishing


def _committed_metrics(uri: str) -> dict[str, Any]:
    if not layout.is_complete(uri):
        raise XferError(
            f"run {storage.basename(uri)} is not complete (no {SUCCESS}): it cannot be published"
        )
    return storage.read_json(storage.join(uri, METRICS))


def promote(root: str, run: str, force: bool = False) -> dict[str, Any]:
    """Publish a complete run; the run already published stays as it is (``unchanged``)."""
    uri = run_uri(root, run)
    m = _committed_metrics(uri)
    gate = m.get("gate", {})
    if not gate.get("passed") and not force:
        raise XferError(
            f"run {m['run_id']} did not pass its gate ({gate.get('metric')} {gate.get('value')} < "
            f"{gate.get('min_test_accuracy')}); --force publishes it anyway"
        )
    model_uri = layout.model_uri(root, m["model_name"])
    seen = read_pointer_for_update(model_uri)
    if seen.run_id == m["run_id"]:
        return {**(seen.pointer or {}), "unchanged": True}
    return _publish(
        model_uri,
        m["model_name"],
        uri,
        seen,
        action="promote",
        forced=bool(force and not gate.get("passed")),
    )


def rollback(root: str, model: str, force: bool = False) -> dict[str, Any]:
    """Publish the run that was published before the current one.

    That is the first run other than the current one down the chain of
    ``previous_run_id`` (a run published twice in a row names itself). The new
    pointer's previous is what that run's own publication replaced, so rollbacks
    walk back one distinct run at a time.
    """
    model_uri = layout.model_uri(root, model)
    seen = read_pointer_for_update(model_uri)
    current = seen.pointer
    if not current:
        raise XferError(f"model {model!r} is not published (no {model_uri}/{LATEST})")
    past = layout.history(model_uri)
    target, entry = _previous_distinct(past, current)
    if not target:
        raise XferError(
            f"model {model!r}: run {current['run_id']} is the first published; nothing to roll back to"
        )
    before = _previous_distinct(past, entry)[0] if entry else None
    uri = layout.run_uri(root, target)
    gate = _committed_metrics(uri).get("gate", {})
    if not gate.get("passed") and not force:
        raise XferError(f"run {target} did not pass its gate; --force publishes it anyway")
    return _publish(
        model_uri,
        model,
        uri,
        seen,
        action="rollback",
        rolled_back_from=current["run_id"],
        previous_run_id=before,
    )


def _previous_distinct(
    past: list[dict[str, Any]], pointer: dict[str, Any]
) -> tuple[str | None, dict[str, Any] | None]:
    """The run published before ``pointer`` other than its own, and the history entry
    of that publication (None when history lost it)."""
    run = pointer["run_id"]
    at = past.index(pointer) if pointer in past else len(past)
    for _ in range(len(past) + 1):
        prev = pointer.get("previous_run_id")
        if not prev:
            return None, None
        earlier = [i for i in range(at) if past[i]["run_id"] == prev]
        entry = past[earlier[-1]] if earlier else None
        if prev != run:
            return prev, entry
        if entry is None:
            return None, None
        pointer, at = entry, earlier[-1]
    return None, None


def _publish(
    model_uri: str, model: str, uri: str, seen: PointerRead, **extra: Any
) -> dict[str, Any]:
    m = storage.read_json(storage.join(uri, METRICS))
    gate = m.get("gate", {})
    try:
        return publish_pointer(
            model_uri,
            model,
            m["run_id"],
            uri,
            gate.get("metric", "test_accuracy"),
            gate.get("value"),
            seen,
            **extra,
        )
    except PointerMoved as exc:
        raise XferError(
            f"model {model!r}: {exc.args[0]}; nothing published: look again "
            "(`xfer runs list`) and retry"
        ) from None
