"""The one home of image preparation: encoded bytes in, the model's input pixels out.

    check_image(data, ImageSettings(max_side=256))   # sharding: Accepted | Rejected
    decode_and_resize(encoded, 224)                   # training, evaluation: tf op
    image_pixels(data, 224, max_side=256)             # scoring: float32 or a reason

Every path an image takes to a model goes through here, in the same order:

1. the header (:func:`open_header`): empty file, not an image (or a format tf.data
   cannot decode), more pixels than :data:`MAX_PIXELS` (or the configured limit),
   refused *before* decoding (decompression bombs);
2. :func:`normalise` (PIL): EXIF rotation, colour modes to RGB (grayscale, palette,
   CMYK, alpha composited onto white, 16-bit), the pre-resize above ``max_side``;
3. the shard's encoding (:func:`encode_converted`): originals that are already plain,
   upright RGB JPEG/PNG are kept byte-for-byte; anything converted is re-encoded, as
   PNG if it came in a lossless format, else JPEG;
4. :func:`decode_and_resize` (TensorFlow): decode and squash to the model's square.

Sharding runs 1-3 (:func:`check_image`, which never raises for a bad file: the job
must survive any input); training and evaluation run 4 on what sharding stored;
scoring runs all four on a raw image (:func:`image_pixels`), so a raw image scores
like its sharded copy.

What is *not* here: the base's input scaling (:func:`xfer.models.bases.input_scaling`).
It is a layer of the model graph, chosen by the base's ImageNet weights, and saved
with the model so that a saved model takes plain 0..255 RGB and needs no xfer code;
it belongs with the registry of bases that defines it, not with pixel preparation.
PIL is imported here; TensorFlow only when a decode is first asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 50_000_000  # larger images are refused from their header (the default limit)
EXIF_ORIENTATION = 0x0112
# Formats TensorFlow's decode_image reads after normalisation; others are re-encoded.
PASSTHROUGH_FORMATS = {"JPEG", "PNG"}
LOSSLESS_FORMATS = {"PNG", "BMP", "PPM", "TIFF"}  # re-encoded as PNG when converted
READABLE_FORMATS = {"JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "MPO"}
CONVERTIBLE_MODES = {
    "1",
    "L",
    "LA",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBa",
    "CMYK",
    "YCbCr",
    "I;16",
    "La",
}


@dataclass(frozen=True)
class Accepted:
    image: bytes  # encoded (JPEG or PNG), RGB
    sha256: str  # of the *source* bytes: the identity of the content
    width: int
    height: int
    converted_from: str | None  # original mode when it was not RGB


@dataclass(frozen=True)
class Rejected:
    reason: str
    sha256: str | None = None


@dataclass(frozen=True)
class ImageSettings:
    max_pixels: int = MAX_PIXELS
    max_side: int | None = None  # pre-resize so the longest side is at most this
    jpeg_quality: int = 90


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode == "I;16":
        return img.point(lambda v: v / 256).convert("L").convert("RGB")
    return img.convert("RGB")


def open_header(data: bytes, max_pixels: int) -> Image.Image | str:
    """Open an image lazily (the header only) or say why it must not be decoded.

    Empty data, unknown formats and too many pixels are refused here, before any
    pixel is decoded: the guard against decompression bombs. Shared by sharding
    (which then decodes with PIL) and scoring (which decodes with TensorFlow).
    """
    if not data:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            # The size limit is checked below, from the header, against our own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return "not an image (unrecognised format)"
    except Image.DecompressionBombError as exc:
        return f"image too large (decompression bomb): {exc}"
    except Exception as exc:
        return f"unreadable image header: {type(exc).__name__}: {exc}"
    if (img.format or "unknown") not in READABLE_FORMATS:
        return f"unsupported image format {img.format or 'unknown'}"
    width, height = img.size
    if width * height > max_pixels:
        return f"image too large: {width}x{height} = {width * height} pixels > limit {max_pixels}"
    return img


def orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored), read from the header."""
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:
        return 1  # a broken EXIF block is not worth rejecting the image for


def needs_conversion(img: Image.Image, max_side: int | None) -> bool:
    """Whether :func:`normalise` would change this image (from its header alone).

    Plain RGB JPEG/PNG, upright, single-frame and within ``max_side`` is used as
    encoded: sharding keeps its bytes and scoring decodes them as training does.
    """
    return (
        (img.format or "") not in PASSTHROUGH_FORMATS
        or img.mode != "RGB"
        or orientation(img) != 1
        or bool(max_side and max(img.size) > max_side)
        or getattr(img, "n_frames", 1) != 1
    )


def normalise(img: Image.Image, max_side: int | None) -> Image.Image:
    """The one image normalisation of sharding and scoring (a loaded image in, RGB out).

    1. EXIF orientation applied (a phone photo stored sideways comes out upright);
    2. colour modes to RGB, alpha composited onto white, 16-bit scaled to 8;
    3. if the longest side is above ``max_side``: an antialiased pre-resize
       (``reduce`` by an integer factor, then bilinear; ``reducing_gap=2.0``).

    Training then decodes what sharding stored and resizes it to the model's square
    input (:func:`decode_and_resize`); scoring applies the same
    resize to these pixels, so a raw image scores like its sharded copy, up to the
    JPEG re-encoding a converted image gets in a shard.
    """
    if orientation(img) != 1:
        # A broken EXIF block: keep the pixels as stored.
        with contextlib.suppress(Exception):
            img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        img = _to_rgb(img)
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return img


def encode_converted(img: Image.Image, source_format: str, jpeg_quality: int) -> bytes:
    """How a shard stores a converted image: lossless sources as PNG (no JPEG artefacts
    added), others as JPEG at ``jpeg_quality``."""
    buf = io.BytesIO()
    if source_format in LOSSLESS_FORMATS:
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


def preparation_record(max_side: int | None, jpeg_quality: int = 90) -> dict[str, object]:
    """How images were prepared, as recorded with a dataset and the models trained on it."""
    return {
        "exif_orientation": "applied",
        "alpha": "composited onto white",
        "max_side": max_side,
        "jpeg_quality": jpeg_quality,
        "converted_images": "re-encoded: PNG from lossless sources, else JPEG at jpeg_quality",
        "pre_resize": "PIL reduce + bilinear (reducing_gap 2.0) when the longest side > max_side",
        "resize": "tf.image.resize bilinear (no antialias) to image_size x image_size (squash)",
    }


def check_image(data: bytes, settings: ImageSettings) -> Accepted | Rejected:
    """Validate and normalise one encoded image; never raises for bad input."""
    digest = hashlib.sha256(data).hexdigest()
    opened = open_header(data, settings.max_pixels)
    if isinstance(opened, str):
        return Rejected(opened, digest)
    img = opened
    width, height = img.size
    if width < 1 or height < 1:
        return Rejected(f"image has no pixels ({width}x{height})", digest)
    if img.mode not in CONVERTIBLE_MODES:
        return Rejected(f"unsupported image mode {img.mode}", digest)
    convert = needs_conversion(img, settings.max_side)
    try:
        img.load()  # full decode: catches truncated and corrupt data
    except Exception as exc:
        return Rejected(f"truncated or corrupt image data ({type(exc).__name__}: {exc})", digest)
    original_mode, fmt = img.mode, img.format or ""
    if convert:
        img = normalise(img, settings.max_side)
        encoded = encode_converted(img, fmt, settings.jpeg_quality)
    else:
        encoded = data
    return Accepted(
        image=encoded,
        sha256=digest,
        width=img.width,
        height=img.height,
        converted_from=original_mode if original_mode != "RGB" else None,
    )


def decode_and_resize(encoded: Any, size: int) -> Any:
    """Encoded JPEG/PNG/GIF/BMP bytes -> float32 RGB [size, size, 3] in 0..255.

    The image is resized to a square ("squash", as Keras' image_dataset_from_directory
    does), keeping all of the picture rather than cropping it. A TensorFlow op: the
    same pixels eagerly and inside ``tf.data``.
    """
    import tensorflow as tf

    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    image = tf.image.resize(image, [size, size], method="bilinear")
    return tf.clip_by_value(image, 0.0, 255.0)


_FUNCTIONS: dict[tuple[str, int], Any] = {}


def _tf_function(kind: str, image_size: int) -> Any:
    """Compiled decode/resize functions, once per process and size."""
    if (kind, image_size) not in _FUNCTIONS:
        import tensorflow as tf

        import xfer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

        if kind == "decode":
            fn = tf.function(
                lambda b: decode_and_resize(b, image_size),
                input_signature=[tf.TensorSpec((), tf.string)],
            )
        else:
            fn = tf.function(
                lambda x: tf.clip_by_value(
                    tf.image.resize(tf.cast(x, tf.float32), [image_size, image_size]), 0.0, 255.0
                ),
                input_signature=[tf.TensorSpec((None, None, 3), tf.uint8)],
            )
        _FUNCTIONS[(kind, image_size)] = fn
    return _FUNCTIONS[(kind, image_size)]


def image_pixels(
    data: bytes,
    image_size: int,
    max_side: int | None,
    max_pixels: int = MAX_PIXELS,
    jpeg_quality: int | None = None,
) -> Any:
    """Encoded bytes -> float32 [size, size, 3] pixels, or a reason (str) it cannot be.

    Exactly the pixels training saw for the sharded copy of the image: kept bytes are
    decoded as training decodes them; a converted image is re-encoded as its shard
    would be (``jpeg_quality`` from the model's record; lossless sources need no
    re-encoding) and decoded the same way. Without a recorded quality (older models)
    the normalised pixels are used as they are.

    The header is checked first (:func:`open_header`): empty files, non-images and
    decompression bombs are refused before any pixel is decoded.
    """
    import numpy as np

    header = open_header(data, max_pixels)
    if isinstance(header, str):
        return header
    if header.mode not in CONVERTIBLE_MODES:
        return f"unsupported image mode {header.mode}"
    try:
        if not needs_conversion(header, max_side):
            return _tf_function("decode", image_size)(data).numpy()
        fmt = header.format or ""
        header.load()
        img = normalise(header, max_side)
        if jpeg_quality and fmt not in LOSSLESS_FORMATS:
            shard_bytes = encode_converted(img, fmt, jpeg_quality)
            return _tf_function("decode", image_size)(shard_bytes).numpy()
        rgb = np.asarray(img, dtype=np.uint8)
        return _tf_function("resize", image_size)(rgb).numpy()
    except Exception as exc:
        return f"cannot decode: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
