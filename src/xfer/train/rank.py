"""One rank's view of a training run: who it is, its data, its model, where it resumes from.

:func:`start` runs first in every attempt of every worker and builds the
:class:`Worker`, every field set. The strategy comes before anything else touches
TensorFlow's devices (docs/design.md, decision 2); then the rank checks that it runs
the driver's code, loads the manifest, the weights and the latest checkpoint, (rank 0)
opens the attempt in the run's journal, and builds the model in the strategy's scope.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from xfer import console
from xfer.config import XferConfig
from xfer.data.exclude import Exclusion, SplitExclusion
from xfer.data.manifest import Manifest, load_manifest
from xfer.devices import communication_options, enable_memory_growth
from xfer.models.model import build_model
from xfer.models.weights import WeightsSource, fetch_weights
from xfer.registry.provenance import check_same_code, describe
from xfer.train.checkpoint import PHASES, TrainState, load_checkpoint
from xfer.train.faults import maybe_fail
from xfer.train.journal import Journal, record_code


@dataclass
class PendingCheckpoint:
    """The checkpoint this attempt resumes from, until it is loaded into the model:
    it is loaded once, by the first phase (or evaluation) that compiles the model."""

    directory: str | None

    @property
    def pending(self) -> bool:
        return self.directory is not None

    def take(self) -> str | None:
        """The checkpoint's directory the first time; None after."""
        directory, self.directory = self.directory, None
        return directory


@dataclass(frozen=True)
class Worker:
    """One rank's view of the run, shared by the stages of :mod:`xfer.train.worker`."""

    cfg: XferConfig
    run_uri: str
    strategy: Any
    rank: int
    world: int
    manifest: Manifest
    weights: WeightsSource
    state: TrainState  # where the run is; the epoch callback moves it on
    checkpoint: PendingCheckpoint
    journal: Journal | None  # rank 0 only
    model: Any
    base: Any
    exclusion: Exclusion | None  # data.exclude, resolved by the driver

    def excluded(self, split: str) -> SplitExclusion | None:
        return self.exclusion.of(split) if self.exclusion is not None else None

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    @property
    def epochs(self) -> dict[str, int]:
        return phase_epochs(self.cfg)

    def position(self, phase: str, epoch: int) -> int:
        """Epochs finished across phases when ``epoch`` epochs of ``phase`` are done."""
        return sum(self.epochs[p] for p in PHASES[: PHASES.index(phase)]) + epoch

    def stage(self, name: str) -> None:
        if self.journal is not None:
            self.journal.stage(name, position=self.state.position(self.epochs))
        maybe_fail(self.cfg.fault, self.run_uri, self.rank, name)

    def say(self, message: str) -> None:
        """Rank 0's console line (with ``train.verbose: 0``, the log file's only)."""
        say(self.cfg, self.rank, message)


def phase_epochs(cfg: XferConfig) -> dict[str, int]:
    return {p: cfg.train.phase(p).epochs for p in PHASES}


def say(cfg: XferConfig, rank: int, message: str) -> None:
    if rank == 0:
        tag = console.tag(shown=cfg.train.verbose > 0)
        print(f"{tag} {message}", flush=True)


def start(cfg: XferConfig, config: dict[str, Any]) -> Worker:
    """The strategy first, then the code check, data, weights, checkpoint, journal, model."""
    import ray.train
    import tensorflow as tf

    # Memory growth before anything initialises the GPUs; the strategy does.
    gpus = enable_memory_growth()
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=communication_options(gpus)
    )
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    run_uri: str = config["run_uri"]
    _check_code(cfg, config, run_uri, rank)
    restored = load_checkpoint(ray.train.get_checkpoint())
    state = restored[0] if restored else TrainState()
    journal = Journal(run_uri, config.get("driver", "")) if rank == 0 else None
    manifest = load_manifest(cfg.dataset_uri())
    weights = fetch_weights(cfg.model.weights, config.get("weights_sha256"))
    if journal is not None:
        _begin_attempt(cfg, journal, state, resumed=restored is not None)
    model, base = _build(cfg, strategy, manifest, weights)
    return Worker(
        cfg=cfg,
        run_uri=run_uri,
        strategy=strategy,
        rank=rank,
        world=ctx.get_world_size(),
        manifest=manifest,
        weights=weights,
        state=state,
        checkpoint=PendingCheckpoint(restored[1] if restored else None),
        journal=journal,
        model=model,
        base=base,
        exclusion=Exclusion.from_dict(config["exclude"]) if config.get("exclude") else None,
    )


def _check_code(cfg: XferConfig, config: dict[str, Any], run_uri: str, rank: int) -> None:
    """This rank runs the driver's code (or fails, naming the difference); its identity
    goes to the console (rank 0), the log file and the run's lineage."""
    import ray

    node = ray.get_runtime_context().get_node_id()[:12]
    where = f"rank {rank} on node {node} ({socket.gethostname()}, pid {os.getpid()})"
    identity = check_same_code(config.get("code"), where)
    shown = rank == 0 and cfg.train.verbose > 0
    print(f"[xfer{'' if shown else '-detail'}] {where}: {describe(identity)}", flush=True)
    record_code(run_uri, rank, {**identity, "node": node, "host": socket.gethostname()})


def _begin_attempt(cfg: XferConfig, journal: Journal, state: TrainState, resumed: bool) -> None:
    """Rank 0 opens this attempt in the journal, saying where a later attempt resumes."""
    at = {"phase": state.phase, "epoch": state.epoch} if resumed else None
    attempt = journal.begin(at, position=state.position(phase_epochs(cfg)))
    if attempt > 1:
        where = f"{state.phase} phase, {state.epoch} epoch(s) done" if resumed else "the start"
        say(cfg, 0, f"attempt {attempt} of this run: resuming from {where}")


def _build(
    cfg: XferConfig, strategy: Any, manifest: Manifest, weights: WeightsSource
) -> tuple[Any, Any]:
    """The model and its base, in the strategy's scope, from the same seed on every rank."""
    import tf_keras

    tf_keras.utils.set_random_seed(cfg.train.seed)
    with strategy.scope():
        return build_model(cfg.model, cfg.data.image_size, manifest.num_classes, weights.local_path)
