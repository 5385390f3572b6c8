"""`build_model(cfg, num_classes)`: a pretrained base, its input scaling, a new head.

    model, base = build_model(cfg.model, image_size=224, num_classes=2, weights_path=path)

The model takes plain RGB pixels (float, 0..255, ``image_size`` square): each base's
own input scaling is the model's first layer, built from stock Keras layers only, so
a saved model needs nothing from xfer to be loaded and used. The base is called with
``training=False`` so that BatchNorm stays in inference mode in both phases
(docs/design.md, decision 7). Freezing is a setting: :func:`freeze_base` and
:func:`unfreeze_top` flip ``trainable`` flags; the caller recompiles.
"""

from __future__ import annotations

from typing import Any

from xfer.config import ModelConfig
from xfer.errors import ConfigError
from xfer.models.bases import REGISTRY, input_scaling
from xfer.models.bases import tf_keras as _keras


def build_base(cfg: ModelConfig, image_size: int, weights_path: str | None) -> Any:
    """The convolutional base with the configured weights loaded."""
    spec = REGISTRY[cfg.base]
    shape = (image_size, image_size, 3)
    if cfg.weights == "imagenet":
        if not spec.has_imagenet:
            raise ConfigError(
                f"model.weights: {cfg.base} has no ImageNet weights; use a file or none"
            )
        try:
            return spec.build(shape, "imagenet", cfg.alpha)
        except Exception as exc:  # the download needs internet
            raise ConfigError(
                f"model.weights=imagenet: could not load Keras' ImageNet weights for {cfg.base} "
                f"({type(exc).__name__}: {str(exc)[:200]}). Without internet, point model.weights "
                "at an .h5 file (local path or s3:// URI)"
            ) from None
    base = untrained_base(cfg, image_size)
    if weights_path:
        try:
            base.load_weights(weights_path)
        except Exception as exc:
            raise ConfigError(
                f"model.weights={cfg.weights}: the file does not fit a {cfg.base} base at "
                f"{image_size}px ({type(exc).__name__}: {str(exc)[:300]})"
            ) from None
    return base


def untrained_base(cfg: ModelConfig, image_size: int) -> Any:
    """The base's architecture with fresh weights (nothing downloaded or read): for
    checks of its layers, or to copy a trained model's weights into."""
    return REGISTRY[cfg.base].build((image_size, image_size, 3), None, cfg.alpha)


def build_model(
    cfg: ModelConfig,
    image_size: int,
    num_classes: int,
    weights_path: str | None = None,
    base: Any = None,
) -> tuple[Any, Any]:
    """Input scaling + frozen base + head. Returns ``(model, base)``."""
    keras = _keras()
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes (the dataset has {num_classes})")
    base = base if base is not None else build_base(cfg, image_size, weights_path)
    base.trainable = False
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = input_scaling(REGISTRY[cfg.base].preprocessing)(inputs)
    x = base(x, training=False)  # BatchNorm in inference mode, in both phases
    x = head(cfg, x, num_classes)
    return keras.Model(inputs, x, name=f"xfer_{cfg.base}"), base


POOLING_LAYERS = {"flatten": "flatten", "max": "max_pool", "avg": "avg_pool"}


def head(cfg: ModelConfig, features: Any, num_classes: int) -> Any:
    """The trainable head on top of the base's feature map: pooling, then the classifier."""
    layers = _keras().layers
    h = cfg.head
    name = POOLING_LAYERS[h.pooling]
    if h.pooling == "flatten":
        x = layers.Flatten(name=name)(features)
    elif h.pooling == "max":
        x = layers.GlobalMaxPooling2D(name=name)(features)
    else:
        x = layers.GlobalAveragePooling2D(name=name)(features)
    if h.dropout > 0:
        x = layers.Dropout(h.dropout, name="dropout_0")(x)
    for i, dense in enumerate(h.dense):
        x = layers.Dense(dense.units, activation=dense.activation, name=f"dense_{i}")(x)
        if h.dropout > 0:
            x = layers.Dropout(h.dropout, name=f"dropout_{i + 1}")(x)
    # float32 outputs even under mixed precision, for numerically sound losses.
    if num_classes == 2:
        return layers.Dense(1, activation="sigmoid", name="output", dtype="float32")(x)
    return layers.Dense(num_classes, activation="softmax", name="output", dtype="float32")(x)


def head_only_model(model: Any, cfg: ModelConfig, feature_dim: int) -> Any:
    """The layers after pooling, as a model on pooled features, sharing the variables.

    Training it trains the full model's head (same variables), which is how the head
    phase runs on cached features while the saved model stays base + head.
    """
    keras = _keras()
    names = [layer.name for layer in model.layers]
    after = model.layers[names.index(POOLING_LAYERS[cfg.head.pooling]) + 1 :]
    inputs = keras.Input((feature_dim,), name="features")
    x = inputs
    for layer in after:
        x = layer(x)
    return keras.Model(inputs, x, name="head_on_features")


def feature_extractor(model: Any, cfg: ModelConfig) -> Any:
    """Image -> pooled base features: the input of :func:`head_only_model`."""
    keras = _keras()
    return keras.Model(
        model.input, model.get_layer(POOLING_LAYERS[cfg.head.pooling]).output, name="features"
    )


def freeze_base(base: Any) -> None:
    base.trainable = False


def unfreeze_top(base: Any, unfreeze_from: str | int | None, unfreeze_top: int | None) -> int:
    """Make the top of the base trainable; returns how many layers now train.

    BatchNormalization layers stay frozen (and run in inference mode anyway), as in
    Keras' own fine-tuning guide: updating their statistics on a small data set
    destroys what the base learned.
    """
    layers = base.layers
    if unfreeze_top is not None:
        start = max(0, len(layers) - unfreeze_top)
    elif unfreeze_from is None:
        start = 0
    elif isinstance(unfreeze_from, int):
        if not -len(layers) <= unfreeze_from < len(layers):
            raise ConfigError(
                f"train.fine_tune.unfreeze_from={unfreeze_from}: the {base.name} base has {len(layers)} layers"
            )
        start = unfreeze_from % len(layers)
    else:
        names = [layer.name for layer in layers]
        if unfreeze_from not in names:
            import difflib

            close = difflib.get_close_matches(unfreeze_from, names, n=3)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise ConfigError(
                f"train.fine_tune.unfreeze_from={unfreeze_from!r}: no such layer in {base.name}{hint}"
            )
        start = names.index(unfreeze_from)
    base.trainable = True
    bn = _keras().layers.BatchNormalization
    count = 0
    for i, layer in enumerate(layers):
        layer.trainable = i >= start and not isinstance(layer, bn)
        count += int(layer.trainable and bool(layer.weights))
    return count


def make_optimizer(name: str, learning_rate: float, ema: float = 0.0) -> Any:
    """The phase's optimizer; ``ema`` > 0 keeps a moving average of the weights in it
    (Keras' own ``use_ema``: ``fit`` swaps the average in when it ends)."""
    optimizers = _keras().optimizers
    kwargs: dict[str, Any] = {"learning_rate": learning_rate}
    if ema:
        kwargs.update(use_ema=True, ema_momentum=ema)
    if name == "sgd":
        return optimizers.SGD(momentum=0.9, **kwargs)
    if name == "rmsprop":
        return optimizers.RMSprop(**kwargs)
    return optimizers.Adam(**kwargs)


def uses_ema(optimizer: Any) -> bool:
    return bool(getattr(getattr(optimizer, "inner_optimizer", optimizer), "use_ema", False))


def phase_learning_rate(
    value: float, schedule: str, epochs: int, warmup_epochs: float, steps_per_epoch: int
) -> Any:
    """The phase's learning rate: a float, or a schedule over its optimizer's steps.

    ``cosine`` decays to 0 by the phase's last step; ``warmup_epochs`` ramps linearly
    from 0 first. The schedule is a function of the optimizer's step count, which a
    checkpoint restores, so a resumed phase goes on where it was on the curve.
    """
    if schedule == "constant" and not warmup_epochs:
        return value
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total - 1, round(warmup_epochs * steps_per_epoch)) if warmup_epochs else 0
    return _keras().optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else value,
        decay_steps=max(1, total - warmup),
        alpha=1.0 if schedule == "constant" else 0.0,
        warmup_target=value if warmup else None,
        warmup_steps=warmup,
    )


def _smoothed_sparse_ce(label_smoothing: float, num_classes: int) -> Any:
    """Sparse categorical cross-entropy with label smoothing (Keras has no such loss)."""
    keras = _keras()

    @keras.saving.register_keras_serializable(package="xfer")
    class SmoothedSparseCrossentropy(keras.losses.Loss):  # type: ignore[misc, name-defined]
        def __init__(self, label_smoothing: float, num_classes: int, **kwargs: Any):
            super().__init__(**kwargs)
            self.label_smoothing, self.num_classes = label_smoothing, num_classes

        def call(self, y_true: Any, y_pred: Any) -> Any:
            import tensorflow as tf

            labels = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), self.num_classes)
            return keras.losses.categorical_crossentropy(
                labels, y_pred, label_smoothing=self.label_smoothing
            )

        def get_config(self) -> dict[str, Any]:
            return {
                **super().get_config(),
                "label_smoothing": self.label_smoothing,
                "num_classes": self.num_classes,
            }

    return SmoothedSparseCrossentropy(label_smoothing, num_classes)


def compile_model(
    model: Any,
    optimizer: Any,
    num_classes: int,
    label_smoothing: float = 0.0,
    jit_compile: bool = False,
) -> None:
    keras = _keras()
    if num_classes == 2:
        loss = keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
        true_loss = keras.metrics.BinaryCrossentropy(name="loss")
        metrics = [keras.metrics.BinaryAccuracy(name="accuracy"), true_loss]
    else:
        loss = (
            _smoothed_sparse_ce(label_smoothing, num_classes)
            if label_smoothing
            else keras.losses.SparseCategoricalCrossentropy()
        )
        true_loss = keras.metrics.SparseCategoricalCrossentropy(name="loss")
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy"), true_loss]
    # weighted_metrics: padding rows (weight 0) count in neither accuracy nor loss. Keras'
    # own "loss" divides each batch's weighted sum by the batch size, padding included,
    # so it understates the mean on the last, padded batch of every epoch; the weighted
    # metric of the same name (reported in its place) is the mean over real examples.
    # (Label smoothing changes the training loss only: the reported "loss" stays the
    # plain cross-entropy of the true labels.)
    model.compile(optimizer=optimizer, loss=loss, weighted_metrics=metrics, jit_compile=jit_compile)


def extract_base(model: Any) -> Any:
    """The convolutional base inside a model built by :func:`build_model`."""
    keras = _keras()
    bases = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(bases) != 1:
        raise ConfigError(f"expected one base model inside {model.name}, found {len(bases)}")
    return bases[0]
