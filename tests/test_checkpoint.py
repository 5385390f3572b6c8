"""Checkpoint restore in one process: weights only at a phase boundary, everything mid-phase.

The bug these guard against: a compiled tf_keras model tracks its optimizer, so a
"weights only" restore of the model also restored the head phase's learning rate,
step count and Adam moments into the fine-tuning optimizer (seen: a model compiled
with Adam(1e-5) read learning_rate 0.001, iterations 3 after the restore).
"""

from __future__ import annotations

import numpy as np
import pytest

from xfer.config import load_config
from xfer.models.model import build_model, compile_model, make_optimizer
from xfer.train.checkpoint import TrainState, optimizer_state, restore, save_checkpoint
from xfer.train.outputs import gate_value


@pytest.fixture(scope="module")
def head_checkpoint():
    """A tiny model after 3 steps of Adam(1e-3), checkpointed."""
    cfg = load_config(None, ["model.base=tiny_cnn", "model.weights=none"])
    model, _ = build_model(cfg.model, 32, 2)
    optimizer = make_optimizer("adam", 1e-3)
    compile_model(model, optimizer, 2)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (24, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 2, 24)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    state = TrainState(phase="head", epoch=1)
    return cfg, model, optimizer, save_checkpoint(model, optimizer, state)


def _fresh(cfg, learning_rate: float):
    model, _ = build_model(cfg.model, 32, 2)
    optimizer = make_optimizer("adam", learning_rate)
    compile_model(model, optimizer, 2)
    return model, optimizer


def test_weights_only_restore_keeps_the_new_phase_optimizer(head_checkpoint):
    cfg, trained, _, directory = head_checkpoint
    model, optimizer = _fresh(cfg, 1e-5)
    restore(directory, model, None)
    assert optimizer_state(optimizer) == {"learning_rate": pytest.approx(1e-5), "iterations": 0}
    assert not optimizer.variables or all(not np.any(v.numpy()) for v in optimizer.variables[1:]), (
        "no Adam moments may come along"
    )
    for a, b in zip(trained.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_mid_phase_restore_brings_the_optimizer_back_exactly(head_checkpoint):
    cfg, _, trained_opt, directory = head_checkpoint
    model, optimizer = _fresh(cfg, 1e-3)
    restore(directory, model, optimizer)
    assert optimizer_state(optimizer) == {"learning_rate": pytest.approx(1e-3), "iterations": 3}
    # Same architecture, same variable order (layer names get suffixes in a new model).
    saved, loaded = trained_opt.variables, optimizer.variables
    assert len(saved) == len(loaded) > 1
    for a, b in zip(saved, loaded, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)


def test_reported_loss_is_the_mean_over_real_examples(head_checkpoint):
    """Padding rows (weight 0) must not dilute the loss Keras reports."""
    _, model, _, _ = head_checkpoint
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 2, 16)
    w = np.r_[np.ones(6), np.zeros(10)].astype("float32")
    reported = model.evaluate(x, y, sample_weight=w, batch_size=16, verbose=0, return_dict=True)
    p = np.clip(model.predict(x[:6], verbose=0).reshape(-1), 1e-7, 1 - 1e-7)
    true = float(np.mean(-(y[:6] * np.log(p) + (1 - y[:6]) * np.log(1 - p))))
    assert reported["loss"] == pytest.approx(true, rel=1e-4)


def test_gate_names_the_metric_it_used():
    history = {"head": [{"val_accuracy": 0.7}], "fine_tune": [{"val_accuracy": 0.9}]}
    assert gate_value({"accuracy": 0.8}, history) == ("test_accuracy", 0.8)
    assert gate_value({}, history) == ("val_accuracy", 0.9)
    assert gate_value({}, {"head": [], "fine_tune": []}) == ("test_accuracy", None)


def test_mixed_precision_checkpoint_keeps_the_loss_scale():
    """GPU training uses mixed_float16 with a dynamic loss scale (a loss-scale
    optimizer wrapping the phase's optimizer). A resume must come back with the scale
    and its growth counter, not restart at 2**15 and overflow its first steps again.
    Exercised on CPU with the same policy."""
    import tf_keras

    cfg = load_config(None, ["model.base=tiny_cnn", "model.weights=none"])
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, _ = build_model(cfg.model, 32, 2)
        compile_model(model, make_optimizer("adam", 1e-3), 2)
        optimizer = model.optimizer
        assert isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 255, (24, 32, 32, 3)).astype("float32")
        model.fit(x, rng.integers(0, 2, 24), batch_size=8, epochs=1, verbose=0)
        # As after a run of overflows and good steps: a scale of its own and a count.
        optimizer._loss_scale.current_loss_scale.assign(512.0)
        optimizer._loss_scale.counter.assign(7)
        directory = save_checkpoint(model, optimizer, TrainState(phase="head", epoch=1))

        fresh, _ = build_model(cfg.model, 32, 2)
        compile_model(fresh, make_optimizer("adam", 1e-3), 2)
        assert float(fresh.optimizer.loss_scale) == 2.0**15  # the default it would restart at
        restore(directory, fresh, fresh.optimizer)
        assert float(fresh.optimizer.loss_scale) == 512.0
        assert int(fresh.optimizer._loss_scale.counter.numpy()) == 7
        assert optimizer_state(fresh.optimizer)["iterations"] == 3
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")


def test_a_mid_phase_restore_brings_the_moving_average_back():
    """train.<phase>.ema: the average lives in the optimizer; a resumed phase goes on
    averaging from where it was, not from the restored weights."""
    cfg = load_config(None, ["model.base=tiny_cnn", "model.weights=none"])
    model, _ = build_model(cfg.model, 32, 2)
    optimizer = make_optimizer("sgd", 0.05, ema=0.9)
    compile_model(model, optimizer, 2)
    rng = np.random.default_rng(1)
    for _ in range(3):  # train_on_batch: the weights as trained, the average apart
        model.train_on_batch(rng.uniform(0, 255, (8, 32, 32, 3)), rng.integers(0, 2, 8))
    directory = save_checkpoint(model, optimizer, TrainState(phase="fine_tune", epoch=1))
    averages = [v.numpy() for v in optimizer._model_variables_moving_average]
    assert any(
        not np.array_equal(a, w.numpy())
        for a, w in zip(averages, model.trainable_variables, strict=True)
    )
    fresh, _ = build_model(cfg.model, 32, 2)
    again = make_optimizer("sgd", 0.05, ema=0.9)
    compile_model(fresh, again, 2)
    restore(directory, fresh, again)
    for a, b in zip(averages, again._model_variables_moving_average, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    for a, b in zip(model.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
