"""The quality gate of a finished run, and its publication as the model's ``latest.json``.

The run's test metric must reach ``output.gate.min_test_accuracy``; with
``output.gate.vs_published`` it must also beat the published model (the champion)
scored by the same code on the same test images, by ``output.gate.margin``.
Publication is one conditional PUT of ``latest.json``: it happens only if the
pointer still names the champion the run was compared with, so two runs finishing
together never overwrite a champion neither compared with (the loser is complete,
not published, and says so). A pointer to a run that is gone is replaced.
"""

from __future__ import annotations

from typing import Any

from xfer import storage
from xfer.config import XferConfig
from xfer.errors import XferError
from xfer.layout import (
    GATE_PREDICTIONS,
    LATEST,
    PointerMoved,
    PointerRead,
    publish_pointer,
    read_pointer_for_update,
    resolve_model,
)
from xfer.manifest import Manifest


def gate_and_publish(
    cfg: XferConfig,
    manifest: Manifest,
    run_id: str,
    run_uri: str,
    test: dict[str, Any],
    metric: str,
    value: float | None,
    seen: PointerRead | None = None,
) -> dict[str, Any]:
    """The quality gate, then the publication: before ``_SUCCESS``, so that a run whose
    publication failed is not committed (resuming it by id publishes it), and
    ``metrics.json`` says published only once ``latest.json`` moved.

    ``latest.json`` moves only if it still holds ``seen`` (the pointer as read when
    the gate began; read here when not given), the champion the run was compared
    with; otherwise the run is complete but not published, and says why.
    """
    out: dict[str, Any] = {
        "metric": metric,
        "min_test_accuracy": cfg.output.gate.min_test_accuracy,
        "value": value,
        "passed": value is not None and value >= cfg.output.gate.min_test_accuracy,
        "vs_published": None,
        "published": False,
        "latest": storage.join(cfg.model_uri(), LATEST),
    }
    if not (out["passed"] and cfg.output.publish):
        return out
    seen = seen or read_pointer_for_update(cfg.model_uri())
    if seen.run_id == run_id:  # an earlier attempt of this run published it, then stopped
        print(f"[xfer] run {run_id} was published by an earlier attempt", flush=True)
        return {**out, "published": True}
    if cfg.output.gate.vs_published:
        out["vs_published"] = against_published(cfg, manifest, run_uri, test, seen)
        out["passed"] = out["vs_published"] is None or out["vs_published"]["beaten"]
    if not out["passed"]:
        return out
    try:
        publish(cfg, run_id, run_uri, metric, value, seen)
    except PointerMoved as exc:
        out["lost_race"] = {"compared_with": seen.run_id, "champion_now": exc.current}
        print(f"[xfer] {lost_race_text(run_id, out['lost_race'])}", flush=True)
        return out
    return {**out, "published": True}


def lost_race_text(run_id: str, lost: dict[str, Any]) -> str:
    now = lost["champion_now"]
    return (
        f"not published: the champion changed to {now} while this run was gated; compare "
        f"them (`xfer runs compare {now} {run_id}`), then `xfer runs promote {run_id}` publishes it"
    )


def against_published(
    cfg: XferConfig,
    manifest: Manifest,
    run_uri: str,
    test: dict[str, Any],
    seen: PointerRead,
) -> dict[str, Any] | None:
    """Champion/challenger: the published model scored on this run's test split.

    Both models go through the same scoring code on the same images; the run must
    reach the champion's accuracy plus ``output.gate.margin``. None when nothing is
    published yet (the first run of a model is compared with no one). A pointer to
    a run that is gone (no ``_SUCCESS`` or no model) is compared with no one either,
    with a warning: the new, complete run replaces a pointer to nothing.
    """
    import pyarrow.compute as pc

    from xfer.score import write_predictions

    pointer = seen.pointer
    if pointer is None:
        return None
    margin = cfg.output.gate.margin
    out: dict[str, Any] = {"run_id": pointer["run_id"], "margin": margin, "accuracy": None}
    own = test.get("accuracy_from_predictions", test.get("accuracy"))
    out["challenger_accuracy"] = own
    try:
        champion = resolve_model(pointer["run_uri"])
    except XferError as exc:
        reason = f"the champion run {pointer['run_id']} is missing ({exc}): compared with nothing"
        print(f"[xfer] warning: gate: {reason}", flush=True)
        return {**out, "beaten": True, "missing": True, "reason": reason}
    if champion.classes != manifest.classes:
        return {**out, "beaten": False, "reason": "the published model has other classes"}
    if own is None or not ("test" in manifest.splits and manifest.splits["test"].rows):
        return {**out, "beaten": False, "reason": "no test split to compare on"}
    preds = storage.join(run_uri, GATE_PREDICTIONS)
    write_predictions(
        champion,
        manifest.uri,
        cfg.score,
        preds,
        single_file="published-test.parquet",
        split="test",
        quiet=True,
    )
    table = storage.read_parquet(storage.join(preds, "published-test.parquet"))
    table = table.filter(pc.is_null(table.column("error")))
    right = pc.sum(pc.equal(table.column("true_index"), table.column("predicted_index"))).as_py()
    accuracy = (right or 0) / max(table.num_rows, 1)
    beaten = own >= accuracy + margin
    print(
        f"[xfer] gate vs the published run {pointer['run_id']}: {100 * own:.1f}% against "
        f"{100 * accuracy:.1f}% (+{100 * margin:.1f} points needed): "
        + ("beaten" if beaten else "not beaten, not published"),
        flush=True,
    )
    return {**out, "accuracy": accuracy, "beaten": beaten}


def publish(
    cfg: XferConfig,
    run_id: str,
    run_uri: str,
    metric: str,
    accuracy: float | None,
    seen: PointerRead,
) -> None:
    """Point ``models/<name>/latest.json`` at the run if it still holds ``seen``."""
    publish_pointer(cfg.model_uri(), cfg.output.model_name, run_id, run_uri, metric, accuracy, seen)
