"""A run's model as a TensorFlow SavedModel that takes encoded image bytes.

    export_saved_model("s3://bucket/xfer/runs/<run_id>")     # on this machine
    export_on_ray("s3://bucket/xfer/runs/<run_id>")          # as one Ray task

writes ``<run>/model/saved_model/`` with one signature, ``serving_default``:

    image_bytes   string  [n]      encoded JPEG, PNG, GIF, BMP or WebP (first frame)
    probabilities float32 [n, C]   in the order of the model's classes
    label         string  [n]      the most probable class
    index         int32   [n]      its position in the classes

The graph holds the preparation of :func:`xfer.scoring.scorer.image_pixels`, so TF Serving,
SageMaker or Vertex need no xfer code:

1. decode to RGB (``tf.io.decode_image``, as training decodes);
2. when the longest side is above the model's recorded ``max_side``: the pre-resize
   that sharding and ``xfer score`` do with PIL (reduce + bilinear), *approximated*
   in TensorFlow ops (:func:`pil_resize`: pixels within 1 of PIL's; a JPEG is
   decoded for it with the accurate DCT, as PIL decodes it);
3. unless the source is a PNG or BMP: the JPEG re-encoding its shard copy got, when
   it was pre-resized or is not a JPEG (GIF, WebP);
4. exactly :func:`xfer.data.preprocess.decode_and_resize`'s resize, then the model (its
   input scaling is inside it), then the temperature of the model's record
   (``calibration.temperature``; absent: 1):

    p = model output as [n, C]  (one sigmoid output: [1 - p, p])
    probabilities = softmax(log(clip(p, 1e-7, 1)) / T)     in float32

What TensorFlow cannot do, and ``xfer score`` does with PIL: EXIF orientation,
alpha composited onto white, CMYK and other mode conversions (README, "Serving the
exported model"). An upright RGB JPEG or PNG no larger than ``max_side`` scores as
``xfer score`` scores it. A batch with bytes that are not an image fails as a whole
(``InvalidArgumentError``; TF Serving answers 400 with the message).

Writing: the SavedModel is saved to a temporary directory and each file uploaded
under ``<run>/model/saved_model/``, then files of an older export that this one
does not hold are deleted. No reader looks there before the run's ``_SUCCESS``
(scoring and ``latest.json`` readers only use committed runs), and a retry or a
resumed run rewrites the same keys, so no staging is needed.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from xfer.errors import ConfigError
from xfer.registry.layout import MODEL_FILE, ModelRef, resolve_model
from xfer.store import storage

SAVED_MODEL_DIR = "saved_model"  # under <run>/model/
SIGNATURE = "serving_default"
INPUT = "image_bytes"
OUTPUTS = ("probabilities", "label", "index")
EPSILON = 1e-7  # the probability floor before the log of temperature scaling
# Sources sharding re-encodes losslessly (xfer.data.images.LOSSLESS_FORMATS that TF decodes).
_LOSSLESS_MAGIC = (b"\x89PNG", b"BM")


def saved_model_uri(run_uri: str) -> str:
    return storage.join(run_uri, "model", SAVED_MODEL_DIR)


def export_saved_model(run_uri: str, temperature: float | None = None) -> dict[str, Any]:
    """Export the run's ``model.keras`` to ``<run>/model/saved_model/``; what was written.

    ``temperature`` None: the one in the model's record (``calibration``, as
    :func:`xfer.models.calibration.temperature_of` reads it), 1 when it is uncalibrated. Runs before the run's ``_SUCCESS`` (the run need not be
    committed) and again on a retry, writing the same keys.
    """
    import tensorflow as tf
    import tf_keras

    ref = resolve_model(run_uri, require_committed=False)
    if temperature is None:  # the record's, as scoring applies it (xfer.models.calibration)
        temperature = ref.temperature if ref.temperature is not None else 1.0
    if not temperature > 0:
        raise ConfigError(f"export: the temperature must be > 0, not {temperature}")
    target = saved_model_uri(ref.run_uri)
    with tempfile.TemporaryDirectory(prefix="xfer-export-") as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        storage.download_file(ref.model_file, path)
        model = tf_keras.models.load_model(path, compile=False)
        module = serving_module(model, ref, temperature)
        local = os.path.join(tmp, SAVED_MODEL_DIR)
        tf.saved_model.save(module, local, signatures={SIGNATURE: module.serve})
        written = storage.upload_dir(local, target)
    storage.delete_prefix(target, keep=set(written))  # an older export's leftovers
    return {
        "path": target,
        "signature": SIGNATURE,
        "inputs": {INPUT: "string [n]: encoded JPEG/PNG/GIF/BMP/WebP"},
        "outputs": {
            "probabilities": f"float32 [n, {len(ref.classes)}]",
            "label": "string [n]",
            "index": "int32 [n]",
        },
        "classes": ref.classes,
        "temperature": temperature,
        "files": len(written),
    }


def export_on_ray(run_uri: str, temperature: float | None = None) -> dict[str, Any]:
    """:func:`export_saved_model` as one Ray task (1 CPU): the driver never loads
    TensorFlow or the model; the task rides out a store outage like the driver."""
    from xfer.raycluster import run_tasks

    result: dict[str, Any] = run_tasks(
        export_saved_model, [(run_uri, temperature)], "export the SavedModel", num_cpus=1
    )[0]
    return result


def serving_module(model: Any, ref: ModelRef, temperature: float) -> Any:
    """A ``tf.Module`` holding the model's variables and the ``serve`` function."""
    import tensorflow as tf

    classes = tf.constant(ref.classes)
    size = ref.image_size

    def prepare(encoded: Any) -> Any:
        return prepare_image(encoded, size, ref.max_side, ref.jpeg_quality)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT)])
    def serve(image_bytes: Any) -> dict[str, Any]:
        x = tf.map_fn(
            prepare, image_bytes, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32)
        )
        out = tf.cast(model(x, training=False), tf.float32)
        if len(ref.classes) == 2 and out.shape[-1] == 1:
            p = tf.reshape(out, [-1])
            out = tf.stack([1.0 - p, p], axis=1)
        logits = tf.math.log(tf.clip_by_value(out, EPSILON, 1.0))
        probabilities = tf.nn.softmax(logits / tf.constant(temperature, tf.float32), axis=-1)
        index = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {
            "probabilities": probabilities,
            "label": tf.gather(classes, index),
            "index": index,
        }

    module = tf.Module()
    # The variables, not the Keras model: the SavedModel then holds only this function.
    module.weights = list(model.variables)
    module.serve = serve
    return module


def prepare_image(encoded: Any, size: int, max_side: int | None, jpeg_quality: int | None) -> Any:
    """Encoded bytes -> float32 [size, size, 3] in 0..255, in TensorFlow ops only."""
    import tensorflow as tf

    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    image = _shard_copy(image, encoded, max_side, jpeg_quality)
    # Exactly xfer.data.preprocess.decode_and_resize's resize.
    image = tf.image.resize(image, [size, size], method="bilinear")
    return tf.clip_by_value(image, 0.0, 255.0)


def _shard_copy(image: Any, encoded: Any, max_side: int | None, jpeg_quality: int | None) -> Any:
    """The pixels of the image's shard copy: longest side at most ``max_side`` (PIL's
    sizes, rounded half to even as Python's ``round``), 8-bit; re-encoded as JPEG when
    sharding would have (pre-resized, or not a JPEG; never a PNG or BMP)."""
    import tensorflow as tf

    h, w = tf.shape(image)[0], tf.shape(image)[1]
    longest = tf.maximum(h, w)

    def side(n: Any) -> Any:
        scaled = tf.round(tf.cast(n, tf.float64) * (max_side / tf.cast(longest, tf.float64)))
        return tf.maximum(1, tf.cast(scaled, tf.int32))

    def shrink() -> Any:
        # PIL decodes a JPEG with the accurate integer DCT, TensorFlow by default with
        # the fast one (up to 9 levels apart): scoring pre-resizes PIL's pixels.
        source = tf.cond(
            tf.io.is_jpeg(encoded),
            lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
            lambda: image,
        )
        return pil_resize(source, side(h), side(w))

    resized = tf.constant(False)
    if max_side:
        resized = longest > max_side
        image = tf.cond(resized, shrink, lambda: image)
    if not jpeg_quality:
        return image

    def reencode() -> Any:
        again = tf.io.decode_image(
            tf.io.encode_jpeg(image, quality=jpeg_quality), channels=3, expand_animations=False
        )
        again.set_shape([None, None, 3])
        return again

    magic = tf.strings.substr(encoded, 0, 4)
    lossless = tf.reduce_any([tf.strings.substr(magic, 0, len(m)) == m for m in _LOSSLESS_MAGIC])
    # A JPEG within max_side is kept as it is; GIF and WebP are always converted.
    converted = tf.logical_or(resized, tf.logical_not(tf.io.is_jpeg(encoded)))
    return tf.cond(tf.logical_and(converted, tf.logical_not(lossless)), reencode, lambda: image)


def pil_resize(image: Any, height: Any, width: Any) -> Any:
    """PIL's ``resize(BILINEAR, reducing_gap=2.0)`` of a uint8 image, in TensorFlow ops.

    PIL first averages blocks of ``int(scale / 2)`` pixels (``reduce``; a partial block
    at the edge averages what it has), then resamples what is left with its antialiased
    bilinear filter over the exact box: ``ScaleAndTranslate``'s triangle kernel with
    antialias, as ``tf.image.resize(antialias=True)`` uses; across, rounded to 8 bits,
    then down, as PIL's two passes. PIL computes in fixed point: pixels differ by at
    most 1, on 0.03% to 12% of them (measured from 49 to 4000 px down to 48).
    """
    import tensorflow as tf

    h, w = tf.shape(image)[0], tf.shape(image)[1]

    def factor(size: Any, new: Any) -> Any:
        ratio = tf.cast(size, tf.float64) / tf.cast(new, tf.float64) / 2.0
        return tf.maximum(1, tf.cast(ratio, tf.int32))  # int() of a positive ratio

    fy, fx = factor(h, height), factor(w, width)
    pad = [[0, (fy - h % fy) % fy], [0, (fx - w % fx) % fx], [0, 0]]

    def block_sums(x: Any) -> Any:
        x = tf.pad(x, pad)
        shape = tf.shape(x)
        blocks = tf.reshape(x, [shape[0] // fy, fy, shape[1] // fx, fx, shape[2]])
        return tf.reduce_sum(blocks, axis=[1, 3])

    count = block_sums(tf.ones([h, w, 1]))
    reduced = tf.floor(block_sums(tf.cast(image, tf.float32)) / count + 0.5)  # rounds half up
    # The box PIL resamples: the reduced image's first h / fy rows and w / fx columns;
    # across first, rounded to 8 bits, then down, as PIL does.
    across = _resample(reduced, [tf.shape(reduced)[0], width], 1.0, width * fx / w)
    small = _resample(across, [height, width], height * fy / h, 1.0)
    return tf.cast(small, tf.uint8)


def _resample(x: Any, size: list[Any], scale_y: Any, scale_x: Any) -> Any:
    """Antialiased triangle-filter resampling of [h, w, c] by the given scales, rounded."""
    import tensorflow as tf

    out = tf.raw_ops.ScaleAndTranslate(
        images=x[None],
        size=tf.stack(size),
        scale=tf.cast(tf.stack([scale_y, scale_x]), tf.float32),
        translation=tf.zeros([2]),
        kernel_type="triangle",
        antialias=True,
    )
    return tf.clip_by_value(tf.round(out[0]), 0.0, 255.0)
