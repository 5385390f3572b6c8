"""The registry of convolutional bases: the one list of names a config may use.

Each entry builds the stock tf_keras application without its top and says which
input scaling its ImageNet weights expect; :func:`input_scaling` turns that into one
stock Keras layer, so a saved model needs nothing from xfer. That scaling is part of
the model graph, fixed by the base's weights, so it lives here with the base and not
with the preparation of pixels (:mod:`xfer.data.images`), which ends at 0..255 RGB of the
model's input size. The config validates ``model.base`` against :data:`REGISTRY`
and :mod:`xfer.models.model` builds from it; TensorFlow is imported only when a base is
built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Caffe-style bases (VGG16, ResNet50) expect BGR with the ImageNet mean subtracted.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class BaseSpec:
    name: str
    build: Callable[..., Any]  # (input_shape, weights, alpha) -> keras Model
    preprocessing: str  # "caffe" | "tf" (-1..1) | "unit" (0..1) | "none" (0..255)
    has_imagenet: bool = True


def tf_keras() -> Any:
    """tf_keras, imported when first needed (never Keras 3: docs/design.md, decision 1)."""
    import tf_keras

    return tf_keras


def _vgg16(input_shape: tuple[int, int, int], weights: str | None, alpha: float) -> Any:
    return tf_keras().applications.VGG16(
        include_top=False, weights=weights, input_shape=input_shape
    )


def _resnet50(input_shape: tuple[int, int, int], weights: str | None, alpha: float) -> Any:
    return tf_keras().applications.ResNet50(
        include_top=False, weights=weights, input_shape=input_shape
    )


def _mobilenet_v2(input_shape: tuple[int, int, int], weights: str | None, alpha: float) -> Any:
    return tf_keras().applications.MobileNetV2(
        include_top=False, weights=weights, input_shape=input_shape, alpha=alpha
    )


def _efficientnet_b0(input_shape: tuple[int, int, int], weights: str | None, alpha: float) -> Any:
    return tf_keras().applications.EfficientNetB0(
        include_top=False, weights=weights, input_shape=input_shape
    )


def _tiny_cnn(input_shape: tuple[int, int, int], weights: str | None, alpha: float) -> Any:
    """A small conv base for tests and the offline demo (no ImageNet weights exist)."""
    k = tf_keras()
    layers = k.layers
    inputs = k.Input(input_shape)
    x = inputs
    for i, filters in enumerate((16, 32, 64, 96)):
        x = layers.Conv2D(filters, 3, padding="same", name=f"block{i + 1}_conv")(x)
        x = layers.BatchNormalization(name=f"block{i + 1}_bn")(x)
        x = layers.Activation("relu", name=f"block{i + 1}_relu")(x)
        if i < 3:
            x = layers.MaxPooling2D(name=f"block{i + 1}_pool")(x)
    return k.Model(inputs, x, name="tiny_cnn")


REGISTRY: dict[str, BaseSpec] = {
    "vgg16": BaseSpec("vgg16", _vgg16, "caffe"),
    "resnet50": BaseSpec("resnet50", _resnet50, "caffe"),
    "mobilenet_v2": BaseSpec("mobilenet_v2", _mobilenet_v2, "tf"),
    "efficientnet_b0": BaseSpec("efficientnet_b0", _efficientnet_b0, "none"),
    "tiny_cnn": BaseSpec("tiny_cnn", _tiny_cnn, "unit", has_imagenet=False),
}


def input_scaling(kind: str) -> Any:
    """The base's input preprocessing as one stock Keras layer (serialisable)."""
    import numpy as np

    layers = tf_keras().layers
    if kind == "tf":
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, name="input_scaling")
    if kind == "unit":
        return layers.Rescaling(1.0 / 255.0, name="input_scaling")
    if kind == "caffe":
        # RGB -> BGR and mean subtraction as a fixed 1x1 convolution.
        kernel = np.zeros((1, 1, 3, 3), dtype="float32")
        for c in range(3):
            kernel[0, 0, c, 2 - c] = 1.0
        bias = -np.array(CAFFE_MEAN_BGR, dtype="float32")
        conv = layers.Conv2D(3, 1, name="input_scaling", trainable=False)
        conv.build((None, None, None, 3))
        conv.set_weights([kernel, bias])
        return conv
    return layers.Identity(name="input_scaling")
