"""The head phase on cached features, on the workers: build the cache, then read it.

    stats = ensure_cache(worker, plan)            # builds it when the driver found none
    spec, val_spec = feature_specs(cfg, plan, image_spec)

See :mod:`xfer.data.features` for the cache itself (key, layout, commit).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from xfer.config import XferConfig
from xfer.data.exclude import SplitExclusion
from xfer.data.featurebuild import build_part
from xfer.data.features import CachePlan, commit_cache, committed_by
from xfer.data.manifest import load_manifest
from xfer.data.reader import NO_AUGMENT, ReaderSpec
from xfer.models.model import build_model, feature_extractor, untrained_base
from xfer.train.faults import maybe_fail

if TYPE_CHECKING:
    from xfer.train.rank import Worker


def barrier(strategy: Any) -> None:
    """Wait for every worker: an all-reduce of a constant."""
    import tensorflow as tf

    value = strategy.run(lambda: tf.constant(1.0))
    strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)


def ensure_cache(w: Worker, cache: CachePlan) -> dict[str, Any]:
    """Build the feature cache if the driver found none; returns what was done."""
    stats: dict[str, Any] = {
        "key": cache.key,
        "uri": cache.uri,
        "hit": not cache.build,
        "reason": cache.reason,
    }
    if not cache.build or committed_by(cache):  # a hit, or built by an earlier attempt
        w.say(f"feature cache hit: {cache.uri}")
        stats["images_encoded"] = 0
        return stats
    w.stage("feature_cache")
    w.say(f"building the feature cache ({cache.reason}): {cache.uri}/{cache.build_path}")
    started = time.monotonic()
    # The very weights this run trains (whatever their source), copied into a plain
    # model outside the strategy: each worker then encodes its own shards with no
    # collectives (reading a mirrored BatchNorm statistic is one, so the distributed
    # model itself cannot be called a different number of times on each rank).
    cfg = w.cfg
    plain_base = untrained_base(cfg.model, cfg.data.image_size)
    plain, _ = build_model(cfg.model, cfg.data.image_size, w.manifest.num_classes, base=plain_base)
    plain.set_weights(w.model.get_weights())  # the same on every rank: one collective each
    extractor = feature_extractor(plain, cfg.model)
    fault = w.cfg.fault

    def after_shard() -> None:
        maybe_fail(fault, w.run_uri, w.rank, "feature_cache")

    mine = build_part(w.cfg, cache, w.manifest, extractor, w.rank, w.world, after_shard)
    barrier(w.strategy)
    total = commit_cache(cache, w.manifest, w.world) if w.rank == 0 else mine
    barrier(w.strategy)
    stats.update(images_encoded=total, seconds=time.monotonic() - started)
    w.say(f"feature cache built: {total} images through the base in {stats['seconds']:.1f}s")
    return stats


def feature_specs(
    cfg: XferConfig,
    cache: CachePlan,
    image_spec: ReaderSpec,
    val_exclude: SplitExclusion | None = None,
) -> tuple[ReaderSpec, ReaderSpec | None]:
    """The head phase's specs on the cache. The cache holds every row of the dataset
    (it is shared by runs with other exclusions); the rows a run leaves out are
    dropped as they are read, by the same counts, since its row groups mirror the
    dataset's (``image_spec.exclude`` carries over to the train spec)."""
    features = load_manifest(cache.uri)
    dim = int(features.settings["feature_dim"])
    train = dataclasses.replace(
        image_spec, manifest=features, column="features", feature_dim=dim, augment=NO_AUGMENT
    )
    val = None
    if "val" in features.splits and features.splits["val"].rows:
        val = ReaderSpec(
            features,
            "val",
            cfg.data.image_size,
            cfg.train.batch_size,
            column="features",
            feature_dim=dim,
            parallel_reads=cfg.data.parallel_reads,
            exclude=val_exclude,
        )
    return train, val if val is not None and val.num_rows else None
