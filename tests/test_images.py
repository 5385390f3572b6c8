"""Image preparation (:mod:`xfer.data.images`), directly, on real images made here by PIL.

The header's refusals, the normalisation sharding stores (EXIF orientation, alpha,
CMYK, palette, the pre-resize) and the pixels each path gives: training's decode of
what a shard stores equals scoring's pixels of the raw image. No Ray, no S3.
(tests/test_image.py is about the Docker image, not this.)
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from xfer.data.images import (
    MAX_PIXELS,
    Accepted,
    ImageSettings,
    Rejected,
    check_image,
    decode_and_resize,
    image_pixels,
)

SIZE = 32


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def halves(width: int = 40, height: int = 20) -> Image.Image:
    """Red left half, blue right half."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    arr[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` pixels, with almost no data."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def accepted(data: bytes, **settings: object) -> Accepted:
    result = check_image(data, ImageSettings(**settings))  # type: ignore[arg-type]
    assert isinstance(result, Accepted), result
    return result


# ------------------------------------------------------------------ the header


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty file (0 bytes)"),
        (b"this is a text file, not a picture\n" * 10, "not an image"),
        (png_header_only(10_000, 10_000), "image too large: 10000x10000 = 100000000 pixels"),
    ],
    ids=["empty", "not-an-image", "bomb"],
)
def test_the_header_refuses_before_decoding_in_sharding_and_scoring(data, fragment):
    result = check_image(data, ImageSettings())
    assert isinstance(result, Rejected) and fragment in result.reason, result
    # Scoring's path refuses the same file, from the same header check.
    reason = image_pixels(data, SIZE, max_side=None)
    assert isinstance(reason, str) and fragment in reason, reason


def test_the_pixel_limit_is_one_number_and_applies_from_the_header():
    from xfer.config import ShardConfig
    from xfer.scoring import score

    assert MAX_PIXELS == ImageSettings().max_pixels == ShardConfig().max_pixels
    assert score.MAX_PIXELS is MAX_PIXELS
    data = encode(halves(40, 20), "PNG")  # 800 pixels
    assert isinstance(check_image(data, ImageSettings(max_pixels=800)), Accepted)
    refused = check_image(data, ImageSettings(max_pixels=799))
    assert isinstance(refused, Rejected) and "800 pixels > limit 799" in refused.reason
    assert "> limit 799" in image_pixels(data, SIZE, None, max_pixels=799)


def test_a_truncated_image_is_refused_by_the_full_decode():
    data = encode(halves(200, 100), "JPEG", quality=95)
    result = check_image(data[: len(data) // 2], ImageSettings())
    assert isinstance(result, Rejected) and "truncated or corrupt" in result.reason


# ------------------------------------------------------------ normalisation


def test_a_plain_rgb_jpeg_is_kept_byte_for_byte():
    data = encode(halves(), "JPEG", quality=90)
    result = accepted(data, max_side=40)
    assert result.image == data and result.converted_from is None
    assert (result.width, result.height) == (40, 20)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: shown rotated 90 degrees clockwise
    data = encode(halves(40, 20), "JPEG", quality=95, exif=exif.tobytes())
    result = accepted(data)
    assert (result.width, result.height) == (20, 40)  # upright: portrait
    assert result.image != data
    pixels = decoded(result.image)
    top, bottom = pixels[:15].mean(axis=(0, 1)), pixels[-15:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60  # the red left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_alpha_is_composited_onto_white_and_stored_losslessly():
    arr = np.zeros((20, 40, 4), np.uint8)
    arr[:, :20] = (255, 0, 0, 0)  # fully transparent red: white once composited
    arr[:, 20:] = (0, 0, 255, 255)  # opaque blue
    result = accepted(encode(Image.fromarray(arr, "RGBA"), "PNG"))
    assert result.converted_from == "RGBA"
    stored = Image.open(io.BytesIO(result.image))
    assert stored.format == "PNG" and stored.mode == "RGB"
    pixels = decoded(result.image)
    assert (pixels[:, :20] == 255).all()
    assert (pixels[:, 20:] == (0, 0, 255)).all()


def test_cmyk_becomes_rgb_jpeg():
    cmyk = Image.new("CMYK", (40, 20), (0, 255, 255, 0))  # red in CMYK
    result = accepted(encode(cmyk, "JPEG", quality=95), jpeg_quality=90)
    assert result.converted_from == "CMYK"
    stored = Image.open(io.BytesIO(result.image))
    assert stored.format == "JPEG" and stored.mode == "RGB"
    r, g, b = decoded(result.image).mean(axis=(0, 1))
    assert r > 200 and g < 60 and b < 60


def test_palette_images_become_rgb_with_transparency_on_white():
    pal = halves().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    result = accepted(encode(pal, "PNG"))
    assert result.converted_from == "P"
    assert np.abs(decoded(result.image) - np.asarray(halves(), np.int16)).max() <= 1
    index_of_red = pal.getpixel((0, 0))
    see_through = accepted(encode(pal, "PNG", transparency=index_of_red))
    pixels = decoded(see_through.image)
    assert (pixels[:, :20] == 255).all() and (pixels[:, 20:] == (0, 0, 255)).all()


def test_images_above_max_side_are_pre_resized_and_others_are_not():
    data = encode(halves(300, 150), "JPEG", quality=95)
    result = accepted(data, max_side=100)
    assert (result.width, result.height) == (100, 50)
    assert Image.open(io.BytesIO(result.image)).size == (100, 50)
    assert result.converted_from is None  # RGB all along: resized, not converted
    kept = accepted(data, max_side=300)
    assert kept.image == data and (kept.width, kept.height) == (300, 150)


# --------------------------------------------------- training's pixels, scoring's


def test_training_decode_equals_scoring_pixels_for_a_plain_jpeg():
    import tensorflow as tf

    data = encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)), "JPEG"
    )
    stored = accepted(data, max_side=64).image  # kept as it is
    training = decode_and_resize(tf.constant(stored), SIZE).numpy()
    scoring = image_pixels(data, SIZE, max_side=64, jpeg_quality=90)
    assert training.shape == (SIZE, SIZE, 3) and training.dtype == np.float32
    np.testing.assert_array_equal(training, scoring)
    # The same op inside tf.data gives the same pixels.
    mapped = tf.data.Dataset.from_tensors(stored).map(lambda b: decode_and_resize(b, SIZE))
    np.testing.assert_array_equal(next(iter(mapped)).numpy(), training)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_converted_image_scores_as_its_shard_copy_trains(fmt):
    """Pre-resized (JPEG: re-encoded at the recorded quality; PNG: lossless), the raw
    image's scoring pixels are exactly the decode of what its shard stores."""
    import tensorflow as tf

    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 256, (120, 160, 3), np.uint8)), fmt)
    stored = accepted(data, max_side=80, jpeg_quality=85).image
    training = decode_and_resize(tf.constant(stored), SIZE).numpy()
    scoring = image_pixels(data, SIZE, max_side=80, jpeg_quality=85)
    np.testing.assert_array_equal(training, scoring)
