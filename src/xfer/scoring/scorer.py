"""The scoring actor: one block of a night at a time, read to written.

Each :class:`BlockScorer` actor loads the model once, then for every block it is
given reads the block's images (objects, or rows of a dataset's shards), prepares
them in a thread pool while the model predicts the previous batch, and writes the
block's predictions as one Parquet object into the night's staging prefix (one PUT:
a block is either wholly there or not at all). Only a one-row summary goes back to
the driver, so its memory does not grow with the number of images.

Pixels: :func:`image_pixels` applies the same normalisation as sharding
(:func:`xfer.data.images.normalise`) with the pre-resize the model recorded, then the
training path's resize; a plain upright RGB JPEG/PNG is decoded exactly as training
decodes it (:func:`xfer.data.preprocess.decode_and_resize`).
"""

from __future__ import annotations

import collections
import os
import socket
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from xfer.data.images import image_pixels
from xfer.errors import NotFoundError, StorageError, StoreUnavailable
from xfer.models.calibration import apply_temperature
from xfer.registry.layout import MODEL_FILE
from xfer.scoring.predictions import predictions_table
from xfer.scoring.scorejob import NightPlan, ScoringJob
from xfer.store import s3, storage
from xfer.store.retry import budget, ride_through


class InputRefused(Exception):
    """A read refused for reasons no other object of the night escapes: a missing
    bucket, access denied, rejected credentials. The night fails before its commit."""


@ride_through("reading")
def read_capped(uri: str, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``uri``: more than ``limit`` means too large.

    Never reads past the cap: a multi-GB object, or ``/dev/zero`` named in a list,
    costs ``limit`` bytes, not the actor.
    """
    from botocore.exceptions import ClientError

    with s3.translate_errors(uri):
        if not s3.is_s3(uri):
            try:
                with open(s3.local_path(uri), "rb") as f:
                    return f.read(limit + 1)
            except (IsADirectoryError, NotADirectoryError):
                raise NotFoundError(f"not a file: {uri}") from None
        bucket, key = s3.split_s3(uri)
        try:
            got = s3.s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{limit}")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # an empty object has no byte 0
            raise
        data: bytes = got["Body"].read(limit + 1)
        return data


def _read_input(item: dict[str, Any], max_mb: float) -> bytes | str:
    """An input's bytes, or the reason (str) of its error row; InputRefused if the
    read was refused for the whole night."""
    limit = int(max_mb * 2**20)
    too_large = f"too large: over score.max_object_mb ({max_mb:g} MB)"
    if item.get("size") is not None and int(item["size"]) > limit:
        return f"{too_large}: {int(item['size'])} bytes"
    uri = item["source_uri"]
    try:
        data = read_capped(uri, limit)
    except StoreUnavailable:
        raise  # past the budget: the night fails, nothing is committed
    except NotFoundError as exc:
        if s3.is_s3(uri):
            try:
                s3.check_bucket(uri)  # one missing object, or its whole bucket?
            except StoreUnavailable:
                raise
            except StorageError as refused:
                raise InputRefused(f"{uri}: {refused}") from None
        return f"cannot read: {exc}"
    except StorageError as exc:
        raise InputRefused(f"{uri}: {str(exc).splitlines()[0]}") from None
    return too_large if len(data) > limit else data


class BlockScorer:
    """The actor stage of a night: ``map_batches`` over block numbers, one block a call.

    Everything it does rides through store outages for ``job.outage_seconds``
    (:func:`xfer.store.retry.budget`), the driver's budget.
    """

    def __init__(self, job: ScoringJob, plan: NightPlan, code: dict[str, Any] | None = None):
        import ray

        import xfer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
        from xfer.registry.provenance import check_same_code, describe

        node = ray.get_runtime_context().get_node_id()[:12]
        where = f"scorer on node {node} ({socket.gethostname()}, pid {os.getpid()})"
        print(f"{job.tag} {where}: {describe(check_same_code(code, where))}", flush=True)
        self.job, self.plan = job, plan
        self.threads = max(1, job.threads)
        with budget(job.outage_seconds):
            self.model = self._load_model(job.model.model_uri, self.threads)
        self.forward = self._forward(self.model, job.tta)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="xfer-decode")
        # Reads wait on the store, decodes on the CPU: separate pools, so a GET's latency
        # is hidden by the reads in flight instead of idling a decode thread.
        self.reads = ThreadPoolExecutor(max(1, job.read_threads), thread_name_prefix="xfer-read")

    @staticmethod
    def _forward(model: Any, tta: bool) -> Any:
        import tensorflow as tf

        if tta:
            # Test-time augmentation: the mean of the image's and its mirror's outputs.
            return tf.function(
                lambda x: (model(x, training=False) + model(x[:, :, ::-1, :], training=False)) / 2
            )
        return tf.function(lambda x: model(x, training=False))

    @staticmethod
    def _load_model(model_uri: str, threads: int) -> Any:
        import tensorflow as tf
        import tf_keras

        from xfer.devices import enable_memory_growth

        # As many compute threads as CPUs this actor was given: actors sharing a node
        # must not each use every core.
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(2)
        enable_memory_growth()
        path = os.path.join(tempfile.mkdtemp(prefix="xfer-scorer-"), MODEL_FILE)
        storage.download_file(storage.join(model_uri, MODEL_FILE), path)  # rides through
        return tf_keras.models.load_model(path, compile=False)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, list[Any]] = collections.defaultdict(list)
        with budget(self.job.outage_seconds):
            for block in batch["block"]:
                summary = self.score_block(int(block))
                for key, value in summary.items():
                    out[key].append(value)
        return dict(out)

    # ----------------------------------------------------------------- a block

    def score_block(self, block: int) -> dict[str, Any]:
        from xfer.scoring.scoreplan import block_items, part_name

        plan = self.plan
        start = time.monotonic()
        items = block_items(plan, block, self.job.exclude)
        try:
            probs, errors = self._predict(items)
        except InputRefused as exc:  # no part: the driver fails the night
            return {
                "block": block,
                "rows": 0,
                "errors": 0,
                "file": "",
                "seconds": 0.0,
                "refused": str(exc),
            }
        labels = plan.label_classes if plan.has_labels else None
        table = predictions_table(self.job, items, probs, errors, labels)
        name = part_name(plan, block)
        storage.write_parquet(table, storage.join(plan.parts_uri, name))
        return {
            "block": block,
            "rows": table.num_rows,
            "errors": sum(e is not None for e in errors),
            "file": name,
            "seconds": time.monotonic() - start,
            "refused": "",
        }

    def _fetch(self, item: dict[str, Any]) -> Future[Any]:
        """On a read thread: the item's bytes, then their decode queued on the decode pool.

        The future gives the pixels, or the row's error text."""
        data = item.get("image")
        if data is None:
            data = _read_input(item, self.job.max_object_mb)
            if isinstance(data, str):
                failed: Future[Any] = Future()
                failed.set_result(data)
                return failed
        return self.pool.submit(self._decode, bytes(data))

    def _decode(self, data: bytes) -> Any:
        model = self.job.model
        return image_pixels(
            data, model.image_size, model.max_side, self.job.max_pixels, model.jpeg_quality
        )

    def _predict(self, items: list[dict[str, Any]]) -> tuple[Any, list[str | None]]:
        """Probabilities [n, classes] (NaN for errors) and the error of each row.

        Images are read (``read_threads`` at a time) and decoded (``decode_threads``) up
        to two batches ahead of the model.
        """
        import numpy as np

        n, size = len(items), self.job.batch_size
        probs = np.full((n, len(self.job.model.classes)), np.nan)
        errors: list[str | None] = [None] * n
        pending: collections.deque[tuple[int, list[Future[Any]]]] = collections.deque()
        starts = iter(range(0, n, size))

        def submit() -> None:
            begin = next(starts, None)
            if begin is not None:
                chunk = items[begin : begin + size]
                pending.append((begin, [self.reads.submit(self._fetch, it) for it in chunk]))

        for _ in range(3):
            submit()
        while pending:
            begin, futures = pending.popleft()
            results = [f.result().result() for f in futures]
            submit()
            good = [i for i, r in enumerate(results) if not isinstance(r, str)]
            for i, r in enumerate(results):
                if isinstance(r, str):
                    errors[begin + i] = r
            if good:
                out = self._probabilities([results[i] for i in good])
                for j, i in enumerate(good):
                    probs[begin + i] = out[j]
        return probs, errors

    def _probabilities(self, pixels: list[Any]) -> Any:
        """The model's probabilities [len(pixels), classes] (calibrated if the job says)."""
        import numpy as np

        x = np.zeros((self.job.batch_size, *pixels[0].shape), dtype=np.float32)
        for j, p in enumerate(pixels):
            x[j] = p
        # Always a full batch: one traced shape, padding rows ignored.
        out = np.asarray(self.forward(x), dtype=np.float64)[: len(pixels)]
        if len(self.job.model.classes) == 2:
            out = np.stack([1.0 - out.reshape(-1), out.reshape(-1)], axis=1)
        if self.job.temperature is not None:
            out = apply_temperature(out, self.job.temperature)
        return out
