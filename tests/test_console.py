"""What an operator sees: xfer's lines on the console, Ray's and TensorFlow's in a log
file kept with the run; `--verbose` shows everything (real `xfer train` processes)."""

from __future__ import annotations

import os
import re

import pytest

from xfer.store import storage

from .conftest import run_xfer, train_overrides

pytestmark = pytest.mark.slow


def run_train(root: str, weights: str, *flags: str) -> tuple[str, str]:
    args = train_overrides(
        root,
        weights,
        **{"train.head.epochs": 2, "train.fine_tune.epochs": 0, "train.verbose": 2},
    )
    proc = run_xfer("train", *flags, *args, env={**os.environ, "RAY_ADDRESS": ""}, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    run = re.search(r"run \S+ complete: (\S+)", out)
    assert run, out[-2000:]
    return out, run.group(1)


def test_quiet_by_default_and_everything_with_verbose(
    session_root, pretrained_weights, target_dataset
):
    out, run_uri = run_train(session_root, pretrained_weights)
    lines = [line for line in out.splitlines() if line.strip()]
    # One line per epoch: phase, epoch/total, loss, accuracy, val accuracy, img/s.
    epochs = [line for line in lines if line.startswith("[xfer] head epoch ")]
    assert len(epochs) == 2, out
    assert re.match(
        r"\[xfer\] head epoch 2/2: loss [\d.]+, accuracy [\d.]+, val accuracy [\d.]+, \d+ img/s",
        epochs[1],
    )
    assert not [line for line in lines if re.search(r"pid=\d+|TrainingReport|^[IWE]\d{4} ", line)]
    # Rank 1's identity is in the log, not on the console.
    assert "rank 0 on node" in out and "rank 1 on node" not in out
    kept = storage.read_text(f"{run_uri}/logs/console.log")
    assert "RayTrainWorker pid=" in kept and "rank 1 on node" in kept
    assert "AWS_SECRET_ACCESS_KEY" not in kept
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in kept

    verbose, _ = run_train(session_root, pretrained_weights, "--verbose")
    assert "(RayTrainWorker pid=" in verbose and "rank 1 on node" in verbose
