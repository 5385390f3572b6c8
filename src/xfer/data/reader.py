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
metrics. Rows left out by ``data.exclude`` (:mod:`xfer.data.exclude`) are dropped from each
row group as it is read, and the plan counts only the rows that remain. Rows stream
from object storage through pyarrow, a few row groups ahead in threads; decode,
resize and augmentation run in parallel ``tf.data`` maps.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from xfer.data.exclude import SplitExclusion
from xfer.data.images import decode_and_resize
from xfer.data.manifest import Manifest
from xfer.data.preprocess import AugmentSettings, augment
from xfer.data.readrows import Segment, ShardCache, buffer_shuffle, epoch_chunks, iter_rows

NO_AUGMENT = AugmentSettings(flip=False, rotation=0.0, zoom=0.0)


@dataclass(frozen=True)
class Unit:
    """One row group of one shard: the smallest piece the reader fetches."""

    shard: int
    row_group: int
    rows: int


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


@dataclass(frozen=True)
class _Pipeline:
    """Where one input pipeline stands: its index, how many there are, its slots."""

    index: int
    count: int
    replicas: int
    total_slots: int

    @staticmethod
    def of(spec: ReaderSpec, input_context: Any) -> _Pipeline:
        index = input_context.input_pipeline_id if input_context else 0
        count = input_context.num_input_pipelines if input_context else 1
        replicas = input_context.num_replicas_in_sync if input_context else 1
        slots = spec.steps_per_epoch(replicas) * spec.per_replica_batch * replicas
        return _Pipeline(index, count, replicas, slots)


def _epochs(spec: ReaderSpec, epochs: int | None) -> Iterator[int]:
    """Training: ``epochs`` from ``spec.start_epoch`` (none: for ever); evaluation:
    ``epochs`` passes (none: one)."""
    if spec.training:
        first = spec.start_epoch
        return iter(range(first, first + epochs)) if epochs else itertools.count(first)
    return iter(range(epochs or 1))


def _segments(spec: ReaderSpec, pipe: _Pipeline, epochs: int | None) -> Iterator[Any]:
    """(epoch, segment) for every epoch this pipeline reads, in order."""
    if not spec.num_rows:
        return
    units = spec.units()
    for epoch in _epochs(spec, epochs):
        order = epoch_order(units, spec.seed, epoch, shuffle=spec.training)
        for seg in pipeline_segments(order, pipe.total_slots, pipe.index, pipe.count):
            yield epoch, seg


def _chunks(
    spec: ReaderSpec, pipe: _Pipeline, epochs: int | None, cache: ShardCache
) -> Iterator[tuple[Any, ...]]:
    """Rows as column chunks, shuffled within each training epoch.

    One generator for every epoch, so that reading ahead runs on across them.
    """
    rows = iter_rows(_segments(spec, pipe, epochs), cache, spec.parallel_reads)
    for epoch, epoch_rows in itertools.groupby(rows, key=lambda row: row[0]):
        stream: Iterator[Any] = (row[1:] for row in epoch_rows)
        if spec.training and spec.shuffle_buffer > 1:
            # Within the epoch only, so that each Keras epoch is one exact pass.
            rng = np.random.default_rng([spec.seed, epoch, pipe.index, 0xB0F])
            stream = buffer_shuffle(stream, spec.shuffle_buffer, rng)
        # Rows cross into TensorFlow in chunks: one Python call per row would cap
        # the reader at about a thousand rows a second.
        yield from epoch_chunks(stream, epoch)


def _rows_dataset(spec: ReaderSpec, pipe: _Pipeline, epochs: int | None) -> Any:
    """(epoch, index, key, encoded, label, weight) per row, read ahead."""
    import tensorflow as tf

    cache = ShardCache(spec.manifest.shard_uris(spec.split), spec.column, spec.exclude)

    signature = (
        tf.TensorSpec((None,), tf.int64),
        tf.TensorSpec((None,), tf.int64),
        tf.TensorSpec((None,), tf.string),
        tf.TensorSpec((None,), tf.string),
        tf.TensorSpec((None,), tf.int32),
        tf.TensorSpec((None,), tf.float32),
    )
    ds = tf.data.Dataset.from_generator(
        lambda: _chunks(spec, pipe, epochs, cache), output_signature=signature
    )
    # A few chunks of read-ahead, so that decoding never waits on the generator.
    return ds.prefetch(4).unbatch()


# How a row's value becomes the model's input: one of these, chosen once per dataset
# (:func:`_values`). Each maps the rows (epoch, index, key, value, label, weight) to
# (value, label, weight), with the key in front when ``spec.with_keys``.


def _encoded_values(ds: Any, spec: ReaderSpec, pipe: _Pipeline) -> Any:
    """The encoded bytes as they are (``decode=False``), in order."""

    def keep(epoch: Any, index: Any, key: Any, encoded: Any, label: Any, weight: Any) -> Any:
        return (key, encoded, label, weight) if spec.with_keys else (encoded, label, weight)

    return ds.map(keep)


def _feature_values(ds: Any, spec: ReaderSpec, pipe: _Pipeline) -> Any:
    """Cached base features: raw float16 vectors of ``spec.feature_dim``."""
    import tensorflow as tf

    dim = spec.feature_dim

    def features(epoch: Any, index: Any, key: Any, encoded: Any, label: Any, weight: Any) -> Any:
        vector = tf.cast(tf.io.decode_raw(encoded, tf.float16), tf.float32)
        vector = tf.ensure_shape(vector, [dim])
        return (key, vector, label, weight) if spec.with_keys else (vector, label, weight)

    return ds.map(features, num_parallel_calls=tf.data.AUTOTUNE)


def _image_values(ds: Any, spec: ReaderSpec, pipe: _Pipeline) -> Any:
    """Images decoded and resized (:func:`xfer.data.images.decode_and_resize`), augmented
    when training, from a stateless seed of (seed, pipeline, epoch, row index)."""
    import tensorflow as tf

    size, seed = spec.image_size, spec.seed
    aug = spec.augment if spec.training else NO_AUGMENT

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
            base = tf.cast(seed * 1_000_003 + pipe.index, tf.int64) + epoch * 65_537
            image = augment(image, tf.stack([base, index]), aug)
        return (key, image, label, weight) if spec.with_keys else (image, label, weight)

    return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)


def _values(spec: ReaderSpec) -> Any:
    """Which of the three the spec asks for."""
    if not spec.decode:
        return _encoded_values
    return _feature_values if spec.feature_dim else _image_values


def make_dataset(spec: ReaderSpec, input_context: Any = None, epochs: int | None = None) -> Any:
    """This pipeline's dataset of (image, label, weight), batched per replica.

    Training datasets run ``epochs`` passes from ``spec.start_epoch`` (default: for
    ever; pass ``steps_per_epoch`` to ``fit``), reshuffled each epoch; evaluation
    datasets make one pass in manifest order. ``input_context`` comes from
    ``distribute_datasets_from_function``; without it the dataset is the only one.
    """
    import tensorflow as tf

    pipe = _Pipeline.of(spec, input_context)
    ds = _values(spec)(_rows_dataset(spec, pipe, epochs), spec, pipe)
    # Each pipeline holds exactly steps x (its replicas) x per-replica batch rows.
    ds = ds.batch(spec.per_replica_batch, drop_remainder=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = not spec.training
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
