"""Streaming a reader's rows from storage: row groups read ahead, rows out in chunks.

:mod:`xfer.data.reader` plans which rows each pipeline reads (:class:`Segment`); this
module fetches them. Row groups come through pyarrow
(:func:`xfer.data.rowgroups.read_row_groups`), a few ahead in threads and on across
epochs; rows left out by ``data.exclude`` are dropped as each row group is read;
rows cross into TensorFlow in column chunks of :data:`CHUNK_ROWS`.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from xfer.data.exclude import SplitExclusion
from xfer.data.rowgroups import read_row_groups
from xfer.errors import StoreUnavailable


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of a unit, all with the same weight."""

    shard: int
    row_group: int
    start: int
    stop: int
    weight: float


class ShardCache:
    """Open ParquetFiles per shard and reader thread, for the reads of one pipeline.

    A ParquetFile is not safe for concurrent reads (pyarrow's read-range cache), so
    each reader thread opens its own: row groups of one shard are then fetched in
    parallel too (a split is often a single shard), not one GET after another.
    A store that stayed away past its budget (:mod:`xfer.store.retry`) fails every later
    read at once: tf.data's read-ahead would otherwise start epoch after epoch after
    the error, each waiting out the whole budget again before the run can stop.
    """

    def __init__(self, uris: list[str], column: str, exclude: SplitExclusion | None = None):
        self._uris = uris
        self.column = column
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
        files: dict[str, Any] = self._local.__dict__.setdefault("files", {})
        columns = ["key", self.column, "label"]
        table = read_row_groups(self._uris[shard], [row_group], columns, files)
        if self._exclude is None:
            return table
        import pyarrow.compute as pc

        # Segments index the rows that remain (Unit.rows counts them the same way).
        return table.filter(pc.invert(pc.is_in(table.column("key"), value_set=self._exclude)))


def _row_groups_ahead(
    segments: Iterator[tuple[int, Segment]], cache: ShardCache, window: int
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
    segments: Iterator[tuple[int, Segment]], cache: ShardCache, reads: int
) -> Iterator[tuple[int, str, bytes, int, float]]:
    """Stream (epoch, key, encoded image, label, weight) for ``(epoch, segment)`` pairs,
    ``reads`` row groups ahead. A unit visited again (padding) is simply read again.
    """
    for epoch, segs, table in _row_groups_ahead(segments, cache, max(1, reads)):
        for seg in segs:
            part = table.slice(seg.start, seg.stop - seg.start)
            keys_ = part.column("key").to_pylist()
            images = part.column(cache.column).to_pylist()
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


def epoch_chunks(rows: Iterator[tuple[str, bytes, int, float]], epoch: int) -> Iterator[Any]:
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
