"""The model registry, input scaling, the seed notebook's model, freezing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xfer.config import load_config
from xfer.errors import ConfigError
from xfer.models.bases import REGISTRY
from xfer.models.model import (
    build_model,
    compile_model,
    extract_base,
    make_optimizer,
    unfreeze_top,
)

CONFIGS = Path(__file__).parent.parent / "jobs" / "configs"


def test_seed_config_builds_exactly_the_notebook_model():
    cfg = load_config(
        str(CONFIGS / "seed_vgg16.yaml"), ["model.weights=none", "data.image_size=32"]
    )
    model, base = build_model(cfg.model, 32, num_classes=2)
    import tf_keras

    assert base.name == "vgg16" and not base.trainable
    after_base = model.layers[model.layers.index(base) + 1 :]
    assert [type(layer).__name__ for layer in after_base] == ["Flatten", "Dense", "Dense"]
    hidden, out = after_base[1], after_base[2]
    assert (hidden.units, hidden.activation.__name__) == (6, "relu")
    assert (out.units, out.activation.__name__) == (1, "sigmoid")
    assert cfg.train.fine_tune.epochs == 0 and cfg.train.head.optimizer == "adam"
    # Everything trainable is the head: 512*1*1*6+6 + 6*1+1 at 32 px.
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 512 * 6 + 6 + 6 + 1
    assert isinstance(model.layers[1], tf_keras.layers.Conv2D)  # the fixed caffe input scaling


@pytest.mark.parametrize(
    "name", ["vgg16", "resnet50", "mobilenet_v2", "efficientnet_b0", "tiny_cnn"]
)
def test_every_base_builds_and_predicts(name):
    cfg = load_config(None, [f"model.base={name}", "model.weights=none"])
    model, base = build_model(cfg.model, 32, num_classes=3)
    out = model.predict(
        np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32"), verbose=0
    )
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    assert extract_base(model) is base


@pytest.mark.parametrize(
    ("base", "module"),
    [("vgg16", "vgg16"), ("resnet50", "resnet50"), ("mobilenet_v2", "mobilenet_v2")],
)
def test_input_scaling_matches_keras_preprocess_input(base, module):
    """The in-model scaling layer equals keras.applications.<base>.preprocess_input."""
    import importlib

    import tf_keras

    from xfer.models.model import input_scaling

    x = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    ours = input_scaling(REGISTRY[base].preprocessing)(x).numpy()
    theirs = importlib.import_module(f"tf_keras.applications.{module}").preprocess_input(x.copy())
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    assert tf_keras  # imported for the applications modules


def test_unfreeze_top_keeps_batchnorm_frozen():
    cfg = load_config(None, ["model.base=tiny_cnn", "model.weights=none"])
    _model, base = build_model(cfg.model, 32, num_classes=2)
    n = unfreeze_top(base, None, 4)
    trainable = [layer.name for layer in base.layers if layer.trainable]
    assert trainable == ["block3_pool", "block4_conv", "block4_relu"] and n == 1
    unfreeze_top(base, "block3_conv", None)
    assert [layer.name for layer in base.layers if layer.trainable and layer.weights] == [
        "block3_conv",
        "block4_conv",
    ]
    assert not any(layer.trainable for layer in base.layers if "bn" in layer.name)
    unfreeze_top(base, -3, None)
    assert [layer.name for layer in base.layers if layer.trainable] == [
        "block4_conv",
        "block4_relu",
    ]
    with pytest.raises(ConfigError, match=r"no such layer in tiny_cnn.*block4_conv"):
        unfreeze_top(base, "block4_cnv", None)
    with pytest.raises(ConfigError, match="has 16 layers"):
        unfreeze_top(base, 99, None)


def test_weights_file_loads_into_the_base(tmp_path):
    cfg = load_config(None, ["model.base=tiny_cnn", "model.weights=none"])
    _, base = build_model(cfg.model, 32, num_classes=2)
    base.save_weights(str(tmp_path / "w.h5"))
    cfg2 = load_config(None, ["model.base=tiny_cnn", f"model.weights={tmp_path / 'w.h5'}"])
    _, base2 = build_model(cfg2.model, 32, num_classes=2, weights_path=str(tmp_path / "w.h5"))
    for a, b in zip(base.get_weights(), base2.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    cfg3 = load_config(
        None, ["model.base=mobilenet_v2", "model.alpha=0.35", f"model.weights={tmp_path / 'w.h5'}"]
    )
    with pytest.raises(ConfigError, match="does not fit a mobilenet_v2 base"):
        build_model(cfg3.model, 32, num_classes=2, weights_path=str(tmp_path / "w.h5"))


def test_mixed_precision_runs_on_cpu_with_float32_outputs():
    """The GPU path's mixed precision, exercised on CPU with bfloat16."""
    import tf_keras

    from xfer.devices import set_mixed_precision

    try:
        assert set_mixed_precision(True, have_gpu=False) == "mixed_bfloat16"
        cfg = load_config(None, ["model.base=tiny_cnn", "model.weights=none"])
        model, _ = build_model(cfg.model, 32, num_classes=2)
        compile_model(model, make_optimizer("adam", 1e-3), 2)
        x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
        loss = model.train_on_batch(x, np.array([0, 1, 0, 1]))
        assert np.isfinite(loss[0] if isinstance(loss, list) else loss)
        assert model.output.dtype.name == "float32"
        assert any(layer.compute_dtype == "bfloat16" for layer in model.layers)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    assert set_mixed_precision(False, have_gpu=True) is None


def test_all_reduce_is_nccl_exactly_when_workers_have_gpus():
    import tensorflow as tf

    from xfer.devices import communication_options

    impl = tf.distribute.experimental.CommunicationImplementation
    assert communication_options(0).implementation == impl.RING
    assert communication_options(1).implementation == impl.NCCL
    assert communication_options(8).implementation == impl.NCCL


def test_phase_learning_rate_schedules():
    from xfer.models.model import make_optimizer, phase_learning_rate
    from xfer.train.checkpoint import optimizer_state

    assert phase_learning_rate(1e-3, "constant", 5, 0.0, 10) == 1e-3
    cosine = phase_learning_rate(1e-3, "cosine", 5, 1.0, 10)  # 50 steps, 10 of warm-up
    assert float(cosine(0)) == pytest.approx(0.0)
    assert float(cosine(5)) == pytest.approx(0.5e-3)
    assert float(cosine(10)) == pytest.approx(1e-3)
    assert float(cosine(30)) == pytest.approx(0.5e-3, rel=1e-3)  # half way down the cosine
    assert float(cosine(50)) == pytest.approx(0.0, abs=1e-9)
    flat = phase_learning_rate(1e-3, "constant", 5, 0.5, 10)  # warm-up, then constant
    assert float(flat(2)) == pytest.approx(0.4e-3) and float(flat(40)) == pytest.approx(1e-3)
    # The optimizer reports the rate of its next step: where a restored step count is.
    optimizer = make_optimizer("adam", cosine)
    optimizer.iterations.assign(30)
    assert optimizer_state(optimizer)["learning_rate"] == pytest.approx(0.5e-3, rel=1e-3)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_label_smoothing_keeps_the_model_from_certainty(num_classes):
    """Trained to separate trivially separable data, a model with label smoothing 0.2
    stops short of certainty; without, it heads for 0/1. The reported loss stays the
    plain cross-entropy either way."""
    import tf_keras

    rng = np.random.default_rng(0)
    y = rng.integers(0, num_classes, 256)
    x = np.eye(num_classes)[y].astype("float32") * 4 + rng.normal(0, 0.1, (256, num_classes))
    tops = {}
    for smoothing in (0.0, 0.2):
        tf_keras.utils.set_random_seed(0)
        units, activation = (1, "sigmoid") if num_classes == 2 else (num_classes, "softmax")
        model = tf_keras.Sequential(
            [tf_keras.Input((num_classes,)), tf_keras.layers.Dense(units, activation=activation)]
        )
        compile_model(model, make_optimizer("adam", 0.1), num_classes, label_smoothing=smoothing)
        history = model.fit(x, y, epochs=30, batch_size=64, verbose=0)
        p = model.predict(x, verbose=0)
        p = np.concatenate([1 - p, p], axis=1) if num_classes == 2 else p
        tops[smoothing] = float(p.max(axis=1).mean())
        true = p[np.arange(256), y]
        assert history.history["loss"][-1] == pytest.approx(-np.log(true).mean(), rel=0.05)
    assert tops[0.0] > 0.99 and tops[0.2] < 0.95, tops


def test_xla_compiled_train_step_trains():
    import tf_keras

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    model = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(1, "sigmoid")])
    compile_model(model, make_optimizer("adam", 0.1), 2, jit_compile=True)
    history = model.fit(x, y, epochs=20, batch_size=16, verbose=0)
    assert model.jit_compile and history.history["accuracy"][-1] > 0.9
