"""Building the feature cache: each rank runs its share of images through the base.

:mod:`xfer.features` decides whether a cache is needed and commits it; this module
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

from xfer import s3, storage
from xfer.config import XferConfig
from xfer.features import CachePlan, row_groups
from xfer.manifest import Manifest, ShardInfo
from xfer.provenance import file_sha256
from xfer.retry import ride_through


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


@ride_through("reading")
def _read_group(uri: str, g: int, files: dict[str, Any]) -> Any:
    with s3.translate_errors(uri):
        parquet_file = files.get(uri)
        if parquet_file is None:
            parquet_file = files[uri] = storage.open_parquet(uri)
        return parquet_file.read_row_group(g, columns=["key", "image", "label"])


def _encoded_rows(dataset: Manifest, pieces: list[_Piece], meta: dict[int, Any], reads: int) -> Any:
    """The pieces' encoded images, one row group at a time, read ``reads`` ahead.

    Each row group's keys and labels go to ``meta`` (by its position) for the writer.
    """
    from collections import deque

    groups = [(p, p.first + i) for p in pieces for i in range(len(p.groups))]
    files: dict[str, Any] = {}

    def read(item: tuple[_Piece, int]) -> Any:
        piece, g = item
        return _read_group(storage.join(dataset.uri, piece.path), g, files)

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

    One pipeline for the whole run: row groups are read ahead in a thread, decoded in
    parallel ``tf.data`` maps, and go through the base in large batches while the
    next ones decode; finished row groups are written as they complete. Each piece
    (consecutive row groups of one dataset shard) becomes one feature shard, and a
    small note of what was written goes under this run's build folder. Returns how
    many images went through the base here (the counter tests check).
    ``after_shard()`` is called after each feature shard is written.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tensorflow as tf

    from xfer.preprocess import decode_and_resize

    pieces = rank_pieces(dataset, list(plan.fields["splits"]), rank, world)
    size = cfg.data.image_size
    meta: dict[int, Any] = {}
    images = tf.data.Dataset.from_generator(
        lambda: _encoded_rows(dataset, pieces, meta, reads=2),
        output_signature=tf.TensorSpec((None,), tf.string),
    )
    images = (
        images.prefetch(2)
        .unbatch()
        .map(lambda b: decode_and_resize(b, size), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(encode_batch_size(cfg.train.batch_size))
        .prefetch(2)
    )
    forward = tf.function(
        lambda x: extractor(x, training=False),
        input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)],
    )
    # Reading and decoding start with the iterator, in tf.data's threads; the forward
    # pass is traced and its graph built (its first call, on one image of zeros)
    # meanwhile, not after the first batch has waited for them.
    batches = iter(images)
    forward(tf.zeros([1, size, size, 3]))
    schema = pa.schema([("key", pa.string()), ("features", pa.binary()), ("label", pa.int32())])
    written: dict[str, list[dict[str, Any]]] = {}
    total, dim = 0, 0
    ready = np.zeros((0, 0), np.float16)  # features computed, not yet written
    group = 0  # row groups written, over all pieces (the key into ``meta``)
    with tempfile.TemporaryDirectory(prefix="xfer-feat-") as tmp:
        for piece in pieces:
            path = os.path.join(tmp, f"{piece.split}-{piece.index}-{piece.first}.parquet")
            with pq.ParquetWriter(path, schema, compression="none") as writer:
                for rows in piece.groups:
                    while len(ready) < rows:
                        vectors = np.asarray(forward(next(batches))).astype(np.float16)
                        dim = vectors.shape[1]
                        ready = vectors if not len(ready) else np.concatenate([ready, vectors])
                    keys, labels = meta.pop(group)
                    out = pa.table(
                        {
                            "key": keys,
                            "features": pa.array([v.tobytes() for v in ready[:rows]], pa.binary()),
                            "label": labels,
                        },
                        schema=schema,
                    )
                    writer.write_table(out, row_group_size=rows)
                    ready, group, total = ready[rows:], group + 1, total + rows
            digest = file_sha256(path)
            stem = piece.path.rsplit(".", 1)[0]
            rel = f"{plan.build_path}/{stem}-rg{piece.first:05d}.parquet"
            info = ShardInfo(
                rel, sum(piece.groups), os.path.getsize(path), digest, list(piece.groups)
            )
            storage.upload_file(path, storage.join(plan.uri, rel))
            os.remove(path)
            entry = {
                "index": piece.index,
                "first_row_group": piece.first,
                **dataclasses.asdict(info),
            }
            written.setdefault(piece.split, []).append(entry)
            if after_shard is not None:
                after_shard()
    note = {"rank": rank, "images": total, "feature_dim": dim, "shards": written}
    storage.write_json(
        storage.join(plan.uri, plan.build_path, "_parts", f"rank-{rank:05d}.json"), note
    )
    return total
