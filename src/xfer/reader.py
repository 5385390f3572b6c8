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
metrics. Rows left out by ``data.exclude`` (:mod:`xfer.exclude`) are dropped from each
row group as it is read, and the plan counts only the rows that remain. Rows stream
from object storage through pyarrow, a few row groups ahead in threads; decode,
resize and augmentation run in parallel ``tf.data`` maps.
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from xfer import s3, storage
from xfer.errors import StoreUnavailable
from xfer.exclude import SplitExclusion
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
    exclude: SplitExclusion | None = None  # rows of this split left out (data.exclude)

    def units(self) -> list[Unit]:
        """Row groups in manifest order, with the rows that remain after exclusion."""
        out: list[Unit] = []
        lost = self.exclude.per_group if self.exclude else ()
        for si, shard in enumerate(self.manifest.split(self.split).shards):
            groups = shard.row_groups or [shard.rows]
            out.extend(Unit(si, gi, n) for gi, n in enumerate(groups))
        if lost:
            out = [Unit(u.shard, u.row_group, u.rows - k) for u, k in zip(out, lost, strict=True)]
        return [u for u in out if u.rows > 0]

    @property
    def num_rows(self) -> int:
        excluded = len(self.exclude.keys) if self.exclude else 0
        return self.manifest.split(self.split).rows - excluded

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
    """Open ParquetFiles per shard and reader thread, for the reads of one pipeline.

    A ParquetFile is not safe for concurrent reads (pyarrow's read-range cache), so
    each reader thread opens its own: row groups of one shard are then fetched in
    parallel too (a split is often a single shard), not one GET after another.
    A store that stayed away past its budget (:mod:`xfer.retry`) fails every later
    read at once: tf.data's read-ahead would otherwise start epoch after epoch after
    the error, each waiting out the whole budget again before the run can stop.
    """

    def __init__(self, uris: list[str], column: str, exclude: SplitExclusion | None = None):
        self._uris = uris
        self._column = column
        self._local = threading.local()
        self._gone: StoreUnavailable | None = None
        self._exclude = None
        if exclude is not None and exclude.keys:
            import pyarrow as pa

            self._exclude = pa.array(sorted(exclude.keys), pa.string())

    def read(self, shard: int, row_group: int) -> Any:
        if self._gone is not None:
            raise StoreUnavailable(str(self._gone), self._gone.endpoint, self._gone.reason)
        try:
            return self._read(shard, row_group)
        except StoreUnavailable as exc:
            self._gone = exc
            raise

    def _read(self, shard: int, row_group: int) -> Any:
        files: dict[int, Any] = self._local.__dict__.setdefault("files", {})
        table = _read_row_group(self._uris[shard], files, shard, row_group, self._column)
        if self._exclude is None:
            return table
        import pyarrow.compute as pc

        # Segments index the rows that remain (Unit.rows counts them the same way).
        return table.filter(pc.invert(pc.is_in(table.column("key"), value_set=self._exclude)))


@ride_through("reading")
def _read_row_group(
    uri: str, files: dict[int, Any], shard: int, row_group: int, column: str
) -> Any:
    with s3.translate_errors(uri):
        parquet_file = files.get(shard)
        if parquet_file is None:
            parquet_file = files[shard] = storage.open_parquet(uri)
        return parquet_file.read_row_group(row_group, columns=["key", column, "label"])


def _row_groups_ahead(
    segments: Iterator[tuple[int, Segment]], cache: _ShardCache, window: int
) -> Iterator[tuple[int, list[Segment], Any]]:
    """(epoch, consecutive segments of one row group, its table), ``window`` reads ahead.

    The read-ahead runs on across epochs: the next epoch's first row groups are
    already fetched when this one's last rows are decoded.
    """
    runs = itertools.groupby(segments, key=lambda es: (es[0], es[1].shard, es[1].row_group))
    with ThreadPoolExecutor(max_workers=window, thread_name_prefix="xfer-read") as pool:
        ahead: collections.deque[tuple[int, list[Segment], Any]] = collections.deque()
        for (epoch, shard, row_group), run in runs:
            ahead.append((epoch, [s for _, s in run], pool.submit(cache.read, shard, row_group)))
            if len(ahead) > window:
                epoch_, segs, future = ahead.popleft()
                yield epoch_, segs, future.result()
        while ahead:
            epoch_, segs, future = ahead.popleft()
            yield epoch_, segs, future.result()


def iter_rows(
    spec: ReaderSpec, segments: Iterator[tuple[int, Segment]], cache: _ShardCache
) -> Iterator[tuple[int, str, bytes, int, float]]:
    """Stream (epoch, key, encoded image, label, weight) for ``(epoch, segment)`` pairs.

    A unit visited again (padding) is simply read again.
    """
    for epoch, segs, table in _row_groups_ahead(segments, cache, max(1, spec.parallel_reads)):
        for seg in segs:
            part = table.slice(seg.start, seg.stop - seg.start)
            keys_ = part.column("key").to_pylist()
            images = part.column(spec.column).to_pylist()
            labels = part.column("label").to_pylist()
            for k, img, label in zip(keys_, images, labels, strict=True):
                yield epoch, k, img, int(label), seg.weight


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


def _epoch_chunks(rows: Iterator[tuple[str, bytes, int, float]], epoch: int) -> Iterator[Any]:
    """One epoch's rows as column chunks of ``CHUNK_ROWS``, indexed within the epoch."""
    chunk: list[tuple[str, bytes, int, float]] = []
    first = 0
    for row in rows:
        chunk.append(row)
        if len(chunk) == CHUNK_ROWS:
            yield _columns(chunk, epoch, first)
            first += len(chunk)
            chunk = []
    if chunk:
        yield _columns(chunk, epoch, first)


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
    cache = _ShardCache(spec.manifest.shard_uris(spec.split), spec.column, spec.exclude)

    if spec.training:
        first_epoch, last_epoch = spec.start_epoch, spec.start_epoch + epochs if epochs else None
    else:
        first_epoch, last_epoch = 0, epochs or 1

    def segments() -> Iterator[tuple[int, Segment]]:
        if not spec.num_rows:
            return
        for epoch in (
            itertools.count(first_epoch) if last_epoch is None else range(first_epoch, last_epoch)
        ):
            order = epoch_order(units, spec.seed, epoch, shuffle=spec.training)
            for seg in pipeline_segments(order, total_slots, pipeline, num_pipelines):
                yield epoch, seg

    def chunks() -> Iterator[tuple[Any, ...]]:
        # One generator for every epoch, so that reading ahead runs on across them.
        rows = iter_rows(spec, segments(), cache)
        for epoch, epoch_rows in itertools.groupby(rows, key=lambda row: row[0]):
            stream: Iterator[Any] = (row[1:] for row in epoch_rows)
            if spec.training and spec.shuffle_buffer > 1:
                # Within the epoch only, so that each Keras epoch is one exact pass.
                rng = np.random.default_rng([spec.seed, epoch, pipeline, 0xB0F])
                stream = buffer_shuffle(stream, spec.shuffle_buffer, rng)
            # Rows cross into TensorFlow in chunks: one Python call per row would cap
            # the reader at about a thousand rows a second.
            yield from _epoch_chunks(stream, epoch)

    signature = (
        tf.TensorSpec((None,), tf.int64),
        tf.TensorSpec((None,), tf.int64),
        tf.TensorSpec((None,), tf.string),
        tf.TensorSpec((None,), tf.string),
        tf.TensorSpec((None,), tf.int32),
        tf.TensorSpec((None,), tf.float32),
    )
    ds = tf.data.Dataset.from_generator(chunks, output_signature=signature)
    # A few chunks of read-ahead, so that decoding never waits on the generator.
    ds = ds.prefetch(4).unbatch()

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
            if spec.training:
                image = decode_and_resize(encoded, size)
            else:
                # A padding row (weight 0) changes nothing and, in inference mode,
                # touches no statistics: it is not decoded.
                image = tf.cond(
                    weight > 0,
                    lambda: decode_and_resize(encoded, size),
                    lambda: tf.zeros([size, size, 3], tf.float32),
                )
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
