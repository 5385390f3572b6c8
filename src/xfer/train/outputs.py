"""A finished run's outputs: test predictions, the gate, metrics, lineage, report, _SUCCESS.

Everything here runs on the driver after Ray Train returns. The test split is scored
through the batch-scoring code path (:mod:`xfer.scoring.score`), not a second implementation.
The gate runs before the outputs are written: ``models/<name>/latest.json`` moves
(one conditional PUT) only when the run passes it and the pointer still names the
champion it was compared with; ``metrics.json`` then records what happened, and
``_SUCCESS`` is written after every other output. A run that stops between its
publication and ``_SUCCESS`` is resumed by id and finds itself already published.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from xfer import __version__
from xfer.config import XferConfig, resolved_dict
from xfer.console import percent
from xfer.data.exclude import Exclusion
from xfer.data.manifest import Manifest
from xfer.registry.layout import (
    CALIBRATION,
    LINEAGE,
    METRICS,
    MODEL_DIR,
    MODEL_INFO,
    PREDICTIONS,
    REPORT,
    resolve_model,
    write_success,
)
from xfer.registry.provenance import git_commit, source_sha256
from xfer.store import storage
from xfer.train.gate import gate_and_publish, lost_race_text
from xfer.train.journal import failures, mark_complete, worker_code


@dataclass
class TrainResult:
    run_id: str
    run_uri: str
    metrics: dict[str, Any]
    published: bool

    @property
    def test_accuracy(self) -> float | None:
        return (self.metrics.get("test") or {}).get("accuracy")

    def describe(self) -> str:
        lines = [f"run {self.run_id} complete: {self.run_uri}"]
        for phase, info in self.metrics["phases"].items():
            lines.append(
                f"  {phase:9s} {info['epochs']} epoch(s), val accuracy {percent(info.get('val_accuracy'))}, "
                f"{info['seconds']:.0f}s, {info['images_per_s']:.1f} images/s"
            )
        if self.test_accuracy is not None:
            examples = self.metrics["test"].get("examples")
            on = f" on {examples} images" if examples is not None else ""
            lines.append(f"  test accuracy {percent(self.test_accuracy)}{on}")
        cal = (self.metrics.get("test") or {}).get("calibration") or {}
        if cal.get("calibrated"):
            lines.append(
                f"  probabilities calibrated: temperature {cal['temperature']:.2f}, test expected "
                f"calibration error {cal['ece_uncalibrated']:.3f} -> {cal['ece']:.3f}"
            )
        for f in self.metrics.get("failures", []):
            lines.append(
                f"  failure (attempt {f['attempt']}): {_where(f)}, rank {f['rank']}; "
                f"resumed, {f['epochs_redone']} finished epoch(s) redone"
            )
        gate = self.metrics["gate"]
        versus = versus_text(gate.get("vs_published"))
        if (gate.get("class_recall") or {}).get("below"):
            versus += f"; class recall below {gate['class_recall']['floor']}: " + ", ".join(
                gate["class_recall"]["below"]
            )
        lines.append(
            f"  gate ({gate['metric'].replace('_', ' ')} >= {gate['min_test_accuracy']}{versus}): "
            + ("passed, published as " + gate["latest"] if self.published else "not published")
        )
        if gate.get("lost_race"):
            lines.append("  " + lost_race_text(self.run_id, gate["lost_race"]))
        lines.append(f"  report: {self.run_uri}/{REPORT}")
        return "\n".join(lines)


def versus_text(vs: dict[str, Any] | None) -> str:
    """The summary line's account of the comparison with the published model."""
    if not vs:
        return ""
    if "pairs" not in vs:
        return f"; vs the published run {vs['run_id']}: " + (
            vs.get("reason") or ("compared with nothing" if vs["beaten"] else "not compared")
        )
    lo, hi = vs["interval"]
    return (
        f"; vs the published run {vs['run_id']} ({vs['mode']}): {vs['challenger_only']} images "
        f"only this run right, {vs['champion_only']} only the champion, p = {vs['p_value']:.3g}, "
        f"{100 * vs['difference']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]: {vs['verdict']}"
    )


def completed_run(run_id: str, run_uri: str) -> TrainResult:
    """A run that is already committed, as its metrics say."""
    metrics = storage.read_json(storage.join(run_uri, METRICS))
    return TrainResult(run_id, run_uri, metrics, bool(metrics["gate"].get("published")))


def _where(failure: dict[str, Any]) -> str:
    """``train, fine_tune epoch 2`` or ``model_save``."""
    if failure.get("phase"):
        return f"{failure['stage']}, {failure['phase']} epoch {failure['epoch']}"
    return str(failure["stage"])


def gate_value(test: dict[str, Any], history: dict[str, Any]) -> tuple[str, float | None]:
    """What the gate compares: test accuracy, or validation accuracy when there is no
    test split (named as such, never passed off as a test figure)."""
    if test.get("accuracy") is not None:
        return "test_accuracy", test["accuracy"]
    for phase in ("fine_tune", "head"):
        if history.get(phase) and history[phase][-1].get("val_accuracy") is not None:
            return "val_accuracy", history[phase][-1]["val_accuracy"]
    return "test_accuracy", None


def phase_summary(history: list[dict[str, float]]) -> dict[str, Any]:
    seconds = sum(r["seconds"] for r in history)
    last = history[-1] if history else {}
    return {
        "epochs": len(history),
        "seconds": seconds,
        "images_per_s": (sum(r["images_per_s"] * r["seconds"] for r in history) / seconds)
        if seconds
        else 0.0,
        "loss": last.get("loss"),
        "accuracy": last.get("accuracy"),
        "val_loss": last.get("val_loss"),
        "val_accuracy": last.get("val_accuracy"),
    }


def lineage(
    cfg: XferConfig,
    manifest: Manifest,
    final: dict[str, Any],
    run_uri: str,
    exclusion: Exclusion | None = None,
) -> dict[str, Any]:
    import importlib.metadata as md

    versions: dict[str, str | None] = {}
    for pkg in ("tensorflow", "tf-keras", "ray", "pyarrow", "numpy", "boto3"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    config_text = json.dumps(resolved_dict(cfg), sort_keys=True)
    return {
        "dataset": {
            "uri": manifest.uri,
            "manifest_checksum": manifest.checksum,
            "name": manifest.name,
        },
        "code": {
            "xfer": __version__,
            "git_commit": git_commit(),
            "sha256": source_sha256(),
            "workers": worker_code(run_uri),  # what each rank ran (its latest attempt)
        },
        "packages": {"python": platform.python_version(), **versions},
        "weights": final.get("weights", {"source": cfg.model.weights, "sha256": None}),
        "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
        "exclude": exclusion.lineage() if exclusion is not None else None,  # data.exclude
    }


def finish_run(
    cfg: XferConfig,
    manifest: Manifest,
    run_id: str,
    run_uri: str,
    final: dict[str, Any],
    wall: float,
    resume_changes: list[str] | None = None,
    before_commit: Callable[[], None] | None = None,
    exclusion: Exclusion | None = None,
) -> TrainResult:
    """Calibration, the SavedModel export, predictions, the gate and publication,
    metrics, lineage, report; ``_SUCCESS`` last.

    ``before_commit`` runs just before ``_SUCCESS`` (the driver keeps its console
    log there), so nothing in a committed run changes after its marker.
    """
    from xfer.models.export import export_on_ray
    from xfer.reports.report import render_report

    history = final["state"]["history"]
    test = dict(final.get("test") or {})
    left_out = exclusion.keys_of if exclusion is not None else (lambda split: ())
    calibration = calibrate_model(cfg, manifest, run_uri, left_out("val"))
    # model/saved_model/, with the temperature just fitted
    export = export_on_ray(run_uri) if cfg.output.export else None
    thumbs: dict[str, str] = {}
    if cfg.output.predictions and "test" in manifest.splits and manifest.splits["test"].rows:
        thumbs = score_test_split(cfg, manifest, run_uri, test, left_out("test"))
    gate_metric, value = gate_value(test, history)
    gate = gate_and_publish(
        cfg, manifest, run_id, run_uri, test, gate_metric, value, exclude=left_out("test")
    )
    metrics = run_metrics(cfg, manifest, run_id, run_uri, final)
    metrics.update(
        test=test,
        calibration=calibration,
        export=export,
        resume_changes=resume_changes or [],
        wall_time_s=wall,
        gate=gate,
    )
    lin = lineage(cfg, manifest, final, run_uri, exclusion)
    storage.write_json(storage.join(run_uri, METRICS), metrics)
    storage.write_json(storage.join(run_uri, LINEAGE), lin)
    if cfg.output.report:
        storage.write_bytes(
            storage.join(run_uri, REPORT),
            render_report(metrics, lin, thumbs).encode(),
            "text/html",
        )
    if before_commit is not None:
        before_commit()
    write_success(run_uri, run_id)
    mark_complete(run_uri)
    return TrainResult(run_id, run_uri, metrics, gate["published"])


def run_metrics(
    cfg: XferConfig, manifest: Manifest, run_id: str, run_uri: str, final: dict[str, Any]
) -> dict[str, Any]:
    """``metrics.json`` as training left it: what ran, per phase and epoch, failures."""
    history = final["state"]["history"]
    return {
        "run_id": run_id,
        "model_name": cfg.output.model_name,
        "dataset": manifest.uri,
        "base": cfg.model.base,
        "classes": manifest.classes,
        "workers": final.get("workers"),
        "replicas": final.get("replicas"),
        "global_batch": cfg.train.batch_size * int(final.get("replicas") or 1),
        "steps_per_epoch": final.get("steps_per_epoch"),
        "mixed_precision": final.get("mixed_precision"),
        "phases": {p: phase_summary(h) for p, h in history.items() if h},
        "history": history,
        "failures": failures(run_uri),
        "feature_cache": final.get("feature_cache") or None,
    }


def calibrate_model(
    cfg: XferConfig, manifest: Manifest, run_uri: str, exclude: Collection[str] = ()
) -> dict[str, Any] | None:
    """Temperature scaling fitted on the validation split, kept in the model's record.

    The validation split is scored uncalibrated into ``<run>/calibration/val.parquet``
    by the scoring code path, ``T`` is fitted there (:mod:`xfer.models.calibration`), and the
    record ``model/xfer_model.json`` gains ``calibration`` in one PUT: a crash before it
    leaves the model uncalibrated and a resume fits again; a record that already has
    it (an earlier attempt of this run) is kept as it is.
    """
    from xfer.models.calibration import calibrate
    from xfer.scoring.score import write_predictions

    if not cfg.output.calibrate:
        return None
    info_uri = storage.join(run_uri, MODEL_DIR, MODEL_INFO)
    info = storage.read_json(info_uri)
    if info.get("calibration"):
        return info["calibration"]
    if not ("val" in manifest.splits and manifest.splits["val"].rows):
        return {"calibrated": False, "temperature": 1.0, "reason": "no validation split"}
    ref = resolve_model(run_uri, require_committed=False)
    out = storage.join(run_uri, CALIBRATION)
    sc = cfg.score.model_copy(update={"calibrated": False})
    write_predictions(
        ref, manifest.uri, sc, out, single_file="val.parquet", split="val", quiet=True
    )
    probs, labels = labelled_probabilities(storage.read_parquet(storage.join(out, "val.parquet")))
    record = calibrate(probs, labels, "val")
    storage.write_json(info_uri, {**info, "calibration": record})
    if record["calibrated"]:
        print(
            f"[xfer] calibrated on {record['examples']} validation images: temperature "
            f"{record['temperature']:.3f}, expected calibration error "
            f"{record['ece_before']:.3f} -> {record['ece_after']:.3f}",
            flush=True,
        )
    return record


def labelled_probabilities(table: Any) -> tuple[Any, Any]:
    """Class probabilities ``[n, classes]`` and true indices of a predictions table's
    scored, labelled rows."""
    import numpy as np
    import pyarrow.compute as pc

    from xfer.scoring.predictions import ERROR, TRUE_INDEX, class_columns, classes_of

    table = table.filter(
        pc.and_(pc.is_null(table.column(ERROR)), pc.is_valid(table.column(TRUE_INDEX)))
    )
    classes = classes_of(table.schema.metadata)
    probs = np.stack(
        [table.column(c).to_numpy(zero_copy_only=False) for c in class_columns(classes)], axis=1
    )
    return probs.reshape(table.num_rows, len(classes)), table.column(TRUE_INDEX).to_numpy()


def score_test_split(
    cfg: XferConfig,
    manifest: Manifest,
    run_uri: str,
    test: dict[str, Any],
    exclude: Collection[str] = (),
) -> dict[str, str]:
    """The test split scored into ``predictions/test.parquet``; its figures go into
    ``test`` (per class, confusion, calibration before and after, mistakes). Returns
    the mistakes' thumbnails for the report."""
    from xfer.reports.report import classification_metrics, mistakes, thumbnails
    from xfer.scoring.score import write_predictions

    ref = resolve_model(run_uri, require_committed=False)
    preds_uri = storage.join(run_uri, PREDICTIONS)
    write_predictions(
        ref,
        manifest.uri,
        cfg.score,
        preds_uri,
        single_file="test.parquet",
        split="test",
        quiet=cfg.train.verbose == 0,
        exclude=exclude,
    )
    table = storage.read_parquet(storage.join(preds_uri, "test.parquet"))
    probs, labels = labelled_probabilities(table)
    cls = classification_metrics(labels.tolist(), probs.argmax(axis=1).tolist(), manifest.classes)
    test.update(
        examples=cls["examples"],
        per_class=cls["per_class"],
        confusion_matrix=cls["confusion_matrix"],
        accuracy_from_predictions=cls["accuracy"],
        calibration=test_calibration(probs, labels, table),
    )
    import pyarrow.compute as pc

    from xfer.scoring.predictions import ERROR

    test["mistakes"] = mistakes(table.filter(pc.is_null(table.column(ERROR))))
    return thumbnails(manifest.shard_uris("test"), {m["key"] for m in test["mistakes"]})


def test_calibration(probs: Any, labels: Any, table: Any) -> dict[str, Any]:
    """The reliability table of the test predictions as written, and the ECE the
    network's own probabilities had (the file's temperature undone)."""
    from xfer.models.calibration import apply_temperature, expected_calibration_error
    from xfer.reports.report import calibration

    meta = table.schema.metadata or {}
    top = probs.max(axis=1) if len(probs) else probs.reshape(0)
    out = calibration(top.tolist(), (probs.argmax(axis=1) == labels).tolist() if len(probs) else [])
    out["calibrated"] = meta.get(b"xfer.probabilities") == b"calibrated"
    if out["calibrated"]:
        t = float(meta[b"xfer.temperature"])
        out["temperature"] = t
        out["ece_uncalibrated"] = expected_calibration_error(
            apply_temperature(probs, 1 / t), labels
        )
    return out
