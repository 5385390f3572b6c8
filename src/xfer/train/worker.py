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
from xfer.manifest import load_manifest
from xfer.model import (
    build_model,
    compile_model,
    freeze_base,
    make_optimizer,
    unfreeze_top,
)
from xfer.preprocess import AugmentSettings
from xfer.reader import ReaderSpec, make_dataset
from xfer.score import MODEL_FILE, MODEL_INFO
from xfer.train.checkpoint import PHASES, TrainState, load_checkpoint, restore, save_checkpoint
from xfer.weights import fetch_weights

FAULT_MARKER = "_fault_injected"


class EpochEnd:
    """Keras callback: time epochs, checkpoint + report every epoch, TensorBoard, faults."""

    def __init__(
        self,
        ctx: Any,
        *,
        phase: str,
        state: TrainState,
        model: Any,
        optimizer: Any,
        rank: int,
        train_rows: int,
        cfg: XferConfig,
        run_uri: str,
        tb_dir: str | None,
    ):
        import tf_keras

        outer = self

        class _Callback(tf_keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                outer.begin(epoch)

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                outer.end(epoch, logs or {})

        self.callback = _Callback()
        self.ctx, self.phase, self.state, self.model, self.optimizer = (
            ctx,
            phase,
            state,
            model,
            optimizer,
        )
        self.rank, self.train_rows, self.cfg, self.run_uri, self.tb_dir = (
            rank,
            train_rows,
            cfg,
            run_uri,
            tb_dir,
        )
        self._t0 = 0.0
        self._writer: Any = None

    def write_tensorboard(self, row: dict[str, float]) -> None:
        """Per-epoch scalars for TensorBoard, uploaded as they come (live progress)."""
        import tensorflow as tf

        assert self.tb_dir is not None
        local = os.path.join(self.tb_dir, self.phase)
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(local)
        with self._writer.as_default():
            for key, value in row.items():
                if key != "epoch":
                    tf.summary.scalar(key, value, step=int(row["epoch"]))
        self._writer.flush()
        for name in os.listdir(local):
            storage.upload_file(
                os.path.join(local, name),
                storage.join(self.run_uri, "tensorboard", self.phase, name),
            )

    def begin(self, epoch: int) -> None:
        fault = self.cfg.fault
        if fault.rank == self.rank and fault.phase == self.phase and fault.epoch == epoch:
            marker = storage.join(self.run_uri, FAULT_MARKER)
            if not storage.exists(marker):
                storage.write_json(marker, {"rank": self.rank, "phase": self.phase, "epoch": epoch})
                print(
                    f"[xfer] fault injection: rank {self.rank} exits at {self.phase} epoch {epoch}",
                    flush=True,
                )
                os._exit(17)
        self._t0 = time.monotonic()

    def end(self, epoch: int, logs: dict[str, Any]) -> None:
        import ray.train

        seconds = time.monotonic() - self._t0
        row = {k: float(v) for k, v in logs.items()}
        row.update(
            epoch=epoch + 1, seconds=seconds, images_per_s=self.train_rows / max(seconds, 1e-9)
        )
        self.state.history[self.phase].append(row)
        self.state.phase, self.state.epoch = self.phase, epoch + 1
        directory = save_checkpoint(self.model, self.optimizer, self.state)
        if self.rank == 0 and self.tb_dir:
            self.write_tensorboard(row)
        checkpoint = ray.train.Checkpoint.from_directory(directory) if self.rank == 0 else None
        ray.train.report({"phase": self.phase, **row}, checkpoint=checkpoint)
        shutil.rmtree(directory, ignore_errors=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    for key, value in config.get("env", {}).items():
        os.environ[key] = value
    import ray.train
    import tensorflow as tf

    cfg = XferConfig.model_validate(config["cfg"])
    run_uri: str = config["run_uri"]
    policy = set_mixed_precision(cfg.train.mixed_precision, enable_memory_growth() > 0)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    replicas = strategy.num_replicas_in_sync
    verbose = cfg.train.verbose if rank == 0 else 0
    import tf_keras

    tf_keras.utils.set_random_seed(cfg.train.seed)

    manifest = load_manifest(cfg.dataset_uri())
    num_classes = manifest.num_classes
    weights = fetch_weights(cfg.model.weights)
    restored = load_checkpoint(ray.train.get_checkpoint())
    state = restored[0] if restored else TrainState()
    if restored:
        state.resumes.append({"phase": state.phase, "epoch": state.epoch, "at": time.time()})
        if rank == 0:
            print(
                f"[xfer] resuming from checkpoint: {state.phase} phase, {state.epoch} epoch(s) done",
                flush=True,
            )

    with strategy.scope():
        model, base = build_model(cfg.model, cfg.data.image_size, num_classes, weights.local_path)

    aug = cfg.data.augment
    train_spec = ReaderSpec(
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
    steps = train_spec.steps_per_epoch(replicas)
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    val = _eval_input(strategy, cfg, manifest, "val", replicas)
    tb_dir = tempfile.mkdtemp(prefix="xfer-tb-") if rank == 0 else None
    lr_scale = replicas if cfg.train.scale_lr else 1
    epoch_offset = 0  # data epochs count across phases: every epoch reshuffles
    restored_dir = restored[1] if restored else None
    for phase in PHASES:
        pcfg = cfg.train.head if phase == "head" else cfg.train.fine_tune
        if pcfg.epochs == 0:
            continue
        start = state.start_epoch(phase)
        if state.done(phase, pcfg.epochs):
            epoch_offset += pcfg.epochs
            continue
        with strategy.scope():
            if phase == "head":
                freeze_base(base)
            else:
                n = unfreeze_top(
                    base, cfg.train.fine_tune.unfreeze_from, cfg.train.fine_tune.unfreeze_top
                )
                if rank == 0:
                    print(
                        f"[xfer] fine-tuning: {n} layers of {cfg.model.base} unfrozen", flush=True
                    )
            optimizer = make_optimizer(pcfg.optimizer, pcfg.learning_rate * lr_scale)
            compile_model(model, optimizer, num_classes)
            if restored_dir:
                # Mid-phase: weights and this phase's optimizer state; else weights only.
                restore(
                    restored_dir, model, optimizer if start > 0 and state.phase == phase else None
                )
                restored_dir = None
        spec = _replace(train_spec, start_epoch=epoch_offset + start)
        dist = strategy.distribute_datasets_from_function(lambda ctx, s=spec: make_dataset(s, ctx))
        callback = EpochEnd(
            ctx,
            phase=phase,
            state=state,
            model=model,
            optimizer=optimizer,
            rank=rank,
            train_rows=train_spec.num_rows,
            cfg=cfg,
            run_uri=run_uri,
            tb_dir=tb_dir,
        )
        if rank == 0:
            print(
                f"[xfer] {phase} phase: epochs {start + 1}..{pcfg.epochs}, {steps} steps/epoch, "
                f"global batch {cfg.train.batch_size * replicas} on {world} worker(s)",
                flush=True,
            )
        model.fit(
            dist,
            epochs=pcfg.epochs,
            initial_epoch=start,
            steps_per_epoch=steps,
            validation_data=val[0] if val else None,
            validation_steps=val[1] if val else None,
            callbacks=[callback.callback],
            verbose=verbose,
        )
        epoch_offset += pcfg.epochs

    if restored_dir:  # every phase was already done: only the weights are needed
        with strategy.scope():
            restore(restored_dir, model, None)
    test_metrics: dict[str, float] = {}
    test = _eval_input(strategy, cfg, manifest, "test", replicas)
    if test:
        values = model.evaluate(test[0], steps=test[1], verbose=0, return_dict=True)
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
        },
        checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None,
    )
    shutil.rmtree(directory, ignore_errors=True)


def _replace(spec: ReaderSpec, **changes: Any) -> ReaderSpec:
    import dataclasses

    return dataclasses.replace(spec, **changes)


def _eval_input(
    strategy: Any, cfg: XferConfig, manifest: Any, split: str, replicas: int
) -> tuple[Any, int] | None:
    if split not in manifest.splits or manifest.splits[split].rows == 0:
        return None
    spec = ReaderSpec(
        manifest,
        split,
        cfg.data.image_size,
        cfg.train.batch_size,
        training=False,
        parallel_reads=cfg.data.parallel_reads,
    )
    dist = strategy.distribute_datasets_from_function(lambda ctx: make_dataset(spec, ctx))
    return dist, spec.steps_per_epoch(replicas)


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
