"""The feature cache: the frozen base's output, computed once, reused by head phases.

While the base is frozen, every head epoch would decode every image and run the
same base over it again. With ``model.head.features: cached`` the workers compute
the pooled base features once per image, store them as float16 Parquet shards in
``<root>/features/<key>/``, and the head phase trains on those.

The key covers everything that determines a feature: the dataset (manifest
checksum), the base (and alpha), the weights (file checksum, or the Keras ImageNet
release, or the seed of a random init), the image size, the pooling and the
preprocessing. Change any of them and the key changes. A cache is used only if its
manifest exists, matches the key, and every shard has the size and sha256 it lists;
a damaged one is un-committed and rebuilt, never silently used.

    <root>/features/<key>/manifest.json                      the commit, written last
    <root>/features/<key>/builds/<run_id>/<split>/part-*.parquet

Each run builds into its own ``builds/<run_id>/`` and commits by writing the
manifest, which names the shards of that build: two runs with the same key (a
learning-rate sweep) never write, delete or read each other's unfinished files,
and a reader takes only a committed manifest. The features come from the very base
the run trains (whatever its weights), not from a second copy.

The layout mirrors the dataset's row groups: the feature shards of a split, in
order, hold the dataset's row groups in the same order and sizes (a dataset shard may
be split between ranks into several feature shards), so the training reader's
equal-steps plan applies unchanged (column ``features``: raw float16 bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from xfer import s3, storage
from xfer.config import XferConfig
from xfer.errors import NotFoundError
from xfer.manifest import MANIFEST, SCHEMA_VERSION, Manifest, ShardInfo, SplitInfo, load_manifest
from xfer.provenance import file_sha256
from xfer.weights import WeightsSource

FORMAT = 1
SPLITS = ("train", "val")  # the head phase trains on train and validates on val
PREPROCESSING = "decode_image+bilinear-squash+model-input-scaling"


@dataclass(frozen=True)
class CachePlan:
    uri: str
    key: str
    fields: dict[str, Any]
    build: bool  # False: a valid cache exists
    reason: str  # why it is (re)built, or "hit"
    build_id: str = ""  # this run's build directory, under builds/

    @property
    def build_path(self) -> str:
        """The build's folder, relative to the cache (as the manifest names shards)."""
        return f"builds/{self.build_id}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CachePlan:
        return cls(**d)


def weights_fingerprint(cfg: XferConfig, source: WeightsSource) -> str:
    if source.sha256:
        return f"sha256:{source.sha256}"
    if cfg.model.weights == "imagenet":
        import importlib.metadata as md

        return f"keras-imagenet:tf-keras-{md.version('tf-keras')}"
    return f"random-init:seed={cfg.train.seed}"


def cache_fields(cfg: XferConfig, manifest: Manifest, source: WeightsSource) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "dataset_checksum": manifest.checksum,
        "base": cfg.model.base,
        "alpha": cfg.model.alpha if cfg.model.base == "mobilenet_v2" else None,
        "weights": weights_fingerprint(cfg, source),
        "image_size": cfg.data.image_size,
        "pooling": cfg.model.head.pooling,
        "preprocessing": PREPROCESSING,
        "splits": [s for s in SPLITS if s in manifest.splits and manifest.splits[s].rows],
    }


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def _sha256(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def check_cache(uri: str, fields: dict[str, Any], dataset: Manifest) -> str | None:
    """None if the cache at ``uri`` is complete and intact; otherwise why not."""
    try:
        features = load_manifest(uri)
    except Exception as exc:  # missing, or unreadable: both mean rebuild
        return f"no usable manifest ({str(exc).splitlines()[0][:120]})"
    if features.settings.get("key_fields") != fields:
        return "its manifest was made for a different key"
    for split in fields["splits"]:
        if split not in features.splits or features.splits[split].rows != dataset.split(split).rows:
            return f"split {split!r} is missing or has the wrong row count"
    shards = [
        (sh, storage.join(uri, sh.path))
        for s in fields["splits"]
        for sh in features.splits[s].shards
    ]
    try:
        sizes = {f.uri: f.size for f in storage.list_files(uri)}
    except NotFoundError:
        return "its shards are missing"
    for shard, shard_uri in shards:
        if sizes.get(shard_uri) != shard.bytes:
            return f"shard {shard.path} is missing or has the wrong size"
    with ThreadPoolExecutor(max_workers=8) as pool:
        digests = list(pool.map(lambda item: _sha256(item[1]), shards))
    for (shard, _), digest in zip(shards, digests, strict=True):
        if digest != shard.sha256:
            return f"shard {shard.path} fails its checksum"
    return None


def plan_cache(
    cfg: XferConfig, manifest: Manifest, source: WeightsSource, build_id: str = "unnamed"
) -> CachePlan:
    """On the driver: the key, and whether a valid cache exists.

    A damaged committed cache is un-committed (its manifest, then its build's files);
    builds that other runs may still be writing are never touched.
    """
    fields = cache_fields(cfg, manifest, source)
    key = cache_key(fields)
    uri = f"{cfg.storage.root}/features/{key}"
    problem = check_cache(uri, fields, manifest)
    if problem is None:
        return CachePlan(uri, key, fields, build=False, reason="hit", build_id=build_id)
    manifest_uri = storage.join(uri, MANIFEST)
    if storage.exists(manifest_uri):
        damaged = _committed_build(manifest_uri)
        storage.delete(manifest_uri)
        if damaged:
            storage.delete_prefix(storage.join(uri, damaged))
    elif problem.startswith("no usable manifest"):
        problem = "no cache yet"
    return CachePlan(uri, key, fields, build=True, reason=problem, build_id=build_id)


def _committed_build(manifest_uri: str) -> str | None:
    """``builds/<id>`` of the build a manifest commits, if it names one."""
    try:
        build = storage.read_json(manifest_uri).get("settings", {}).get("build")
    except Exception:  # unreadable: nothing to point at
        return None
    return f"builds/{build}" if isinstance(build, str) and re.fullmatch(r"[\w.-]+", build) else None


def committed_by(plan: CachePlan) -> bool:
    """Has this run's build already been committed (by an earlier attempt of the run)?"""
    try:
        return load_manifest(plan.uri).settings.get("build") == plan.build_id
    except Exception:
        return False


# ---------------------------------------------------------------- building


@dataclass(frozen=True)
class _Piece:
    """Consecutive row groups of one dataset shard: one feature shard of a build."""

    split: str
    index: int  # the dataset shard's index in its split
    path: str  # the dataset shard's path
    first: int  # first row group
    groups: tuple[int, ...]  # rows per row group


def _row_groups(dataset: Manifest, shard: ShardInfo) -> list[int]:
    if shard.row_groups:
        return list(shard.row_groups)
    metadata = storage.open_parquet(storage.join(dataset.uri, shard.path)).metadata
    return [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]


def rank_pieces(dataset: Manifest, splits: list[str], rank: int, world: int) -> list[_Piece]:
    """This rank's share of the row groups: a contiguous run, balanced by rows.

    Dividing whole shards would leave a rank idle whenever shards differ in size
    (a 1,600-row train shard against a 400-row val shard): row groups are the unit.
    """
    units = [
        (split, index, shard.path, g, rows)
        for split in splits
        for index, shard in enumerate(dataset.split(split).shards)
        for g, rows in enumerate(_row_groups(dataset, shard))
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
        uri = storage.join(dataset.uri, piece.path)
        with s3.translate_errors(uri):
            parquet_file = files.get(uri)
            if parquet_file is None:
                parquet_file = files[uri] = storage.open_parquet(uri)
            return parquet_file.read_row_group(g, columns=["key", "image", "label"])

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
    schema = pa.schema([("key", pa.string()), ("features", pa.binary()), ("label", pa.int32())])
    written: dict[str, list[dict[str, Any]]] = {}
    total, dim = 0, 0
    batches = iter(images)
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


def commit_cache(plan: CachePlan, dataset: Manifest, world: int) -> int:
    """Rank 0, after every rank has written: the manifest, last. Returns images encoded."""
    notes = [
        storage.read_json(storage.join(plan.uri, plan.build_path, "_parts", f"rank-{r:05d}.json"))
        for r in range(world)
    ]
    dims = {n["feature_dim"] for n in notes if n["feature_dim"]}
    if len(dims) != 1:
        raise RuntimeError(f"feature cache {plan.uri}: ranks disagree on the feature size ({dims})")
    splits: dict[str, SplitInfo] = {}
    for split in plan.fields["splits"]:
        entries = sorted(
            (e for n in notes for e in n["shards"].get(split, [])),
            key=lambda e: (e["index"], e.get("first_row_group", 0)),
        )
        shards = [
            ShardInfo(e["path"], e["rows"], e["bytes"], e["sha256"], e["row_groups"])
            for e in entries
        ]
        source = dataset.split(split)
        # The reader's plan depends only on the sequence of row groups: it must match.
        if [g for s in shards for g in s.row_groups] != [
            g for s in source.shards for g in _row_groups(dataset, s)
        ]:
            raise RuntimeError(
                f"feature cache {plan.uri}: split {split} does not mirror the dataset's row groups"
            )
        splits[split] = SplitInfo(rows=source.rows, shards=shards, class_counts=source.class_counts)
    features = Manifest(
        name=f"features-{plan.key}",
        classes=dataset.classes,
        splits=splits,
        source={"dataset": dataset.uri, "dataset_checksum": dataset.checksum},
        settings={
            "key": plan.key,
            "key_fields": plan.fields,
            "build": plan.build_id,
            "feature_dim": dims.pop(),
            "dtype": "float16",
        },
        rejected={},
        schema_version=SCHEMA_VERSION,
    )
    storage.write_bytes(storage.join(plan.uri, MANIFEST), features.to_json(), "application/json")
    return sum(n["images"] for n in notes)
