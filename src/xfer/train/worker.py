"""`train_loop_per_worker(config)`: what each Ray Train worker runs.

The strategy comes first (docs/design.md, decision 2); model building and compiling (and
recompiling for fine-tuning) happen inside ``strategy.scope()``. Input comes from
:mod:`xfer.data.reader` through ``distribute_datasets_from_function`` with steps computed
from the manifest, so every worker runs the same steps over its own disjoint data.

After every epoch every rank writes a checkpoint and reports; rank 0 attaches its
checkpoint. On a restart (a worker died, or a run is resumed by id) the loop picks
up where the checkpoint says:

- in the middle of a phase: that phase's weights *and* optimizer (learning rate,
  step count, moments), exactly as they were;
- at a phase boundary: the weights only; the new phase starts with its own, new
  optimizer at its configured learning rate;
- with every phase done (a failure during test evaluation, model save or the final
  report): the weights and the last phase's optimizer, then evaluation onwards.

Rank 0 keeps the run's journal (:mod:`xfer.train.journal`): where each attempt
started and which stage it is in, so that every failure ends up in the metrics.
Each worker rides out a store outage of ``storage.outage_seconds`` (:mod:`xfer.store.retry`),
as the driver does: the budget comes with the config, not from the environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import xfer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from xfer.config import XferConfig
from xfer.data.features import CachePlan
from xfer.data.images import preparation_record
from xfer.data.preprocess import AugmentSettings
from xfer.data.reader import ReaderSpec, make_dataset
from xfer.devices import enable_memory_growth, set_mixed_precision
from xfer.models.model import (
    compile_model,
    freeze_base,
    head_only_model,
    make_optimizer,
    phase_learning_rate,
    unfreeze_top,
    uses_ema,
)
from xfer.registry.layout import save_model
from xfer.store.retry import budget
from xfer.train.cachestage import ensure_cache, feature_specs
from xfer.train.callbacks import EpochEnd
from xfer.train.checkpoint import (
    PHASES,
    optimizer_state,
    restore,
    save_checkpoint,
)
from xfer.train.rank import Worker, start


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One rank's whole run, phase by phase; each stage is named in the journal."""
    for key, value in config.get("env", {}).items():
        os.environ[key] = value
    cfg = XferConfig.model_validate(config["cfg"])
    with budget(cfg.storage.outage_seconds):  # this worker rides out the store's outages
        _run(cfg, config)


def _run(cfg: XferConfig, config: dict[str, Any]) -> None:
    policy = set_mixed_precision(cfg.train.mixed_precision, enable_memory_growth() > 0)
    w = start(cfg, config)
    cache_stats = _train(w, config)
    optimizer = _restore_finished(w)
    w.stage("test_evaluation")
    test_metrics = _evaluate(w)
    w.stage("model_save")
    _save_model(w)
    w.stage("final_report")
    _final_report(
        w,
        optimizer,
        {
            "test": test_metrics,
            "steps_per_epoch": _steps(cfg, _eval_spec(w, "train"), w.replicas),
            "mixed_precision": policy,
            "weights": w.weights.lineage(),
            "feature_cache": cache_stats,
        },
    )


def _train(w: Worker, config: dict[str, Any]) -> dict[str, Any]:
    """The phases not yet done: the head (on cached features if planned), then
    fine-tuning. Returns the feature cache's figures (empty without one)."""
    cache = CachePlan.from_dict(config["feature_cache"]) if config.get("feature_cache") else None
    cache_stats: dict[str, Any] = {}
    tb_dir = tempfile.mkdtemp(prefix="xfer-tb-") if w.rank == 0 else None
    for phase in PHASES:
        if w.epochs[phase] == 0 or w.state.done(phase, w.epochs[phase]):
            continue
        if phase == "head" and cache is not None:
            cache_stats = ensure_cache(w, cache)
        _run_phase(w, phase, cache if phase == "head" else None, tb_dir)
    return cache_stats


def _final_report(w: Worker, optimizer: Any, figures: dict[str, Any]) -> None:
    """The last report, with a checkpoint: Ray Train returns the metrics of the latest
    checkpoint, and a resumed run that finds every phase done starts from it."""
    import ray.train

    directory = save_checkpoint(w.model, optimizer, w.state)
    ray.train.report(
        {
            "final": 1,
            "state": json.loads(w.state.to_json()),
            "workers": w.world,
            "replicas": w.replicas,
            **figures,
        },
        checkpoint=ray.train.Checkpoint.from_directory(directory) if w.rank == 0 else None,
    )
    shutil.rmtree(directory, ignore_errors=True)


def _compile_phase(
    w: Worker, phase: str, feature_dim: int | None, steps_per_epoch: int
) -> tuple[Any, Any, int]:
    """Trainable flags, a new optimizer at the phase's learning rate, compile.

    Returns ``(fit_model, optimizer, unfrozen)``: the model that ``fit`` trains (the
    head alone on cached features, sharing the full model's variables), its optimizer,
    and how many layers of the base train (0 in the head phase).
    """
    cfg = w.cfg
    pcfg = cfg.train.phase(phase)
    unfrozen = 0
    if phase == "head":
        freeze_base(w.base)
    else:
        ft = cfg.train.fine_tune
        unfrozen = unfreeze_top(w.base, ft.unfreeze_from, ft.unfreeze_top)
    lr_scale = w.replicas if cfg.train.scale_lr else 1
    lr = phase_learning_rate(
        pcfg.learning_rate * lr_scale,
        pcfg.schedule,
        pcfg.epochs,
        pcfg.warmup_epochs,
        steps_per_epoch,
    )
    smoothing, jit = cfg.train.label_smoothing, cfg.train.jit_compile
    classes = w.manifest.num_classes
    compile_model(w.model, make_optimizer(pcfg.optimizer, lr, pcfg.ema), classes, smoothing, jit)
    fit_model = w.model
    if feature_dim:
        fit_model = head_only_model(w.model, cfg.model, feature_dim)
        compile_model(fit_model, w.model.optimizer, classes, smoothing, jit)
    return fit_model, fit_model.optimizer, unfrozen


def _restore(w: Worker, optimizer: Any, with_optimizer: bool) -> None:
    """Load the pending checkpoint (once), and note the optimizer the attempt goes on with."""
    directory = w.checkpoint.take()
    if directory:
        restore(directory, w.model, optimizer if with_optimizer else None)
        shutil.rmtree(directory, ignore_errors=True)
        if w.journal is not None:
            w.journal.note(optimizer=optimizer_state(optimizer))
    elif w.journal is not None and w.journal.record.get("optimizer") is None:
        w.journal.note(optimizer=optimizer_state(optimizer))


def _steps(cfg: XferConfig, spec: ReaderSpec | None, replicas: int) -> int:
    steps = spec.steps_per_epoch(replicas) if spec is not None else 0
    return min(steps, cfg.train.max_steps_per_epoch or steps)


def _run_phase(w: Worker, phase: str, cache: CachePlan | None, tb_dir: str | None) -> None:
    """Train one phase from where the state says."""
    cfg = w.cfg
    pcfg = cfg.train.phase(phase)
    start = w.state.start_epoch(phase)
    spec, val_spec = _phase_specs(w, cache)
    with w.strategy.scope():
        fit_model, optimizer, unfrozen = _compile_phase(
            w, phase, spec.feature_dim, _steps(cfg, spec, w.replicas)
        )
        # Mid-phase: this phase's optimizer state too; at a boundary, weights only.
        _restore(w, optimizer, with_optimizer=start > 0 and w.state.phase == phase)
    # Data epochs count across phases, so that every epoch reshuffles differently.
    position = w.position(phase, 0)
    spec = dataclasses.replace(spec, start_epoch=position + start)
    steps = _steps(cfg, spec, w.replicas)
    callback = EpochEnd(
        w,
        phase=phase,
        optimizer=optimizer,
        train_rows=spec.num_rows,
        tb_dir=tb_dir,
        position=position,
    )
    source = "cached features" if spec.feature_dim else "images"
    layers = f" ({unfrozen} layers of {cfg.model.base} unfrozen)" if phase != "head" else ""
    w.say(
        f"{phase} phase on {source}{layers}: epochs {start + 1}..{pcfg.epochs}, "
        f"{steps} steps/epoch, global batch {cfg.train.batch_size * w.replicas} on "
        f"{w.world} worker(s)"
    )
    fit_model.fit(
        _distributed(w, spec),
        epochs=pcfg.epochs,
        initial_epoch=start,
        steps_per_epoch=steps,
        validation_data=_distributed(w, val_spec) if val_spec else None,
        validation_steps=val_spec.steps_per_epoch(w.replicas) if val_spec else None,
        callbacks=[callback.callback],
        verbose=cfg.train.verbose if w.rank == 0 else 0,
    )


def _phase_specs(w: Worker, cache: CachePlan | None) -> tuple[ReaderSpec, ReaderSpec | None]:
    """The phase's training and validation input: images (augmented, shuffled), or
    the feature cache when the head phase trains on it."""
    cfg = w.cfg
    aug = cfg.data.augment
    spec = ReaderSpec(
        w.manifest,
        "train",
        cfg.data.image_size,
        cfg.train.batch_size,
        training=True,
        augment=AugmentSettings(aug.flip, aug.rotation, aug.zoom),
        seed=cfg.train.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        parallel_reads=cfg.data.parallel_reads,
        exclude=w.excluded("train"),
    )
    if cache is not None:
        return feature_specs(cfg, cache, spec, w.excluded("val"))
    return spec, _eval_spec(w, "val")


def _distributed(w: Worker, spec: ReaderSpec) -> Any:
    """``spec``'s dataset, each worker reading its own part (``make_dataset``)."""
    return w.strategy.distribute_datasets_from_function(lambda c: make_dataset(spec, c))


def _restore_finished(w: Worker) -> Any:
    """The model compiled for evaluation; on a resume with every phase done, the
    checkpoint's weights and the last phase's optimizer. Returns that optimizer."""
    if w.model.optimizer is not None and not w.checkpoint.pending:
        return w.model.optimizer
    last = "fine_tune" if w.epochs["fine_tune"] else "head"
    train_steps = _steps(w.cfg, _eval_spec(w, "train"), w.replicas)
    with w.strategy.scope():
        _, optimizer, _ = _compile_phase(w, last, None, train_steps)
        _restore(w, optimizer, with_optimizer=w.state.phase == last)
        if w.state.phase == last and uses_ema(optimizer):
            # The last epoch's checkpoint holds the trained weights, not yet their
            # average (fit swaps it in at its end); the final report's holds the
            # average already, which this leaves as it is.
            optimizer.finalize_variable_values(w.model.trainable_variables)
    return optimizer


def _evaluate(w: Worker) -> dict[str, float]:
    test_spec = _eval_spec(w, "test")
    if test_spec is None:
        return {}
    values = w.model.evaluate(
        _distributed(w, test_spec),
        steps=test_spec.steps_per_epoch(w.replicas),
        verbose=0,
        return_dict=True,
    )
    return {k: float(v) for k, v in values.items()}


def _eval_spec(w: Worker, split: str) -> ReaderSpec | None:
    """A split in manifest order, its data.exclude rows left out; None if it has no rows."""
    if split not in w.manifest.splits:
        return None
    spec = ReaderSpec(
        w.manifest,
        split,
        w.cfg.data.image_size,
        w.cfg.train.batch_size,
        parallel_reads=w.cfg.data.parallel_reads,
        exclude=w.excluded(split),
    )
    return spec if spec.num_rows > 0 else None


def _save_model(w: Worker) -> None:
    """Every rank saves (collectives); rank 0 commits its copy to ``<run>/model/``."""
    cfg, manifest = w.cfg, w.manifest
    info = None
    if w.rank == 0:
        info = {
            "format": "tf_keras",
            "classes": manifest.classes,
            "image_size": cfg.data.image_size,
            "input": "RGB pixels, float 0..255, resized (squashed) to image_size square",
            "output": "sigmoid P(class 1)" if manifest.num_classes == 2 else "softmax over classes",
            "base": cfg.model.base,
            "weights": w.weights.lineage(),
            "dataset_checksum": manifest.checksum,
            # How its images were prepared: scoring applies the same steps to raw images.
            "preparation": preparation_record(
                manifest.settings.get("max_side"), manifest.settings.get("jpeg_quality", 90)
            ),
        }
    save_model(w.model, info, w.run_uri)
