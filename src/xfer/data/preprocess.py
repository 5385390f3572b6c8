"""Training-time augmentation of prepared pixels.

    image = decode_and_resize(encoded_bytes, 224)       # float32, [224, 224, 3], 0..255
    image = augment(image, seed, AugmentSettings(...))   # training only

Decoding lives with the rest of image preparation (:mod:`xfer.data.images`); it is
imported here too so that training's callers keep one import for both.

Pixels stay in 0..255 here: the model itself starts with its base's input scaling
(see :mod:`xfer.models.model`), so a saved model takes plain RGB images and needs no xfer
code to be used. Every op is a TensorFlow op, stateless where random, so the same
function gives the same pixels eagerly and inside ``tf.data`` (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from xfer.data.images import decode_and_resize

__all__ = ["AugmentSettings", "augment", "decode_and_resize"]


@dataclass(frozen=True)
class AugmentSettings:
    flip: bool = True
    rotation: float = 0.05  # fraction of a full turn, +-
    zoom: float = 0.1  # +- fraction

    @property
    def active(self) -> bool:
        return self.flip or self.rotation > 0 or self.zoom > 0


def augment(image: Any, seed: Any, settings: AugmentSettings) -> Any:
    """Random flip, rotation and zoom from a stateless ``seed`` (shape [2], int)."""
    import tensorflow as tf

    if not settings.active:
        return image
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
    if settings.flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=seeds[0])
    if settings.rotation > 0 or settings.zoom > 0:
        angle = tf.random.stateless_uniform(
            [], seeds[1], -settings.rotation * 2 * math.pi, settings.rotation * 2 * math.pi
        )
        zoom = tf.random.stateless_uniform([], seeds[2], 1.0 - settings.zoom, 1.0 + settings.zoom)
        image = _rotate_zoom(image, angle, zoom)
    return image


def _rotate_zoom(image: Any, angle: Any, zoom: Any) -> Any:
    """Rotate by ``angle`` (radians) and zoom by ``zoom`` (>1 = in) about the centre."""
    import tensorflow as tf

    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    # Output pixel (x, y) samples the input at R(angle) . ((x, y) - c) / zoom + c.
    a0, a1 = cos, -sin
    b0, b1 = sin, cos
    a2 = cx - a0 * cx - a1 * cy
    b2 = cy - b0 * cx - b1 * cy
    transform = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[None, :]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None, ...],
        transforms=transform,
        output_shape=shape[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    return out[0]
