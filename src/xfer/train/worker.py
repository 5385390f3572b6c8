"""`train_loop_per_worker(config)`: what each Ray Train worker runs.

The strategy comes first (DESIGN.md, decision 2); model building and compiling (and
recompiling for fine-tuning) happen inside ``strategy.scope()``. Input comes from
:mod:`xfer.reader` through ``distribute_datasets_from_function`` with steps computed
from the manifest, so every worker runs the same steps over its own disjoint data.

After every epoch every rank writes a checkpoint and reports; rank 0 attaches its
checkpoint. On a restart (a worker died, or a run is resumed by id) the loop picks
up at the recorded phase and epoch, with the optimizer state of that phase.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Any

import xfer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from xfer import storage
from xfer.config import XferConfig
from xfer.devices import enable_memory_growth, set_mixed_precision
from xfer.features import CachePlan, build_part, commit_cache
from xfer.manifest import load_manifest
from xfer.model import (
    build_model,
    compile_model,
    feature_extractor,
    freeze_base,
    head_only_model,
    make_optimizer,
    unfreeze_top,
)
from xfer.preprocess import AugmentSettings
from xfer.reader import NO_AUGMENT, ReaderSpec, make_dataset
from xfer.score import MODEL_FILE, MODEL_INFO
from xfer.train.callbacks import EpochEnd
from xfer.train.checkpoint import PHASES, TrainState, load_checkpoint, restore, save_checkpoint
from xfer.weights import fetch_weights


def train_loop_per_worker(config: dict[str, Any]) -> None:
    for key, value in config.get("env", {}).items():
        os.environ[key] = value
    import ray.train
    import tensorflow as tf
    import tf_keras

    cfg = XferConfig.model_validate(config["cfg"])
    run_uri: str = config["run_uri"]
    policy = set_mixed_precision(cfg.train.mixed_precision, enable_memory_growth() > 0)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    replicas = strategy.num_replicas_in_sync
    tf_keras.utils.set_random_seed(cfg.train.seed)

    manifest = load_manifest(cfg.dataset_uri())
    num_classes = manifest.num_classes
    weights = fetch_weights(cfg.model.weights)
    cache = CachePlan.from_dict(config["feature_cache"]) if config.get("feature_cache") else None
    restored = load_checkpoint(ray.train.get_checkpoint())
    state = restored[0] if restored else TrainState()
    if restored:
        state.resumes.append({"phase": state.phase, "epoch": state.epoch, "at": time.time()})
        _say(rank, f"resuming from checkpoint: {state.phase} phase, {state.epoch} epoch(s) done")
    with strategy.scope():
        model, base = build_model(cfg.model, cfg.data.image_size, num_classes, weights.local_path)

    aug = cfg.data.augment
    image_spec = ReaderSpec(
        manifest,
        "train",
        cfg.data.image_size,
        cfg.train.batch_size,
        training=True,
        augment=AugmentSettings(aug.flip, aug.rotation, aug.zoom),
        seed=cfg.train.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        parallel_reads=cfg.data.parallel_reads,
    )
    tb_dir = tempfile.mkdtemp(prefix="xfer-tb-") if rank == 0 else None
    lr_scale = replicas if cfg.train.scale_lr else 1
    cache_stats: dict[str, Any] = {}
    epoch_offset = 0  # data epochs count across phases: every epoch reshuffles
    restored_dir = restored[1] if restored else None
    steps = image_spec.steps_per_epoch(replicas)
    for phase in PHASES:
        pcfg = cfg.train.head if phase == "head" else cfg.train.fine_tune
        start = state.start_epoch(phase)
        if pcfg.epochs == 0 or state.done(phase, pcfg.epochs):
            epoch_offset += pcfg.epochs
            continue
        spec, val_spec = image_spec, _eval_spec(cfg, manifest, "val")
        if phase == "head" and cache is not None:
            cache_stats = _ensure_cache(cfg, cache, manifest, weights, strategy, rank, world)
            spec, val_spec = _feature_specs(cfg, cache, spec)
        with strategy.scope():
            if phase == "head":
                freeze_base(base)
            else:
                n = unfreeze_top(
                    base, cfg.train.fine_tune.unfreeze_from, cfg.train.fine_tune.unfreeze_top
                )
                _say(rank, f"fine-tuning: {n} layers of {cfg.model.base} unfrozen")
            optimizer = make_optimizer(pcfg.optimizer, pcfg.learning_rate * lr_scale)
            compile_model(model, optimizer, num_classes)
            fit_model = model
            if spec.feature_dim:  # the head alone, on cached features; same variables
                fit_model = head_only_model(model, cfg.model, spec.feature_dim)
                compile_model(fit_model, optimizer, num_classes)
            if restored_dir:
                # Mid-phase: weights and this phase's optimizer state; else weights only.
                restore(
                    restored_dir, model, optimizer if start > 0 and state.phase == phase else None
                )
                restored_dir = None
        spec = dataclasses.replace(spec, start_epoch=epoch_offset + start)
        steps = spec.steps_per_epoch(replicas)
        if cfg.train.max_steps_per_epoch:
            steps = min(steps, cfg.train.max_steps_per_epoch)
        dist = strategy.distribute_datasets_from_function(lambda c, s=spec: make_dataset(s, c))
        val = None
        if val_spec is not None:
            val_dist = strategy.distribute_datasets_from_function(
                lambda c, s=val_spec: make_dataset(s, c)
            )
            val = (val_dist, val_spec.steps_per_epoch(replicas))
        callback = EpochEnd(
            ctx,
            phase=phase,
            state=state,
            model=model,
            optimizer=optimizer,
            rank=rank,
            train_rows=spec.num_rows,
            cfg=cfg,
            run_uri=run_uri,
            tb_dir=tb_dir,
        )
        source = "cached features" if spec.feature_dim else "images"
        _say(
            rank,
            f"{phase} phase on {source}: epochs {start + 1}..{pcfg.epochs}, {steps} steps/epoch, "
            f"global batch {cfg.train.batch_size * replicas} on {world} worker(s)",
        )
        fit_model.fit(
            dist,
            epochs=pcfg.epochs,
            initial_epoch=start,
            steps_per_epoch=steps,
            validation_data=val[0] if val else None,
            validation_steps=val[1] if val else None,
            callbacks=[callback.callback],
            verbose=cfg.train.verbose if rank == 0 else 0,
        )
        epoch_offset += pcfg.epochs

    if restored_dir:  # every phase was already done: only the weights are needed
        with strategy.scope():
            restore(restored_dir, model, None)
    test_metrics: dict[str, float] = {}
    test_spec = _eval_spec(cfg, manifest, "test")
    if test_spec is not None:
        test = strategy.distribute_datasets_from_function(lambda c: make_dataset(test_spec, c))
        values = model.evaluate(
            test, steps=test_spec.steps_per_epoch(replicas), verbose=0, return_dict=True
        )
        test_metrics = {k: float(v) for k, v in values.items()}
    _save_model(model, rank, run_uri, cfg, manifest, weights)
    # The final report carries a checkpoint too: Ray Train returns the metrics of the
    # latest checkpoint, and a resumed run that finds every phase done starts here.
    directory = save_checkpoint(model, model.optimizer, state)
    ray.train.report(
        {
            "final": 1,
            "state": json.loads(state.to_json()),
            "test": test_metrics,
            "workers": world,
            "replicas": replicas,
            "steps_per_epoch": steps,
            "mixed_precision": policy,
            "weights": weights.lineage(),
            "feature_cache": cache_stats,
        },
        checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None,
    )
    shutil.rmtree(directory, ignore_errors=True)


def _say(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[xfer] {message}", flush=True)


def barrier(strategy: Any) -> None:
    """Wait for every worker: an all-reduce of a constant."""
    import tensorflow as tf

    value = strategy.run(lambda: tf.constant(1.0))
    strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)


def _ensure_cache(
    cfg: XferConfig,
    cache: CachePlan,
    manifest: Any,
    weights: Any,
    strategy: Any,
    rank: int,
    world: int,
) -> dict[str, Any]:
    """Build the feature cache if the driver found none; returns what was done."""
    stats: dict[str, Any] = {
        "key": cache.key,
        "uri": cache.uri,
        "hit": not cache.build,
        "reason": cache.reason,
    }
    if not cache.build:
        _say(rank, f"feature cache hit: {cache.uri}")
        stats["images_encoded"] = 0
        return stats
    _say(rank, f"building the feature cache ({cache.reason}): {cache.uri}")
    started = time.monotonic()
    # A separate copy of the frozen base, outside the strategy: each worker encodes
    # its own shards with no collectives (the base's weights are the same file).
    extractor_model, _ = build_model(
        cfg.model, cfg.data.image_size, manifest.num_classes, weights.local_path
    )
    extractor = feature_extractor(extractor_model, cfg.model)
    mine = build_part(cfg, cache, manifest, extractor, rank, world)
    barrier(strategy)
    total = commit_cache(cache, manifest, world) if rank == 0 else mine
    barrier(strategy)
    stats.update(images_encoded=total, seconds=time.monotonic() - started)
    _say(rank, f"feature cache built: {total} images through the base in {stats['seconds']:.1f}s")
    return stats


def _feature_specs(
    cfg: XferConfig, cache: CachePlan, image_spec: ReaderSpec
) -> tuple[ReaderSpec, ReaderSpec | None]:
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
        )
    return train, val


def _eval_spec(cfg: XferConfig, manifest: Any, split: str) -> ReaderSpec | None:
    if split not in manifest.splits or manifest.splits[split].rows == 0:
        return None
    return ReaderSpec(
        manifest,
        split,
        cfg.data.image_size,
        cfg.train.batch_size,
        parallel_reads=cfg.data.parallel_reads,
    )


def _save_model(
    model: Any, rank: int, run_uri: str, cfg: XferConfig, manifest: Any, weights: Any
) -> None:
    """Every rank saves (collectives); rank 0 commits its copy to ``<run>/model/``."""
    directory = tempfile.mkdtemp(prefix="xfer-model-")
    model.save(os.path.join(directory, MODEL_FILE))
    if rank == 0:
        info = {
            "format": "tf_keras",
            "file": MODEL_FILE,
            "classes": manifest.classes,
            "image_size": cfg.data.image_size,
            "input": "RGB pixels, float 0..255, resized (squashed) to image_size square",
            "output": "sigmoid P(class 1)" if manifest.num_classes == 2 else "softmax over classes",
            "base": cfg.model.base,
            "weights": weights.lineage(),
            "dataset_checksum": manifest.checksum,
        }
        with open(os.path.join(directory, MODEL_INFO), "w") as f:
            json.dump(info, f, indent=2)
        final = storage.join(run_uri, "model")
        staging = storage.staging_prefix(final)
        storage.upload_dir(directory, staging)
        storage.commit_prefix(staging, final)
    shutil.rmtree(directory, ignore_errors=True)
