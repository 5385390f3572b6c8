"""The object-storage layout of runs and models: the contract between training and scoring.

    <root>/datasets/<name>/                 manifest.json and Parquet shards (xfer.data.manifest)
    <root>/runs/<run_id>/config.yaml        the resolved config, written first
    <root>/runs/<run_id>/model/             model.keras + xfer_model.json, committed whole
    <root>/runs/<run_id>/metrics.json, lineage.json, report.html, logs/
    <root>/runs/<run_id>/predictions/       test.parquet: the run's own test-split predictions
    <root>/runs/<run_id>/gate/              published-test.parquet: the champion on that split
    <root>/runs/<run_id>/_SUCCESS           written last: a run without it is incomplete
    <root>/models/<name>/latest.json        the published run, moved in one conditional PUT
    <root>/models/<name>/history/           every pointer latest.json ever held

Training writes this layout and scoring reads it; both take the names from here.
A model is addressed either as a run (``…/runs/<id>``) or as a published model name
(``…/models/<name>``, through ``latest.json``): :func:`resolve_model` takes both.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from xfer.errors import NotFoundError, StorageError, XferError
from xfer.models.calibration import temperature_of
from xfer.store import storage
from xfer.store.commit import SUCCESS, commit_prefix, staging_prefix
from xfer.store.retry import ride_through
from xfer.store.s3 import MISSING_CODES, is_s3, local_path, s3_client, split_s3, translate_errors
from xfer.store.uris import is_uri

CONFIG = "config.yaml"
MODEL_DIR = "model"
MODEL_FILE = "model.keras"
MODEL_INFO = "xfer_model.json"
METRICS = "metrics.json"
LINEAGE = "lineage.json"
REPORT = "report.html"
PREDICTIONS = "predictions"
# Its own partition: committing it must not replace the run's own predictions.
GATE_PREDICTIONS = "gate"
CALIBRATION = "calibration"  # the validation split, scored to fit the temperature
CONSOLE_LOG = "logs/console.log"
TENSORBOARD = "tensorboard"
LATEST = "latest.json"
HISTORY = "history"


def dataset_uri(root: str, name: str) -> str:
    return storage.join(root, "datasets", name)


def dataset_location(root: str, dataset: str) -> str:
    """``data.dataset`` as a URI: a URI or path (it has a ``/``) as given, else the
    dataset of that name under ``<root>/datasets/``."""
    if is_uri(dataset) or "/" in dataset:  # a URI, or a path relative to here
        return dataset.rstrip("/")
    return dataset_uri(root, dataset)


def runs_prefix(root: str) -> str:
    return storage.join(root, "runs")


def run_uri(root: str, run_id: str) -> str:
    return storage.join(root, "runs", run_id)


def models_prefix(root: str) -> str:
    return storage.join(root, "models")


def model_uri(root: str, name: str) -> str:
    return storage.join(root, "models", name)


def is_complete(run: str) -> bool:
    return storage.exists(storage.join(run, SUCCESS))


def write_success(run: str, run_id: str) -> None:
    """The run's commit marker; every other output of the run exists before it."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    storage.write_json(storage.join(run, SUCCESS), {"run_id": run_id, "completed_at": now})


# ------------------------------------------------------------------ the model


@dataclass(frozen=True)
class ModelRef:
    run_uri: str
    run_id: str
    model_name: str
    model_uri: str  # <run>/model
    classes: list[str]
    image_size: int
    max_side: int | None = None  # the pre-resize of the images it was trained on
    jpeg_quality: int | None = None  # how its shards re-encoded converted images
    # Temperature scaling fitted on the run's validation split (xfer.models.calibration);
    # None: uncalibrated, the network's own probabilities.
    temperature: float | None = None

    @property
    def model_file(self) -> str:
        return storage.join(self.model_uri, MODEL_FILE)


def read_pointer(model: str) -> dict[str, Any] | None:
    """A model's ``latest.json``, or None when it is not published."""
    try:
        return storage.read_json(storage.join(model, LATEST))
    except NotFoundError:
        return None


def resolve_model(uri: str, require_committed: bool = True) -> ModelRef:
    """A run (``…/runs/<id>``) or a model name (``…/models/<name>``, via latest.json)."""
    uri = uri.rstrip("/")
    model_name = ""
    try:
        if storage.exists(storage.join(uri, LATEST)):
            pointer = storage.read_json(storage.join(uri, LATEST))
            uri, model_name = pointer["run_uri"].rstrip("/"), pointer.get("model_name", "")
    except NotFoundError as exc:
        raise XferError(f"--model {uri}: {exc}") from None
    model_dir = storage.join(uri, MODEL_DIR)
    if require_committed and not is_complete(uri):
        if storage.exists(storage.join(model_dir, MODEL_INFO)):
            raise XferError(
                f"--model {uri}: the run is not committed (no {SUCCESS}); it failed or is still running"
            )
        raise XferError(f"--model {uri}: no committed run or published model there")
    try:
        info = storage.read_json(storage.join(model_dir, MODEL_INFO))
    except NotFoundError:
        raise XferError(f"--model {uri}: no model in this run ({model_dir})") from None
    if not model_name:
        try:
            model_name = storage.read_yaml(storage.join(uri, CONFIG))["output"]["model_name"]
        except (NotFoundError, KeyError, TypeError):
            model_name = ""
    preparation = info.get("preparation") or {}
    return ModelRef(
        run_uri=uri,
        run_id=storage.basename(uri),
        model_name=model_name,
        model_uri=model_dir,
        classes=list(info["classes"]),
        image_size=int(info["image_size"]),
        max_side=preparation.get("max_side"),
        jpeg_quality=preparation.get("jpeg_quality"),
        temperature=temperature_of(info),
    )


def save_model(model: Any, info: dict[str, Any] | None, run: str) -> None:
    """Save a tf_keras model; with ``info`` (rank 0), commit it whole to ``<run>/model/``.

    Under MultiWorkerMirroredStrategy every rank must call ``save`` (it runs
    collectives); only the rank that passes ``info`` uploads its copy.
    """
    directory = tempfile.mkdtemp(prefix="xfer-model-")
    try:
        model.save(os.path.join(directory, MODEL_FILE))
        if info is not None:
            with open(os.path.join(directory, MODEL_INFO), "w") as f:
                json.dump({"file": MODEL_FILE, **info}, f, indent=2)
            final = storage.join(run, MODEL_DIR)
            staging = staging_prefix(final)
            storage.upload_dir(directory, staging)
            commit_prefix(staging, final)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ------------------------------------------------------------------ publishing

# What a store answers to a conditional PUT whose condition no longer holds (AWS
# also answers 409 to two conditional writes of one key at once).
_CONDITION_FAILED = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_NO_CONDITIONS = {"NotImplemented", "501"}


class PointerMoved(XferError):
    """``latest.json`` no longer holds what the publisher read: nothing was published."""

    def __init__(self, model: str, current: str | None):
        self.current = current  # the run latest.json names now (None: no pointer)
        super().__init__(f"{model}/{LATEST} changed meanwhile (it names run {current} now)")


@dataclass(frozen=True)
class PointerRead:
    """``latest.json`` as read (None: not published) and its S3 ETag (None locally)."""

    pointer: dict[str, Any] | None
    etag: str | None = None

    @property
    def run_id(self) -> str | None:
        return self.pointer.get("run_id") if self.pointer else None


def read_pointer_for_update(model: str) -> PointerRead:
    """``latest.json`` with what a conditional PUT needs to replace exactly this version."""
    uri = storage.join(model, LATEST)
    if not is_s3(uri):
        return PointerRead(read_pointer(model))
    return _read_s3_pointer(uri)


@ride_through("reading")
def _read_s3_pointer(uri: str) -> PointerRead:
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    with translate_errors(uri):
        try:
            answer = s3_client().get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in MISSING_CODES:
                return PointerRead(None)
            raise
        body = answer["Body"].read()
    try:
        return PointerRead(json.loads(body), answer["ETag"])
    except json.JSONDecodeError as exc:
        raise StorageError(f"{uri} is not valid JSON: {exc}") from None


def publish_pointer(
    model: str,
    model_name: str,
    run_id: str,
    run: str,
    metric: str,
    value: float | None,
    seen: PointerRead | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Point ``latest.json`` at the run, only if it still holds what ``seen`` read.

    ``seen`` is what the caller decided on (the champion a gate compared with);
    read now when not given. The PUT is conditional (If-Match on the ETag read, or
    If-None-Match when there was no pointer), so of two publishers that read the same
    pointer exactly one wins; the other gets :class:`PointerMoved`. The published
    pointer is then copied into ``history/``. ``previous_run_id`` (in ``extra``)
    defaults to the run ``seen`` names.
    """
    seen = seen if seen is not None else read_pointer_for_update(model)
    now = dt.datetime.now(dt.timezone.utc)
    pointer = {
        "model_name": model_name,
        "run_id": run_id,
        "run_uri": run,
        "model_uri": storage.join(run, MODEL_DIR),
        "test_accuracy": value if metric == "test_accuracy" else None,
        "gate": {"metric": metric, "value": value},
        "published_at": now.isoformat(timespec="milliseconds"),
        "previous_run_id": seen.run_id,
        "action": "publish",
        **extra,
    }
    _replace_pointer(model, seen, pointer)
    stamp = f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}"
    storage.write_json(storage.join(model, HISTORY, f"{stamp}-{run_id}.json"), pointer)
    return pointer


def _replace_pointer(model: str, seen: PointerRead, pointer: dict[str, Any]) -> None:
    uri = storage.join(model, LATEST)
    body = json.dumps(pointer, indent=2, default=str).encode() + b"\n"
    refused = _put_if_unchanged(uri, body, seen) if is_s3(uri) else "local"
    if refused is None:
        return
    if refused in _CONDITION_FAILED:
        _check_holds(model, pointer)  # a retried PUT of ours may have landed before
        return
    # No conditional writes here (a local root, a store without them): look again
    # right before the write (under a file lock locally), then read the write back.
    with _local_lock(model):
        now = read_pointer(model)
        if now != seen.pointer:
            raise PointerMoved(model, now.get("run_id") if now else None)
        storage.write_bytes(uri, body, "application/json")
    _check_holds(model, pointer)


def _check_holds(model: str, pointer: dict[str, Any]) -> None:
    now = read_pointer(model)
    if now != json.loads(json.dumps(pointer, default=str)):
        raise PointerMoved(model, now.get("run_id") if now else None)


@contextlib.contextmanager
def _local_lock(model: str) -> Iterator[None]:
    if is_s3(model):
        yield
        return
    import fcntl

    os.makedirs(local_path(model), exist_ok=True)
    with open(os.path.join(local_path(model), ".latest.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@ride_through("writing")
def _put_if_unchanged(uri: str, body: bytes, seen: PointerRead) -> str | None:
    """PUT ``body`` if the object is still ``seen``; the store's refusal code, or None."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    condition = {"IfMatch": seen.etag} if seen.pointer is not None else {"IfNoneMatch": "*"}
    with translate_errors(uri):
        try:
            s3_client().put_object(
                Bucket=bucket, Key=key, Body=body, ContentType="application/json", **condition
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _CONDITION_FAILED | _NO_CONDITIONS:
                return code
            raise
    return None


def history(model: str) -> list[dict[str, Any]]:
    """Every pointer the model's ``latest.json`` ever held, oldest first."""
    files = storage.list_files(storage.join(model, HISTORY))
    return [storage.read_json(f.uri) for f in files if f.uri.endswith(".json")]
