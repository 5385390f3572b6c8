"""`xfer synth OUT`: a generated, learnable, class-per-folder image set.

    xfer synth ./data/shapes --classes circle,square,triangle --per-class 100 --size 64

Each class is a shape (or pattern) drawn with random colour, size, position and
rotation on a random textured background, plus pixel noise: learnable, but not by
looking at one pixel. Class names that are shape names get that shape; any other
name gets the next shape not otherwise used, so ``--classes cat,dog`` works too.
Output is JPEG files in ``OUT/<class>/``, locally or under an ``s3://`` prefix.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from xfer.errors import XferError
from xfer.store import s3, storage

Draw = Callable[
    [ImageDraw.ImageDraw, np.random.Generator, float, float, float, tuple[int, ...]], None
]


def _polygon(n: int, star: bool = False) -> Draw:
    def draw(
        d: ImageDraw.ImageDraw,
        rng: np.random.Generator,
        cx: float,
        cy: float,
        r: float,
        color: tuple[int, ...],
    ) -> None:
        turn = rng.uniform(0, 2 * math.pi)
        points = []
        steps = n * 2 if star else n
        for i in range(steps):
            radius = r if not star or i % 2 == 0 else r * 0.45
            a = turn + 2 * math.pi * i / steps
            points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
        d.polygon(points, fill=color)

    return draw


def _circle(
    d: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    cx: float,
    cy: float,
    r: float,
    color: tuple[int, ...],
) -> None:
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)


def _ring(
    d: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    cx: float,
    cy: float,
    r: float,
    color: tuple[int, ...],
) -> None:
    d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(2, int(r * 0.3)))


def _cross(
    d: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    cx: float,
    cy: float,
    r: float,
    color: tuple[int, ...],
) -> None:
    w = max(2, int(r * 0.35))
    d.line([cx - r, cy - r, cx + r, cy + r], fill=color, width=w)
    d.line([cx - r, cy + r, cx + r, cy - r], fill=color, width=w)


def _stripes(
    d: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    cx: float,
    cy: float,
    r: float,
    color: tuple[int, ...],
) -> None:
    w = max(2, int(r * 0.22))
    for i in range(-2, 3):
        x = cx + i * w * 2
        d.line([x, cy - r, x, cy + r], fill=color, width=w)


def _dots(
    d: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    cx: float,
    cy: float,
    r: float,
    color: tuple[int, ...],
) -> None:
    dot = max(1.5, r * 0.18)
    for i in (-1, 0, 1):
        for j in (-1, 0, 1):
            x, y = cx + i * r * 0.6, cy + j * r * 0.6
            d.ellipse([x - dot, y - dot, x + dot, y + dot], fill=color)


SHAPES: dict[str, Draw] = {
    "circle": _circle,
    "square": _polygon(4),
    "triangle": _polygon(3),
    "star": _polygon(5, star=True),
    "cross": _cross,
    "ring": _ring,
    "hexagon": _polygon(6),
    "stripes": _stripes,
    "dots": _dots,
}


def assign_shapes(classes: list[str]) -> dict[str, str]:
    """Class name -> shape name; shape names map to themselves."""
    if len(set(classes)) != len(classes):
        raise XferError(f"class names repeat: {classes}")
    if len(classes) < 2:
        raise XferError("at least two classes are needed")
    if len(classes) > len(SHAPES):
        raise XferError(
            f"at most {len(SHAPES)} classes can be generated (shapes: {', '.join(SHAPES)})"
        )
    free = [s for s in SHAPES if s not in classes]
    return {c: c if c in SHAPES else free.pop(0) for c in classes}


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    base = rng.integers(0, 256, size=3)
    gx = np.linspace(0, 1, size)[None, :, None]
    gy = np.linspace(0, 1, size)[:, None, None]
    tilt = rng.uniform(-60, 60, size=(1, 1, 3))
    img = base[None, None, :] + tilt * gx + rng.uniform(-40, 40, size=(1, 1, 3)) * gy
    img = img + rng.normal(0, 12, size=(size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _contrasting_colour(rng: np.random.Generator, background: Image.Image) -> tuple[int, int, int]:
    mean = np.asarray(background, dtype=np.float32).reshape(-1, 3).mean(0)
    for _ in range(20):
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - mean).sum() > 180:
            break
    return (int(colour[0]), int(colour[1]), int(colour[2]))


def render(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of ``shape`` with random colour, placement, scale and noise."""
    scale = 4  # draw large and downsample: smooth edges at small sizes
    big = size * scale
    img = _background(rng, size).resize((big, big), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.38) * big
    cx = rng.uniform(r, big - r)
    cy = rng.uniform(r, big - r)
    SHAPES[shape](draw, rng, cx, cy, r, _contrasting_colour(rng, img))
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.9)))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, size=(size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def synthesize(
    out: str, classes: list[str], per_class: int = 100, size: int = 64, seed: int = 0
) -> int:
    """Write ``per_class`` JPEGs per class under ``out/<class>/``; returns the count."""
    if per_class < 1:
        raise XferError("--per-class must be at least 1")
    if not 16 <= size <= 1024:
        raise XferError("--size must be between 16 and 1024 pixels")
    shapes = assign_shapes(classes)
    s3.ensure_bucket(out)
    from tqdm import tqdm

    count = 0
    with tqdm(total=per_class * len(classes), desc="synth", unit="img", disable=None) as bar:
        for ci, cls in enumerate(classes):
            rng = np.random.default_rng([seed, ci])
            for i in range(per_class):
                buf = io.BytesIO()
                render(shapes[cls], size, rng).save(buf, format="JPEG", quality=92)
                storage.write_bytes(
                    storage.join(out, cls, f"{cls}_{i:05d}.jpg"), buf.getvalue(), "image/jpeg"
                )
                count += 1
                bar.update()
    return count
