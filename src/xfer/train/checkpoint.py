"""Checkpoint I/O: phase + epoch + history, model weights and optimizer state.

    state_dir = save_checkpoint(model, optimizer, state)      # every rank, own temp dir
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(state_dir) if rank == 0 else None)

    state, path = load_checkpoint(ray.train.get_checkpoint())  # on (re)start
    restore(path, model, optimizer)     # inside strategy.scope(): weights + that optimizer
    restore(path, model, None)          # weights only: a new phase keeps its own optimizer

Every rank writes (docs/design.md, decision 2): under MultiWorkerMirroredStrategy reading
some variables (BatchNorm statistics) is a collective, so a rank that skipped the
write would leave the others waiting. Only rank 0's directory is attached to the
report and persisted by Ray Train in the run's storage.

The weights are saved as a flat, ordered set of variables, not as the Keras model
object: a compiled tf_keras model tracks ``model.optimizer`` as a child, so a
checkpoint of the model would carry the optimizer along and a "weights only" read
would silently restore the old phase's learning rate, step count and moments into
the new phase's optimizer (docs/design.md, decision 9). Here the optimizer is a
separate node, restored only when asked for.
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

    def done(self, phase: str, epochs: int) -> bool:
        """Has ``phase`` (of ``epochs`` epochs) been completed?"""
        here, there = PHASES.index(self.phase), PHASES.index(phase)
        return here > there or (here == there and self.epoch >= epochs)

    def start_epoch(self, phase: str) -> int:
        return self.epoch if self.phase == phase else 0

    def position(self, epochs: dict[str, int]) -> int:
        """Epochs done across phases, given each phase's configured epochs."""
        before = sum(epochs[p] for p in PHASES[: PHASES.index(self.phase)])
        return before + self.epoch

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        d = json.loads(text)
        return cls(phase=d["phase"], epoch=int(d["epoch"]), history=d["history"])


def _weights(model: Any) -> dict[str, Any]:
    # Zero-padded positions: the variable order of a model is fixed by its architecture.
    return {f"{i:05d}": v for i, v in enumerate(model.weights)}


def save_checkpoint(model: Any, optimizer: Any, state: TrainState) -> str:
    """Write weights, optimizer state and ``state`` to a fresh local directory."""
    import tensorflow as tf

    directory = tempfile.mkdtemp(prefix="xfer-ckpt-")
    tf.train.Checkpoint(weights=_weights(model), optimizer=optimizer).write(
        os.path.join(directory, TF_PREFIX)
    )
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
    """Load the weights, and the optimizer's state only when ``optimizer`` is given."""
    import tensorflow as tf

    nodes: dict[str, Any] = {"weights": _weights(model)}
    if optimizer is not None:
        inner = getattr(optimizer, "inner_optimizer", optimizer)  # a loss-scale wrapper
        inner.build(model.trainable_variables)  # slots must exist to be restored
        nodes["optimizer"] = optimizer
    status = tf.train.Checkpoint(**nodes).read(os.path.join(directory, TF_PREFIX))
    status.assert_existing_objects_matched().expect_partial()


def optimizer_state(optimizer: Any) -> dict[str, float | int]:
    """The learning rate the optimizer applies at its next step, and its step count."""
    from tf_keras import backend
    from tf_keras.optimizers.schedules import LearningRateSchedule

    inner = getattr(optimizer, "inner_optimizer", optimizer)  # a loss-scale wrapper
    iterations = int(backend.get_value(optimizer.iterations))
    # A schedule: its value at the next step (Keras' learning_rate is the last step's).
    lr = getattr(inner, "_learning_rate", None)
    if not isinstance(lr, LearningRateSchedule):
        lr = optimizer.learning_rate
    value = lr(iterations) if callable(lr) else lr
    return {"learning_rate": float(backend.get_value(value)), "iterations": iterations}
