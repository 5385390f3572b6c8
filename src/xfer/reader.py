"""The training reader: manifest + split + worker rank -> ``tf.data.Dataset``.

    spec = ReaderSpec(manifest, "train", image_size=224, per_replica_batch=32, training=True)
    dist = strategy.distribute_datasets_from_function(lambda ctx: make_dataset(spec, ctx))
    model.fit(dist, steps_per_epoch=spec.steps_per_epoch(strategy.num_replicas_in_sync), ...)

Why it is shaped like this (docs/design.md, decision 3): a dataset holding only this
worker's data, passed straight to ``fit`` under MultiWorkerMirroredStrategy, is
treated as the *global* batch and split across workers, silently training each
worker on a fraction of its data. So the dataset is built per input pipeline and
batched per replica, and every worker runs the same number of steps, computed from
the manifest's row counts.

The plan for one epoch, the same on every worker:
- the split's row groups (units of rows listed in the manifest) are permuted with a
  seed and the epoch number, giving one global order of the N rows;
- ``steps = ceil(N / global_batch)`` and ``T = steps * global_batch`` slots; slot ``s``
  holds row ``s mod N`` with weight 1 if ``s < N`` and weight 0 otherwise (padding);
- pipeline ``p`` of ``P`` takes slots ``[p*T/P, (p+1)*T/P)``: disjoint and equal.
So every real example is seen exactly once per epoch (weight 1), every worker runs
the same number of steps, and padding rows (weight 0) change neither loss nor
metrics. Rows stream from object storage through pyarrow, a few row groups ahead in
threads; decode, resize and augmentation run in parallel ``tf.data`` maps.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from xfer import s3, storage
from xfer.errors import StoreUnavailable
from xfer.manifest import Manifest
from xfer.preprocess import AugmentSettings, augment, decode_and_resize
from xfer.retry import ride_through

NO_AUGMENT = AugmentSettings(flip=False, rotation=0.0, zoom=0.0)


@dataclass(frozen=True)
class Unit:
    """One row group of one shard: the smallest piece the reader fetches."""

    shard: int
    row_group: int
    rows: int


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of a unit, all with the same weight."""

    shard: int
    row_group: int
    start: int
    stop: int
    weight: float


@dataclass(frozen=True)
class ReaderSpec:
    manifest: Manifest
    split: str
    image_size: int
    per_replica_batch: int
    training: bool = False
    augment: AugmentSettings = NO_AUGMENT
    seed: int = 0
    start_epoch: int = 0
    shuffle_buffer: int = 1024
    parallel_reads: int = 4
    decode: bool = True  # False: yield the encoded bytes, not decoded pixels
    with_keys: bool = False  # True: elements start with the row's key (tests, caching)
    # Cached base features instead of images: the column holds raw float16 vectors.
    column: str = "image"
    feature_dim: int | None = None

    def units(self) -> list[Unit]:
        out: list[Unit] = []
        for si, shard in enumerate(self.manifest.split(self.split).shards):
            groups = shard.row_groups or [shard.rows]
            out.extend(Unit(si, gi, n) for gi, n in enumerate(groups))
        return out

    @property
    def num_rows(self) -> int:
        return self.manifest.split(self.split).rows

    def steps_per_epoch(self, num_replicas: int) -> int:
        """Steps for one pass over the split, the same on every worker."""
        return max(1, math.ceil(self.num_rows / (self.per_replica_batch * num_replicas)))


def epoch_order(units: list[Unit], seed: int, epoch: int, shuffle: bool) -> list[Unit]:
    if not shuffle:
        return list(units)
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    return [units[i] for i in rng.permutation(len(units))]


def pipeline_segments(
    units: list[Unit], total_slots: int, pipeline: int, num_pipelines: int
) -> list[Segment]:
    """The segments (with weights) that pipeline ``pipeline`` reads in one epoch."""
    n = sum(u.rows for u in units)
    if n == 0:
        return []
    lo = pipeline * total_slots // num_pipelines
    hi = (pipeline + 1) * total_slots // num_pipelines
    starts = np.cumsum([0] + [u.rows for u in units])
    out: list[Segment] = []
    pos = lo
    while pos < hi:
        row = pos % n
        weight = 1.0 if pos < n else 0.0
        run = min(hi - pos, n - row)  # up to the end of this pass over the rows
        # Split [row, row + run) by unit boundaries.
        end = row + run
        ui = int(np.searchsorted(starts, row, side="right") - 1)
        r = row
        while r < end:
            u = units[ui]
            u_start = int(starts[ui])
            stop = min(end, u_start + u.rows)
            out.append(Segment(u.shard, u.row_group, r - u_start, stop - u_start, weight))
            r = stop
            ui += 1
        pos += run
    return out


class _ShardCache:
    """Open ParquetFiles per shard, shared by the reader threads of one pipeline.

    A ParquetFile is not safe for concurrent reads (pyarrow's read-range cache), so
    each shard has its own lock: reads of different shards still run in parallel.
    A store that stayed away past its budget (:mod:`xfer.retry`) fails every later
    read at once: tf.data's read-ahead would otherwise start epoch after epoch after
    the error, each waiting out the whole budget again before the run can stop.
    """

    def __init__(self, uris: list[str], column: str):
        self._uris = uris
        self._column = column
        self._files: dict[int, tuple[Any, threading.Lock]] = {}
        self._lock = threading.Lock()
        self._gone: StoreUnavailable | None = None

    def read(self, shard: int, row_group: int) -> Any:
        if self._gone is not None:
            raise StoreUnavailable(str(self._gone), self._gone.endpoint, self._gone.reason)
        try:
            return self._read(shard, row_group)
        except StoreUnavailable as exc:
            self._gone = exc
            raise

    def _read(self, shard: int, row_group: int) -> Any:
        with self._lock:
            entry = self._files.get(shard)
            if entry is None:
                entry = (storage.open_parquet(self._uris[shard]), threading.Lock())
                self._files[shard] = entry
        return _read_row_group(self._uris[shard], entry, row_group, self._column)


@ride_through("reading")
def _read_row_group(
    uri: str, entry: tuple[Any, threading.Lock], row_group: int, column: str
) -> Any:
    parquet_file, lock = entry
    with lock, s3.translate_errors(uri):
        return parquet_file.read_row_group(row_group, columns=["key", column, "label"])


def iter_rows(
    spec: ReaderSpec, segments: list[Segment], cache: _ShardCache
) -> Iterator[tuple[str, bytes, int, float]]:
    """Stream (key, encoded image, label, weight) for ``segments``, reading ahead."""
    if not segments:
        return
    keys = list(dict.fromkeys((s.shard, s.row_group) for s in segments))
    window = max(1, spec.parallel_reads)
    with ThreadPoolExecutor(max_workers=window, thread_name_prefix="xfer-read") as pool:
        futures: dict[tuple[int, int], Any] = {}
        next_key = 0

        def fill() -> None:
            nonlocal next_key
            while next_key < len(keys) and len(futures) < window:
                k = keys[next_key]
                futures[k] = pool.submit(cache.read, *k)
                next_key += 1

        fill()
        current: tuple[tuple[int, int], Any] | None = None
        for seg in segments:
            key = (seg.shard, seg.row_group)
            if current is None or current[0] != key:
                # A unit visited again (padding) is simply read again.
                table = futures.pop(key).result() if key in futures else cache.read(*key)
                current = (key, table)
                fill()
            table = current[1]
            part = table.slice(seg.start, seg.stop - seg.start)
            keys_ = part.column("key").to_pylist()
            images = part.column(spec.column).to_pylist()
            labels = part.column("label").to_pylist()
            for k, img, label in zip(keys_, images, labels, strict=True):
                yield k, img, int(label), seg.weight


CHUNK_ROWS = 64


def _columns(rows: list[tuple[str, bytes, int, float]], epoch: int, first: int) -> tuple[Any, ...]:
    """A chunk of rows as columns, with the epoch and each row's index in the epoch."""
    keys, images, labels, weights = zip(*rows, strict=True)
    index = np.arange(first, first + len(rows), dtype=np.int64)
    return (
        np.full(len(rows), epoch, np.int64),
        index,
        list(keys),
        list(images),
        list(labels),
        list(weights),
    )


def buffer_shuffle(rows: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A reproducible streaming shuffle with a buffer of ``size`` rows."""
    buf: list[Any] = []
    for row in rows:
        if len(buf) < size:
            buf.append(row)
            continue
        i = int(rng.integers(len(buf)))
        yield buf[i]
        buf[i] = row
    for i in rng.permutation(len(buf)):
        yield buf[i]


def make_dataset(spec: ReaderSpec, input_context: Any = None, epochs: int | None = None) -> Any:
    """This pipeline's dataset of (image, label, weight), batched per replica.

    Training datasets run ``epochs`` passes from ``spec.start_epoch`` (default: for
    ever; pass ``steps_per_epoch`` to ``fit``), reshuffled each epoch; evaluation
    datasets make one pass in manifest order. ``input_context`` comes from
    ``distribute_datasets_from_function``; without it the dataset is the only one.
    """
    import tensorflow as tf

    pipeline = input_context.input_pipeline_id if input_context else 0
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    replicas = input_context.num_replicas_in_sync if input_context else 1
    global_batch = spec.per_replica_batch * replicas
    steps = spec.steps_per_epoch(replicas)
    total_slots = steps * global_batch
    units = spec.units()
    cache = _ShardCache(spec.manifest.shard_uris(spec.split), spec.column)

    def epoch_chunks(epoch: Any) -> Iterator[tuple[Any, ...]]:
        order = epoch_order(units, spec.seed, int(epoch), shuffle=spec.training)
        segs = pipeline_segments(order, total_slots, pipeline, num_pipelines)
        rows = iter_rows(spec, segs, cache)
        if spec.training and spec.shuffle_buffer > 1:
            # Within the epoch only, so that each Keras epoch is one exact pass.
            rng = np.random.default_rng([spec.seed, int(epoch), pipeline, 0xB0F])
            rows = buffer_shuffle(rows, spec.shuffle_buffer, rng)
        # Rows cross into TensorFlow in chunks: one Python call per row would cap the
        # reader at about a thousand rows a second.
        chunk: list[tuple[str, bytes, int, float]] = []
        first = 0
        for row in rows:
            chunk.append(row)
            if len(chunk) == CHUNK_ROWS:
                yield _columns(chunk, int(epoch), first)
                first += len(chunk)
                chunk = []
        if chunk:
            yield _columns(chunk, int(epoch), first)

    signature = (
        tf.TensorSpec((None,), tf.int64),
        tf.TensorSpec((None,), tf.int64),
        tf.TensorSpec((None,), tf.string),
        tf.TensorSpec((None,), tf.string),
        tf.TensorSpec((None,), tf.int32),
        tf.TensorSpec((None,), tf.float32),
    )

    def epoch_dataset(epoch: Any) -> Any:
        ds = tf.data.Dataset.from_generator(epoch_chunks, output_signature=signature, args=(epoch,))
        # A few chunks of read-ahead, so that decoding never waits on the generator.
        return ds.prefetch(4).unbatch()

    if spec.training:
        first = spec.start_epoch
        epoch_ids = tf.data.Dataset.range(first, first + epochs if epochs else 2**62)
    else:
        epoch_ids = tf.data.Dataset.range(0, epochs or 1)
    ds = epoch_ids.flat_map(epoch_dataset)

    if spec.decode and spec.feature_dim:
        dim = spec.feature_dim

        def features(
            epoch: Any, index: Any, key: Any, encoded: Any, label: Any, weight: Any
        ) -> Any:
            vector = tf.cast(tf.io.decode_raw(encoded, tf.float16), tf.float32)
            vector = tf.ensure_shape(vector, [dim])
            return (key, vector, label, weight) if spec.with_keys else (vector, label, weight)

        ds = ds.map(features, num_parallel_calls=tf.data.AUTOTUNE)
    elif spec.decode:
        size = spec.image_size
        aug = spec.augment if spec.training else NO_AUGMENT
        seed = spec.seed

        def prepare(epoch: Any, index: Any, key: Any, encoded: Any, label: Any, weight: Any) -> Any:
            image = decode_and_resize(encoded, size)
            if aug.active:
                base = tf.cast(seed * 1_000_003 + pipeline, tf.int64) + epoch * 65_537
                image = augment(image, tf.stack([base, index]), aug)
            return (key, image, label, weight) if spec.with_keys else (image, label, weight)

        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(
            lambda e, i, key, enc, label, w: (
                (key, enc, label, w) if spec.with_keys else (enc, label, w)
            )
        )
    # Each pipeline holds exactly steps x (its replicas) x per-replica batch rows.
    ds = ds.batch(spec.per_replica_batch, drop_remainder=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = not spec.training
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
