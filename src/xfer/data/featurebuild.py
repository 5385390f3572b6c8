"""Building the feature cache: each rank runs its share of images through the base.

:mod:`xfer.data.features` decides whether a cache is needed and commits it; this module
computes the parts. Each rank takes a contiguous run of row groups, balanced by rows
across the splits (:func:`rank_pieces`), and runs one pipeline: row groups read ahead
in a thread, decoded in parallel ``tf.data`` maps, through the base in large batches
(:func:`encode_batch_size`), each row group written as soon as its features exist.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from xfer.config import XferConfig
from xfer.data.features import CachePlan, row_groups
from xfer.data.images import decode_and_resize
from xfer.data.manifest import Manifest, ShardInfo
from xfer.data.rowgroups import read_row_groups
from xfer.registry.provenance import file_sha256
from xfer.store import storage

COLUMNS = ["key", "image", "label"]


@dataclass(frozen=True)
class _Piece:
    """Consecutive row groups of one dataset shard: one feature shard of a build."""

    split: str
    index: int  # the dataset shard's index in its split
    path: str  # the dataset shard's path
    first: int  # first row group
    groups: tuple[int, ...]  # rows per row group


def rank_pieces(dataset: Manifest, splits: list[str], rank: int, world: int) -> list[_Piece]:
    """This rank's share of the row groups: a contiguous run, balanced by rows.

    Dividing whole shards would leave a rank idle whenever shards differ in size
    (a 1,600-row train shard against a 400-row val shard): row groups are the unit.
    """
    units = [
        (split, index, shard.path, g, rows)
        for split in splits
        for index, shard in enumerate(dataset.split(split).shards)
        for g, rows in enumerate(row_groups(dataset, shard))
    ]
    total = sum(u[4] for u in units)
    lo, hi = rank * total // world, (rank + 1) * total // world
    pieces: list[_Piece] = []
    position = 0
    for split, index, path, g, rows in units:
        mine = lo <= position < hi  # a unit belongs to the rank its first row falls to
        position += rows
        if not mine:
            continue
        last = pieces[-1] if pieces else None
        if last and (last.split, last.index) == (split, index):
            pieces[-1] = dataclasses.replace(last, groups=(*last.groups, rows))
        else:
            pieces.append(_Piece(split, index, path, g, (rows,)))
    return pieces


def encode_batch_size(configured: int) -> int:
    """Inference batches: larger than training ones (no gradients to hold)."""
    return max(configured, 128)


def _encoded_rows(dataset: Manifest, pieces: list[_Piece], meta: dict[int, Any], reads: int) -> Any:
    """The pieces' encoded images, one row group at a time, read ``reads`` ahead.

    Each row group's keys and labels go to ``meta`` (by its position) for the writer.
    """
    from collections import deque

    groups = [(p, p.first + i) for p in pieces for i in range(len(p.groups))]
    files: dict[str, Any] = {}

    def read(item: tuple[_Piece, int]) -> Any:
        piece, g = item
        return read_row_groups(storage.join(dataset.uri, piece.path), [g], COLUMNS, files)

    # One thread: a ParquetFile is not safe for concurrent reads, and consecutive row
    # groups mostly come from one shard. Decoding and the forward pass overlap it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="xfer-cache-read") as pool:
        ahead = deque(pool.submit(read, item) for item in groups[:reads])
        following = len(ahead)
        for position in range(len(groups)):
            table = ahead.popleft().result()
            if following < len(groups):
                ahead.append(pool.submit(read, groups[following]))
                following += 1
            meta[position] = (table.column("key"), table.column("label"))
            yield table.column("image").to_pylist()


class _Features:
    """The base's features of the pieces' rows, in order, a row group at a time.

    One pipeline for the whole run: row groups are read ahead in a thread
    (:func:`_encoded_rows`), decoded in parallel ``tf.data`` maps, and go through the
    base in large batches while the next ones decode.
    """

    def __init__(self, cfg: XferConfig, dataset: Manifest, pieces: list[_Piece], extractor: Any):
        import numpy as np
        import tensorflow as tf

        size = cfg.data.image_size
        self._meta: dict[int, Any] = {}  # row group position -> (keys, labels)
        images = tf.data.Dataset.from_generator(
            lambda: _encoded_rows(dataset, pieces, self._meta, reads=2),
            output_signature=tf.TensorSpec((None,), tf.string),
        )
        images = (
            images.prefetch(2)
            .unbatch()
            .map(lambda b: decode_and_resize(b, size), num_parallel_calls=tf.data.AUTOTUNE)
            .batch(encode_batch_size(cfg.train.batch_size))
            .prefetch(2)
        )
        self._forward = tf.function(
            lambda x: extractor(x, training=False),
            input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)],
        )
        # Reading and decoding start with the iterator, in tf.data's threads; the
        # forward pass is traced and its graph built (its first call, on one image of
        # zeros) meanwhile, not after the first batch has waited for them.
        self._batches = iter(images)
        self._forward(tf.zeros([1, size, size, 3]))
        self._ready = np.zeros((0, 0), np.float16)  # features computed, not yet taken
        self._group = 0  # row groups taken, over all pieces (the key into ``meta``)
        self.dim = 0

    def next_group(self, rows: int) -> tuple[Any, Any, Any]:
        """The next row group's keys, labels and float16 features [rows, dim]."""
        import numpy as np

        while len(self._ready) < rows:
            vectors = np.asarray(self._forward(next(self._batches))).astype(np.float16)
            self.dim = vectors.shape[1]
            ready = self._ready
            self._ready = vectors if not len(ready) else np.concatenate([ready, vectors])
        keys, labels = self._meta.pop(self._group)
        out, self._ready = self._ready[:rows], self._ready[rows:]
        self._group += 1
        return keys, labels, out


def _write_piece(piece: _Piece, features: _Features, plan: CachePlan, tmp: str) -> dict[str, Any]:
    """Write one piece's features as one feature shard; its entry in the rank's note."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("key", pa.string()), ("features", pa.binary()), ("label", pa.int32())])
    path = os.path.join(tmp, f"{piece.split}-{piece.index}-{piece.first}.parquet")
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for rows in piece.groups:
            keys, labels, vectors = features.next_group(rows)
            vectors = pa.array([v.tobytes() for v in vectors], pa.binary())
            out = pa.table({"key": keys, "features": vectors, "label": labels}, schema=schema)
            writer.write_table(out, row_group_size=rows)
    digest = file_sha256(path)
    stem = piece.path.rsplit(".", 1)[0]
    rel = f"{plan.build_path}/{stem}-rg{piece.first:05d}.parquet"
    info = ShardInfo(rel, sum(piece.groups), os.path.getsize(path), digest, list(piece.groups))
    storage.upload_file(path, storage.join(plan.uri, rel))
    os.remove(path)
    return {"index": piece.index, "first_row_group": piece.first, **dataclasses.asdict(info)}


def build_part(
    cfg: XferConfig,
    plan: CachePlan,
    dataset: Manifest,
    extractor: Any,
    rank: int,
    world: int,
    after_shard: Any = None,
) -> int:
    """Compute this rank's feature shards: a contiguous, row-balanced run of row groups.

    Row groups stream through the base (:class:`_Features`) and are written as they
    complete. Each piece (consecutive row groups of one dataset shard) becomes one
    feature shard (:func:`_write_piece`), and a small note of what was written goes
    under this run's build folder. Returns how many images went through the base
    here (the counter tests check). ``after_shard()`` is called after each feature
    shard is written.
    """
    pieces = rank_pieces(dataset, list(plan.fields["splits"]), rank, world)
    features = _Features(cfg, dataset, pieces, extractor)
    written: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="xfer-feat-") as tmp:
        for piece in pieces:
            written.setdefault(piece.split, []).append(_write_piece(piece, features, plan, tmp))
            if after_shard is not None:
                after_shard()
    total = sum(sum(p.groups) for p in pieces)
    note = {"rank": rank, "images": total, "feature_dim": features.dim, "shards": written}
    storage.write_json(
        storage.join(plan.uri, plan.build_path, "_parts", f"rank-{rank:05d}.json"), note
    )
    return total
