"""One rank's view of a training run: who it is, its data, and where it resumes from.

:func:`start` runs first in every attempt of every worker. The strategy comes before
anything else touches TensorFlow's devices (docs/design.md, decision 2); then the
rank checks that it runs the driver's code, loads the manifest, the weights and the
latest checkpoint, and (rank 0) opens the attempt in the run's journal.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from xfer.config import XferConfig
from xfer.devices import communication_options, enable_memory_growth
from xfer.exclude import Exclusion, SplitExclusion
from xfer.manifest import Manifest, load_manifest
from xfer.provenance import check_same_code, describe
from xfer.train.checkpoint import PHASES, TrainState, load_checkpoint
from xfer.train.faults import maybe_fail
from xfer.train.journal import Journal, record_code
from xfer.weights import WeightsSource, fetch_weights


@dataclass
class Worker:
    """One rank's view of the run, shared by the stages below."""

    cfg: XferConfig
    run_uri: str
    strategy: Any
    ctx: Any
    rank: int
    world: int
    manifest: Manifest
    weights: WeightsSource
    state: TrainState
    restored_dir: str | None  # a checkpoint not yet loaded into the model
    journal: Journal | None  # rank 0 only
    model: Any = None
    base: Any = None
    unfrozen: int = 0  # layers of the base that train in the fine-tuning phase
    exclusion: Exclusion | None = None  # data.exclude, resolved by the driver

    def excluded(self, split: str) -> SplitExclusion | None:
        return self.exclusion.of(split) if self.exclusion is not None else None

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    @property
    def epochs(self) -> dict[str, int]:
        return {"head": self.cfg.train.head.epochs, "fine_tune": self.cfg.train.fine_tune.epochs}

    def position(self, phase: str, epoch: int) -> int:
        """Epochs finished across phases when ``epoch`` epochs of ``phase`` are done."""
        return sum(self.epochs[p] for p in PHASES[: PHASES.index(phase)]) + epoch

    def stage(self, name: str) -> None:
        if self.journal is not None:
            self.journal.stage(name, position=self.state.position(self.epochs))
        maybe_fail(self.cfg.fault, self.run_uri, self.rank, name)

    def say(self, message: str) -> None:
        """Rank 0's console line (with ``train.verbose: 0``, the log file's only)."""
        if self.rank == 0:
            tag = "[xfer]" if self.cfg.train.verbose > 0 else "[xfer-detail]"
            print(f"{tag} {message}", flush=True)


def start(cfg: XferConfig, config: dict[str, Any]) -> Worker:
    """The strategy first, then the data, weights, checkpoint and journal of this attempt."""
    import ray
    import ray.train
    import tensorflow as tf

    # Memory growth before anything initialises the GPUs; the strategy does.
    gpus = enable_memory_growth()
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=communication_options(gpus)
    )
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    node = ray.get_runtime_context().get_node_id()[:12]
    where = f"rank {rank} on node {node} ({socket.gethostname()}, pid {os.getpid()})"
    identity = check_same_code(config.get("code"), where)
    # Rank 0's line on the console; every rank's in the log file and the run's lineage.
    shown = rank == 0 and cfg.train.verbose > 0
    print(f"[xfer{'' if shown else '-detail'}] {where}: {describe(identity)}", flush=True)
    run_uri: str = config["run_uri"]
    record_code(run_uri, rank, {**identity, "node": node, "host": socket.gethostname()})
    restored = load_checkpoint(ray.train.get_checkpoint())
    state = restored[0] if restored else TrainState()
    journal = Journal(run_uri, config.get("driver", "")) if rank == 0 else None
    w = Worker(
        cfg=cfg,
        run_uri=run_uri,
        strategy=strategy,
        ctx=ctx,
        rank=rank,
        world=ctx.get_world_size(),
        manifest=load_manifest(cfg.dataset_uri()),
        weights=fetch_weights(cfg.model.weights, config.get("weights_sha256")),
        state=state,
        restored_dir=restored[1] if restored else None,
        journal=journal,
        exclusion=Exclusion.from_dict(config["exclude"]) if config.get("exclude") else None,
    )
    if journal is not None:
        resumed = {"phase": state.phase, "epoch": state.epoch} if restored else None
        attempt = journal.begin(resumed, position=state.position(w.epochs))
        if attempt > 1:
            where = f"{state.phase} phase, {state.epoch} epoch(s) done" if restored else "the start"
            w.say(f"attempt {attempt} of this run: resuming from {where}")
    return w
