"""The quality gate of a finished run, and its publication as the model's ``latest.json``.

The run's test metric must reach ``output.gate.min_test_accuracy``, and each class's
test recall ``output.gate.min_class_recall``. With ``output.gate.vs_published`` the
run is also compared with the published model (the champion), scored by the same
code on the same test images: the comparison is paired, image by image
(:mod:`xfer.registry.paired`: McNemar's exact test on the discordant images and a bootstrap
interval of the accuracy difference), and ``output.gate.mode`` decides — ``better``
publishes only a run better beyond noise at ``output.gate.alpha``, ``not_worse``
publishes unless it is worse beyond noise.

Publication is one conditional PUT of ``latest.json``: it happens only if the
pointer still names the champion the run was compared with, so two runs finishing
together never overwrite a champion neither compared with (the loser is complete,
not published, and says so). A pointer to a run that is gone is replaced.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from xfer.config import XferConfig
from xfer.data.manifest import Manifest
from xfer.errors import XferError
from xfer.registry.layout import (
    GATE_PREDICTIONS,
    LATEST,
    PREDICTIONS,
    ModelRef,
    PointerMoved,
    PointerRead,
    publish_pointer,
    read_pointer_for_update,
    resolve_model,
)
from xfer.store import storage


def gate_and_publish(
    cfg: XferConfig,
    manifest: Manifest,
    run_id: str,
    run_uri: str,
    test: dict[str, Any],
    metric: str,
    value: float | None,
    seen: PointerRead | None = None,
    exclude: Collection[str] = (),
) -> dict[str, Any]:
    """The quality gate, then the publication: before ``_SUCCESS``, so that a run whose
    publication failed is not committed (resuming it by id publishes it), and
    ``metrics.json`` says published only once ``latest.json`` moved.

    ``latest.json`` moves only if it still holds ``seen`` (the pointer as read when
    the gate began; read here when not given), the champion the run was compared
    with; otherwise the run is complete but not published, and says why. ``exclude``:
    the test keys the run left out (``data.exclude``), left out of the champion's too.
    """
    gate = cfg.output.gate
    out: dict[str, Any] = {
        "metric": metric,
        "min_test_accuracy": gate.min_test_accuracy,
        "value": value,
        "passed": value is not None and value >= gate.min_test_accuracy,
        "class_recall": class_recall_check(test, gate.min_class_recall),
        "vs_published": None,
        "published": False,
        "latest": storage.join(cfg.model_uri(), LATEST),
    }
    if out["class_recall"] and out["class_recall"]["below"]:
        out["passed"] = False
    if not (out["passed"] and cfg.output.publish):
        return out
    seen = seen or read_pointer_for_update(cfg.model_uri())
    if seen.run_id == run_id:  # an earlier attempt of this run published it, then stopped
        print(f"[xfer] run {run_id} was published by an earlier attempt", flush=True)
        return {**out, "published": True}
    if gate.vs_published:
        out["vs_published"] = against_published(cfg, manifest, run_uri, test, seen, exclude)
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


def class_recall_check(test: dict[str, Any], floor: float) -> dict[str, Any] | None:
    """Each class's test recall against ``output.gate.min_class_recall`` (None: no floor)."""
    if not floor:
        return None
    recalls = {c: v["recall"] for c, v in (test.get("per_class") or {}).items()}
    below = {c: r for c, r in recalls.items() if r < floor}
    if not recalls:
        below = {"(no test predictions)": 0.0}
    if below:
        listed = ", ".join(f"{c} {100 * r:.1f}%" for c, r in sorted(below.items()))
        print(f"[xfer] gate: recall below {100 * floor:.1f}%: {listed}", flush=True)
    return {"floor": floor, "recall": recalls, "below": below}


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
    exclude: Collection[str] = (),
) -> dict[str, Any] | None:
    """Champion/challenger: the published model scored on this run's test split, paired.

    Both models go through the same scoring code on the same images; the decision is
    :func:`xfer.registry.paired.decide` on their right/wrong outcomes joined by key. None when
    nothing is published yet (the first run of a model is compared with no one). A
    pointer to a run that is gone (no ``_SUCCESS`` or no model) is compared with no one
    either, with a warning: the new, complete run replaces a pointer to nothing.
    """
    pointer = seen.pointer
    if pointer is None:
        return None
    gate = cfg.output.gate
    out: dict[str, Any] = {
        "run_id": pointer["run_id"],
        "mode": gate.mode,
        "alpha": gate.alpha,
        "accuracy": None,
        "challenger_accuracy": test.get("accuracy_from_predictions", test.get("accuracy")),
    }
    try:
        champion = resolve_model(pointer["run_uri"])
    except XferError as exc:
        reason = f"the champion run {pointer['run_id']} is missing ({exc}): compared with nothing"
        print(f"[xfer] warning: gate: {reason}", flush=True)
        return {**out, "beaten": True, "missing": True, "reason": reason}
    if champion.classes != manifest.classes:
        return {**out, "beaten": False, "reason": "the published model has other classes"}
    if not ("test" in manifest.splits and manifest.splits["test"].rows):
        return {**out, "beaten": False, "reason": "no test split to compare on"}
    mine = test_predictions(cfg, manifest, run_uri, exclude)
    theirs = scored_on_test(champion, cfg, manifest, run_uri, "published-test.parquet", exclude)
    return {**out, **paired_verdict(mine, theirs, gate.mode, gate.alpha, pointer["run_id"])}


def paired_verdict(
    mine: Any, theirs: Any, mode: str, alpha: float, champion: str
) -> dict[str, Any]:
    """The paired comparison of two prediction tables, decided, as ``metrics.json`` keeps it."""
    from xfer.registry.paired import compare, decide, outcomes, summary_line

    right, champion_right, left_out = outcomes(mine, theirs)
    if not len(right):
        return {"beaten": False, "reason": "no test image scored by both models"}
    cmp = compare(right, champion_right, alpha)
    passes, verdict = decide(cmp, mode, alpha)
    wanted = "better beyond noise" if mode == "better" else "not worse beyond noise"
    print(
        f"[xfer] gate vs the published run {champion} ({mode}, alpha {alpha}): "
        f"{summary_line(cmp)}: {verdict}; "
        + ("published" if passes else f"not published ({wanted} is needed)"),
        flush=True,
    )
    return {
        **cmp.as_dict(),
        **left_out,
        "accuracy": cmp.champion_accuracy,
        "challenger_accuracy": cmp.challenger_accuracy,
        "verdict": verdict,
        "p_value": cmp.p_better if mode == "better" else cmp.p_worse,
        "beaten": passes,
    }


def test_predictions(
    cfg: XferConfig, manifest: Manifest, run_uri: str, exclude: Collection[str] = ()
) -> Any:
    """This run's own test predictions (scored by finish_run), scored here if it kept none."""
    own = storage.join(run_uri, PREDICTIONS, "test.parquet")
    if storage.exists(own):
        return storage.read_parquet(own)
    ref = resolve_model(run_uri, require_committed=False)
    return scored_on_test(ref, cfg, manifest, run_uri, "challenger-test.parquet", exclude)


def scored_on_test(
    ref: ModelRef,
    cfg: XferConfig,
    manifest: Manifest,
    run_uri: str,
    name: str,
    exclude: Collection[str] = (),
) -> Any:
    """``ref`` scored on the run's test split into ``<run>/gate/<name>``."""
    from xfer.scoring.score import write_predictions

    preds = storage.join(run_uri, GATE_PREDICTIONS)
    write_predictions(
        ref,
        manifest.uri,
        cfg.score,
        preds,
        single_file=name,
        split="test",
        quiet=True,
        exclude=exclude,
    )
    return storage.read_parquet(storage.join(preds, name))


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
