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
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from xfer.config import XferConfig
from xfer.data.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    Manifest,
    ShardInfo,
    SplitInfo,
    load_manifest,
)
from xfer.errors import DataError, NotFoundError
from xfer.models.weights import WeightsSource
from xfer.store import storage

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
    except DataError as exc:  # missing, or damaged: both mean rebuild
        return f"no usable manifest ({str(exc).splitlines()[0][:120]})"
    # A StorageError (the store away, access denied) says nothing about the cache:
    # it propagates, so a cache other runs are training on is never deleted for it.
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


def row_groups(dataset: Manifest, shard: ShardInfo) -> list[int]:
    if shard.row_groups:
        return list(shard.row_groups)
    metadata = storage.open_parquet(storage.join(dataset.uri, shard.path)).metadata
    return [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]


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
            g for s in source.shards for g in row_groups(dataset, s)
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
