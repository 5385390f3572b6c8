"""The Keras callback every worker runs at epoch boundaries.

At the start of each epoch: note the stage in the run's journal (rank 0) and the
learning rate the epoch will use; the fault-injection hooks of the recovery tests.
At the end: time the epoch, write a checkpoint (every rank), report to Ray Train
(rank 0 attaches the checkpoint), append TensorBoard scalars (rank 0).
"""

from __future__ import annotations

import os
import shutil
import time
from typing import TYPE_CHECKING, Any

from xfer.registry.layout import TENSORBOARD
from xfer.store import storage
from xfer.train.checkpoint import optimizer_state, save_checkpoint
from xfer.train.faults import maybe_fail

if TYPE_CHECKING:
    from xfer.train.rank import Worker


class EpochEnd:
    """Keras callback: time epochs, checkpoint + report every epoch, TensorBoard, faults.

    ``position`` is the epochs done across phases before this phase begins.
    """

    def __init__(
        self,
        w: Worker,
        *,
        phase: str,
        optimizer: Any,
        train_rows: int,
        tb_dir: str | None,
        position: int,
    ):
        self.w, self.phase, self.optimizer = w, phase, optimizer
        self.train_rows, self.tb_dir, self.position = train_rows, tb_dir, position
        self.ema = EmaForValidation(optimizer)
        self.epoch = 0
        self._t0 = 0.0
        self._t_val: float | None = None
        self._lr = 0.0
        self._writer: Any = None
        wants_batches = w.cfg.fault.point == "batch" and w.cfg.fault.rank == w.rank
        self.callback = _keras_callback(self, wants_batches)

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
                storage.join(self.w.run_uri, TENSORBOARD, self.phase, name),
            )

    def progress_line(self, row: dict[str, float]) -> str:
        """The console's one line per epoch."""
        total = self.w.cfg.train.phase(self.phase).epochs
        rows = [r for r in self.w.state.history[self.phase] if "seconds" in r]
        left = (total - int(row["epoch"])) * sum(r["seconds"] for r in rows) / max(len(rows), 1)
        parts = [f"loss {row.get('loss', float('nan')):.4f}"]
        for key, name in (("accuracy", "accuracy"), ("val_accuracy", "val accuracy")):
            if key in row:
                parts.append(f"{name} {row[key]:.4f}")
        parts.append(f"{row['images_per_s']:.0f} img/s")
        parts.append(f"phase done in ~{left:.0f}s" if left > 0 else f"{row['seconds']:.0f}s")
        return f"[xfer] {self.phase} epoch {int(row['epoch'])}/{total}: {', '.join(parts)}"

    def begin(self, epoch: int) -> None:
        self.epoch = epoch
        if self.w.journal is not None:
            self.w.journal.stage(
                "train", phase=self.phase, epoch=epoch + 1, position=self.position + epoch
            )
        maybe_fail(self.w.cfg.fault, self.w.run_uri, self.w.rank, "epoch", self.phase, epoch)
        self._lr = optimizer_state(self.optimizer)["learning_rate"]
        self._t0 = time.monotonic()
        self._t_val = None

    def validation_begins(self) -> None:
        if self._t_val is None:
            self._t_val = time.monotonic()

    def end(self, epoch: int, logs: dict[str, Any]) -> None:
        import ray.train

        now = time.monotonic()
        seconds = now - self._t0
        train_seconds = (self._t_val or now) - self._t0  # validation excluded
        row = {k: float(v) for k, v in logs.items()}
        row.update(
            epoch=epoch + 1,
            seconds=seconds,
            train_seconds=train_seconds,
            images_per_s=self.train_rows / max(train_seconds, 1e-9),
            learning_rate=self._lr,
        )
        self.w.state.history[self.phase].append(row)
        self.w.state.phase, self.w.state.epoch = self.phase, epoch + 1
        directory = save_checkpoint(self.w.model, self.optimizer, self.w.state)
        if self.w.rank == 0 and self.tb_dir:
            self.write_tensorboard(row)
        if self.w.rank == 0 and self.w.cfg.train.verbose > 0:
            print(self.progress_line(row), flush=True)
        checkpoint = ray.train.Checkpoint.from_directory(directory) if self.w.rank == 0 else None
        ray.train.report({"phase": self.phase, **row}, checkpoint=checkpoint)
        shutil.rmtree(directory, ignore_errors=True)


def _keras_callback(outer: EpochEnd, wants_batches: bool) -> Any:
    """The tf_keras callback that calls ``outer``; with ``wants_batches``, the batch
    fault hook too (only then: a per-batch hook slows every step)."""
    import tf_keras

    class _Callback(tf_keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            outer.begin(epoch)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            outer.end(epoch, logs or {})

        def on_test_begin(self, logs: Any = None) -> None:
            outer.validation_begins()
            outer.ema.swap_in(self.model)

        def on_test_end(self, logs: Any = None) -> None:
            outer.ema.swap_out(self.model)

    class _BatchFault(_Callback):
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            w = outer.w
            maybe_fail(w.cfg.fault, w.run_uri, w.rank, "batch", outer.phase, outer.epoch, batch)

    return _BatchFault() if wants_batches else _Callback()


class EmaForValidation:
    """Validation during ``fit`` measures the moving average of the weights (when the
    optimizer keeps one), then training goes on from its own weights.

    Keras swaps the average in only when ``fit`` ends; each epoch's validation would
    otherwise report the raw weights, not the ones the phase ends with and saves.
    """

    def __init__(self, optimizer: Any):
        from xfer.models.model import uses_ema

        self.optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        self.active = uses_ema(optimizer)
        self._saved: list[Any] | None = None

    def swap_in(self, model: Any) -> None:
        if not self.active or not getattr(self.optimizer, "_built", False):
            return
        variables = model.trainable_variables
        self._saved = [v.numpy() for v in variables]
        self.optimizer.finalize_variable_values(variables)

    def swap_out(self, model: Any) -> None:
        if self._saved is None:
            return
        for variable, value in zip(model.trainable_variables, self._saved, strict=True):
            variable.assign(value)
        self._saved = None
