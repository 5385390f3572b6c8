"""Checkpoint I/O: phase + epoch + history, model weights and optimizer state.

    state_dir = save_checkpoint(model, optimizer, state)      # every rank, own temp dir
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(state_dir) if rank == 0 else None)

    state, path = load_checkpoint(ray.train.get_checkpoint())  # on (re)start
    restore(path, model, optimizer)                             # inside strategy.scope()

Every rank writes (DESIGN.md, decision 2): under MultiWorkerMirroredStrategy reading
some variables (BatchNorm statistics) is a collective, so a rank that skipped the
write would leave the others waiting. Only rank 0's directory is attached to the
report and persisted by Ray Train in the run's storage.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

PHASES = ("head", "fine_tune")
STATE_FILE = "xfer_state.json"
TF_PREFIX = "ckpt"


@dataclass
class TrainState:
    """Where a run is: ``epoch`` epochs of ``phase`` are done."""

    phase: str = "head"
    epoch: int = 0
    history: dict[str, list[dict[str, float]]] = field(
        default_factory=lambda: {p: [] for p in PHASES}
    )
    resumes: list[dict[str, Any]] = field(default_factory=list)

    def done(self, phase: str, epochs: int) -> bool:
        """Has ``phase`` (of ``epochs`` epochs) been completed?"""
        here, there = PHASES.index(self.phase), PHASES.index(phase)
        return here > there or (here == there and self.epoch >= epochs)

    def start_epoch(self, phase: str) -> int:
        return self.epoch if self.phase == phase else 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        d = json.loads(text)
        return cls(
            phase=d["phase"],
            epoch=int(d["epoch"]),
            history=d["history"],
            resumes=d.get("resumes", []),
        )


def save_checkpoint(model: Any, optimizer: Any, state: TrainState) -> str:
    """Write weights, optimizer state and ``state`` to a fresh local directory."""
    import tensorflow as tf

    directory = tempfile.mkdtemp(prefix="xfer-ckpt-")
    tf.train.Checkpoint(model=model, optimizer=optimizer).write(os.path.join(directory, TF_PREFIX))
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        f.write(state.to_json())
    return directory


def load_checkpoint(checkpoint: Any) -> tuple[TrainState, str] | None:
    """``ray.train.Checkpoint`` -> (state, local directory), or None if there is none."""
    if checkpoint is None:
        return None
    directory = tempfile.mkdtemp(prefix="xfer-restore-")
    checkpoint.to_directory(directory)
    with open(os.path.join(directory, STATE_FILE)) as f:
        state = TrainState.from_json(f.read())
    return state, directory


def restore(directory: str, model: Any, optimizer: Any | None) -> None:
    """Load weights (and optimizer state, when given) saved by :func:`save_checkpoint`."""
    import tensorflow as tf

    if optimizer is not None:
        optimizer.build(model.trainable_variables)  # slots must exist to be restored
        tf.train.Checkpoint(model=model, optimizer=optimizer).read(
            os.path.join(directory, TF_PREFIX)
        ).expect_partial()
    else:
        tf.train.Checkpoint(model=model).read(os.path.join(directory, TF_PREFIX)).expect_partial()
