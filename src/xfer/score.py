"""`xfer score`: batch scoring with Ray Data, Parquet predictions in object storage.

    xfer score --model s3://b/xfer/models/pets --input s3://b/incoming/2026-11-27/ \\
               --output s3://b/xfer/predictions/pets --date 2026-11-27

The pipeline: read (and, for raw inputs, fetch) then decode/resize in CPU tasks;
predict in an actor pool (``map_batches`` with ``compute=ActorPoolStrategy``), each
actor loading the model once in ``__init__``. A bad image becomes a row with an
``error``, never a failed night. Predictions stream back to the driver (they are
small) and are written as Parquet parts into a staging prefix, then committed:
``dt=<date>/`` is replaced whole with ``_SUCCESS`` written last, so a reader never
sees a mix of two runs or half a partition. The training job writes its
``predictions/test.parquet`` through this same code.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from xfer import storage
from xfer.config import ScoreConfig, XferConfig
from xfer.errors import DataError, NotFoundError, XferError
from xfer.images import open_header

MODEL_FILE = "model.keras"
MODEL_INFO = "xfer_model.json"
SUCCESS = "_SUCCESS"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
ROWS_PER_PART = 500_000


# --------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelRef:
    run_uri: str
    run_id: str
    model_name: str
    model_uri: str  # <run>/model
    classes: list[str]
    image_size: int


def resolve_model(uri: str, require_committed: bool = True) -> ModelRef:
    """A run (``…/runs/<id>``) or a model name (``…/models/<name>``, via latest.json)."""
    uri = uri.rstrip("/")
    latest = storage.join(uri, "latest.json")
    model_name = ""
    try:
        if storage.exists(latest):
            pointer = storage.read_json(latest)
            uri, model_name = pointer["run_uri"].rstrip("/"), pointer.get("model_name", "")
    except NotFoundError as exc:
        raise XferError(f"--model {uri}: {exc}") from None
    if require_committed and not storage.exists(storage.join(uri, SUCCESS)):
        if storage.exists(storage.join(uri, "model", MODEL_INFO)):
            raise XferError(
                f"--model {uri}: the run is not committed (no {SUCCESS}); it failed or is still running"
            )
        raise XferError(f"--model {uri}: no committed run or published model there")
    try:
        info = storage.read_json(storage.join(uri, "model", MODEL_INFO))
    except NotFoundError:
        raise XferError(
            f"--model {uri}: no model in this run ({storage.join(uri, 'model')})"
        ) from None
    if not model_name:
        try:
            model_name = storage.read_yaml(storage.join(uri, "config.yaml"))["output"]["model_name"]
        except (NotFoundError, KeyError, TypeError):
            model_name = ""
    return ModelRef(
        run_uri=uri,
        run_id=storage.basename(uri),
        model_name=model_name,
        model_uri=storage.join(uri, "model"),
        classes=list(info["classes"]),
        image_size=int(info["image_size"]),
    )


def class_column(name: str) -> str:
    return "prob_" + re.sub(r"[^0-9A-Za-z_]", "_", name)


# ----------------------------------------------------------- pipeline stages


_DECODERS: dict[int, Any] = {}


def _decoder(image_size: int) -> Any:
    """The training path's decode_and_resize as a compiled function, once per process."""
    if image_size not in _DECODERS:
        import tensorflow as tf

        import xfer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
        from xfer.preprocess import decode_and_resize

        _DECODERS[image_size] = tf.function(
            lambda b: decode_and_resize(b, image_size),
            input_signature=[tf.TensorSpec((), tf.string)],
        )
    return _DECODERS[image_size]


def decode_images(
    batch: dict[str, Any], image_size: int, max_pixels: int = 50_000_000
) -> dict[str, Any]:
    """CPU stage: (fetch and) decode + resize each image; failures become errors.

    The same :func:`xfer.preprocess.decode_and_resize` as training. The header is
    checked first (:func:`xfer.images.open_header`), so a decompression bomb is
    refused before it is decoded.
    """
    import numpy as np

    n = len(batch["key"])
    pixels = np.zeros((n, image_size, image_size, 3), dtype=np.float32)
    errors: list[str] = [""] * n  # "" = no error (survives Ray's block conversions)
    images = batch.get("image")
    decode = _decoder(image_size)
    for i in range(n):
        try:
            data = (
                images[i] if images is not None else storage.read_bytes(str(batch["source_uri"][i]))
            )
        except storage.StorageError as exc:
            errors[i] = f"cannot read: {exc}"
            continue
        data = bytes(data)
        header = open_header(data, max_pixels)
        if isinstance(header, str):
            errors[i] = header
            continue
        try:
            pixels[i] = decode(data).numpy()
        except Exception as exc:
            errors[i] = f"cannot decode: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    out = {k: v for k, v in batch.items() if k != "image"}
    out["pixels"] = pixels
    out["error"] = np.array(errors, dtype=object)
    return out


class Predictor:
    """Actor stage: loads the model once, predicts batches (STYLE: Ray's shape)."""

    def __init__(
        self,
        model_uri: str,
        classes: list[str],
        model_name: str,
        run_id: str,
        scored_at: str,
        code: dict[str, Any] | None = None,
    ):
        import socket

        import ray
        import tf_keras

        import xfer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
        from xfer.devices import enable_memory_growth
        from xfer.provenance import check_same_code, describe

        node = ray.get_runtime_context().get_node_id()[:12]
        where = f"predictor on node {node} ({socket.gethostname()}, pid {os.getpid()})"
        print(f"[xfer] {where}: {describe(check_same_code(code, where))}", flush=True)

        enable_memory_growth()
        local = tempfile.mkdtemp(prefix="xfer-scorer-")
        path = os.path.join(local, MODEL_FILE)
        storage.download_file(storage.join(model_uri, MODEL_FILE), path)
        self.model = tf_keras.models.load_model(path, compile=False)
        self.classes = classes
        self.model_name, self.run_id, self.scored_at = model_name, run_id, scored_at

    def probabilities(self, pixels: Any) -> Any:
        import numpy as np

        out = np.asarray(self.model(pixels, training=False), dtype=np.float64)
        if len(self.classes) == 2:
            p = out.reshape(-1)
            return np.stack([1.0 - p, p], axis=1)
        return out

    def __call__(self, batch: dict[str, Any]) -> Any:
        import numpy as np
        import pyarrow as pa

        n = len(batch["key"])
        errors = [str(e) if isinstance(e, str) and e else None for e in batch["error"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        probs = np.full((n, len(self.classes)), np.nan)
        if ok.any():
            probs[ok] = self.probabilities(batch["pixels"][ok])
        index = np.where(ok, probs.argmax(axis=1) if n else 0, -1)
        cols: dict[str, Any] = {
            "key": pa.array([str(k) for k in batch["key"]], pa.string()),
            "source_uri": pa.array([str(u) for u in batch["source_uri"]], pa.string()),
            "predicted_label": pa.array(
                [self.classes[i] if o else None for i, o in zip(index, ok, strict=True)],
                pa.string(),
            ),
            "predicted_index": pa.array(
                [int(i) if o else None for i, o in zip(index, ok, strict=True)], pa.int32()
            ),
            "probability": pa.array(
                [
                    float(probs[r, i]) if o else None
                    for r, (i, o) in enumerate(zip(index, ok, strict=True))
                ],
                pa.float64(),
            ),
        }
        for c, name in enumerate(self.classes):
            cols[class_column(name)] = pa.array(
                [float(p) if o else None for p, o in zip(probs[:, c], ok, strict=True)],
                pa.float64(),
            )
        if "label" in batch:
            labels = [int(v) for v in batch["label"]]
            cols["true_index"] = pa.array(labels, pa.int32())
            cols["true_label"] = pa.array([self.classes[v] for v in labels], pa.string())
        cols["model_name"] = pa.array([self.model_name] * n, pa.string())
        cols["run_id"] = pa.array([self.run_id] * n, pa.string())
        cols["scored_at"] = pa.array([self.scored_at] * n, pa.string())
        cols["error"] = pa.array(errors, pa.string())
        return pa.table(cols)


# ------------------------------------------------------------------ inputs


def input_dataset(input_uri: str, split: str) -> tuple[Any, int]:
    """A Ray Dataset with key, source_uri and image (or only URIs, fetched later)."""
    import ray.data

    from xfer.manifest import MANIFEST, load_manifest

    uri = input_uri.rstrip("/")
    if uri.endswith(MANIFEST) or storage.exists(storage.join(uri, MANIFEST)):
        manifest = load_manifest(uri)
        rows = manifest.split(split).rows
        if rows == 0:
            raise DataError(f"--input {uri}: split {split!r} is empty; nothing to score")
        paths = manifest.shard_uris(split)
        fs, _ = storage.arrow_filesystem(paths[0])
        arrow_paths = [storage.arrow_filesystem(p)[1] for p in paths]
        ds = ray.data.read_parquet(
            arrow_paths, filesystem=fs, columns=["key", "image", "label", "source_uri"]
        )
        return ds, rows
    if uri.lower().endswith((".csv", ".parquet")):
        items = _list_rows(uri)
    else:
        try:
            files = storage.list_files(uri)
        except NotFoundError as exc:
            raise DataError(f"--input {uri}: {exc}") from None
        base = uri + "/"
        items = [
            {"key": f.uri[len(base) :] if f.uri.startswith(base) else f.uri, "source_uri": f.uri}
            for f in files
            if not storage.basename(f.uri).startswith((".", "_"))
        ]
    if not items:
        raise DataError(f"--input {uri}: no images found; nothing to score")
    return ray.data.from_items(items), len(items)


def _list_rows(uri: str) -> list[dict[str, str]]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data = storage.read_bytes(uri)
    try:
        table = (
            pacsv.read_csv(io.BytesIO(data))
            if uri.lower().endswith(".csv")
            else pq.read_table(io.BytesIO(data))
        )
    except Exception as exc:
        raise DataError(f"--input {uri}: cannot read the list: {exc}") from None
    if "uri" not in table.column_names:
        raise DataError(f"--input {uri}: needs a 'uri' column")
    base = storage.parent(uri)
    rows = []
    for u in table.column("uri").to_pylist():
        if u:
            u = str(u).strip()
            full = u if storage.is_s3(u) or u.startswith("/") else storage.join(base, u)
            rows.append({"key": u, "source_uri": full})
    return rows


# ---------------------------------------------------------------- pipeline


def predictions(ref: ModelRef, ds: Any, sc: ScoreConfig, scored_at: str) -> Any:
    """The scoring pipeline over ``ds``: decode tasks, then the predictor actor pool."""
    import warnings

    import ray.data

    # Small inputs give fewer blocks than decode tasks; Ray Data warns. Harmless.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks")

    from xfer.provenance import code_identity
    from xfer.raycluster import runtime_env

    decoded = ds.map_batches(
        decode_images,
        fn_kwargs={"image_size": ref.image_size},
        batch_size=sc.batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=sc.read_parallelism),
        num_cpus=1,
        runtime_env=runtime_env(use_gpu=False),
        # Reads from object storage can fail transiently: retry the task. (Also keeps
        # Ray Data from fusing decoding into the predictor actors: decoding must run in
        # parallel CPU tasks, not serially inside each actor.)
        max_retries=3,
    )
    return decoded.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model_uri": ref.model_uri,
            "classes": ref.classes,
            "model_name": ref.model_name,
            "run_id": ref.run_id,
            "scored_at": scored_at,
            "code": code_identity(),  # the actors check they run the driver's code
        },
        batch_size=sc.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=sc.num_actors),
        num_cpus=sc.cpus_per_actor,
        num_gpus=sc.gpus_per_actor if sc.use_gpu else 0,
        runtime_env=runtime_env(use_gpu=sc.use_gpu),
    )


def _write_parts(
    batches: Iterator[Any], directory: str, single_file: str | None, token: str
) -> tuple[list[str], int, int]:
    """Stream prediction batches into Parquet parts; returns (files, rows, errors)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files: list[str] = []
    rows = errors = 0
    writer = None
    in_part = 0
    for table in batches:
        if table.num_rows == 0:
            continue
        if writer is None or (single_file is None and in_part >= ROWS_PER_PART):
            if writer is not None:
                writer.close()
            name = single_file or f"part-{len(files):05d}-{token}.parquet"
            files.append(name)
            writer = pq.ParquetWriter(os.path.join(directory, name), table.schema)
            in_part = 0
        writer.write_table(table.cast(writer.schema))
        in_part += table.num_rows
        rows += table.num_rows
        errors += table.num_rows - int(pc.sum(pc.is_null(table.column("error"))).as_py() or 0)
    if writer is not None:
        writer.close()
    return files, rows, errors


@dataclass
class ScoreResult:
    output: str
    rows: int
    errors: int
    seconds: float
    model: ModelRef

    @property
    def images_per_s(self) -> float:
        return self.rows / max(self.seconds, 1e-9)

    def describe(self) -> str:
        return (
            f"scored {self.rows} inputs ({self.errors} with errors) with {self.model.model_name or 'model'} "
            f"run {self.model.run_id} in {self.seconds:.1f}s ({self.images_per_s:.1f} images/s)\n"
            f"  predictions: {self.output}"
        )


def write_predictions(
    ref: ModelRef, ds: Any, sc: ScoreConfig, final: str, single_file: str | None = None
) -> tuple[int, int, dict[str, Any]]:
    """Run the pipeline and commit its output at ``final`` (a prefix), marker last."""
    now = dt.datetime.now(dt.timezone.utc)
    scored_at = now.isoformat(timespec="seconds")
    token = f"{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"  # new file names on every run
    pipeline = predictions(ref, ds, sc, scored_at)
    local = tempfile.mkdtemp(prefix="xfer-pred-")
    try:
        batches = pipeline.iter_batches(batch_format="pyarrow", batch_size=None)
        files, rows, errors = _write_parts(batches, local, single_file, token)
        if rows == 0:
            raise DataError("no rows were scored; nothing written")
        marker = {
            "rows": rows,
            "errors": errors,
            "files": files,
            "run_id": ref.run_id,
            "model_name": ref.model_name,
            "scored_at": scored_at,
        }
        staging = storage.staging_prefix(final)
        storage.upload_dir(local, staging)
        body = json.dumps(marker, indent=2).encode()
        storage.commit_partition(staging, final, marker=SUCCESS, marker_body=body, keep=files)
    finally:
        import shutil

        shutil.rmtree(local, ignore_errors=True)
    return rows, errors, marker


def score(
    cfg: XferConfig, model: str, input_uri: str, output: str, date: str | None = None
) -> ScoreResult:
    """Score ``input_uri`` with ``model`` into ``output/dt=<date>/`` (replaced whole)."""
    from xfer.raycluster import check_capacity, ensure_ray, is_local

    cfg.apply_storage_env()
    day = date or dt.datetime.now(dt.timezone.utc).date().isoformat()
    try:
        dt.date.fromisoformat(day)
    except ValueError:
        raise XferError(f"--date {day!r} is not a date (YYYY-MM-DD)") from None
    start = time.monotonic()
    ref = resolve_model(model)
    started = ensure_ray(cfg.cluster.address, cfg.cluster.local_num_cpus)
    sc = cfg.score
    # The actors, plus at least one CPU for the decode tasks beside them.
    check_capacity(
        sc.num_actors * sc.cpus_per_actor + 1,
        sc.num_actors * sc.gpus_per_actor if sc.use_gpu else 0,
        "score.num_actors x score.cpus_per_actor / gpus_per_actor (+1 CPU to decode), "
        "score.use_gpu",
        is_local(started, cfg.cluster.address),
    )
    ds, _ = input_dataset(input_uri, cfg.score.split)
    final = storage.join(output, f"dt={day}")
    if storage.is_s3(final):
        storage.ensure_bucket(final)
    rows, errors, _ = write_predictions(ref, ds, cfg.score, final)
    return ScoreResult(final, rows, errors, time.monotonic() - start, ref)
