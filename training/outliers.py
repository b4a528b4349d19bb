"""Generated non-garments for outlier exposure: what the not-a-garment detector learns to reject.

Six families, drawn in turn: rendered glyphs (letters and digits in the installed fonts, or
Pillow's own), pen scribbles, noise, stripes and checkerboards, outlined shapes, and soft blobs
or gradients; random sizes, colours, rotation and blur. Each image goes through the service's
own preprocessing (fashion.contract.to_fashion_mnist), so the detector sees what the model would
see. Real photos and real handwriting are deliberately absent: the evaluation sets
(testing/ood.py) are made of those, so the detector is judged on kinds of input it never saw.
"""

from __future__ import annotations

import glob

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from fashion.contract import to_fashion_mnist

_GLYPHS = [chr(c) for c in [*range(48, 58), *range(65, 91), *range(97, 123)]]
_FONT_FILES = sorted(glob.glob("/usr/share/fonts/truetype/*/*.ttf"))


def _font(rng: np.random.Generator, size: int) -> ImageFont.ImageFont:
    if _FONT_FILES:
        return ImageFont.truetype(_FONT_FILES[int(rng.integers(len(_FONT_FILES)))], size)
    return ImageFont.load_default(size)  # Pillow's built-in scalable font: no system fonts needed


def _colours(rng: np.random.Generator) -> tuple[int, int]:
    """(background, ink): mostly black on white or white on black, sometimes grey on grey."""
    background = int(rng.integers(0, 256)) if rng.random() < 0.3 else (255 if rng.random() < 0.6 else 0)
    ink = 255 - background if abs(255 - 2 * background) > 60 else (0 if background > 127 else 255)
    return background, ink


def _glyphs(rng, w, h, background, ink) -> Image.Image:
    image = Image.new("L", (w, h), background)
    size = min(w, h)
    text = "".join(rng.choice(_GLYPHS, int(rng.integers(1, 4))))
    stroke = int(rng.integers(0, max(1, size // 25)))
    ImageDraw.Draw(image).text(
        (int(w * 0.1), int(h * 0.05)),
        text,
        font=_font(rng, max(8, int(size * rng.uniform(0.4, 0.9)))),
        fill=ink,
        stroke_width=stroke,
        stroke_fill=ink,
    )
    return image.rotate(float(rng.uniform(-25, 25)), fillcolor=background)


def _scribble(rng, w, h, background, ink) -> Image.Image:
    image = Image.new("L", (w, h), background)
    points = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(int(rng.integers(3, 9)))]
    ImageDraw.Draw(image).line(points, fill=ink, width=int(rng.integers(1, max(2, min(w, h) // 8))), joint="curve")
    return image


def _noise(rng, w, h, background, ink) -> Image.Image:
    shape = (h, w, 3) if rng.random() < 0.3 else (h, w)  # colour noise turns grey differently
    kind = rng.random()
    if kind < 0.4:
        values = rng.integers(0, 256, shape)
    elif kind < 0.8:
        values = np.clip(rng.normal(rng.uniform(60, 200), rng.uniform(10, 80), shape), 0, 255)
    else:  # salt and pepper on a plain page
        values = np.full(shape, background)
        dots = rng.random(shape[:2]) < rng.uniform(0.01, 0.3)
        values[dots] = ink
    return Image.fromarray(values.astype(np.uint8))


def _texture(rng, w, h, background, ink) -> Image.Image:
    y, x = np.mgrid[:h, :w]
    period = int(rng.integers(2, 20))
    kind = int(rng.integers(4))
    if kind == 0:  # stripes at any angle
        angle = rng.uniform(0, np.pi)
        pattern = ((np.cos(angle) * x + np.sin(angle) * y) // period) % 2
    elif kind == 1:  # checkerboard
        pattern = (x // period + y // period) % 2
    elif kind == 2:  # rings around a random centre
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        pattern = (np.hypot(x - cx, y - cy) // period) % 2
    else:  # grid lines
        width = max(1, period // 4)
        pattern = ((x % period) < width) | ((y % period) < width)
    return Image.fromarray(np.where(pattern, ink, background).astype(np.uint8))


def _shapes(rng, w, h, background, ink) -> Image.Image:
    image = Image.new("L", (w, h), background)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        width, height = rng.uniform(w * 0.05, w * 0.6), rng.uniform(h * 0.05, h * 0.6)
        fill = int(rng.integers(0, 256)) if rng.random() < 0.5 else None
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + width, y0 + height], fill=fill, outline=ink, width=int(rng.integers(1, 4)))
    return image


def _blobs(rng, w, h, background, ink) -> Image.Image:
    y, x = np.mgrid[:h, :w]
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    if rng.random() < 0.3:  # linear or radial gradient
        field = (x if rng.random() < 0.5 else y).astype(float) if rng.random() < 0.5 else np.hypot(x - cx, y - cy)
        field = field / max(field.max(), 1e-9) * 255
    else:
        field = np.zeros((h, w))
        for _ in range(int(rng.integers(1, 6))):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            radius = rng.uniform(min(w, h) * 0.03, min(w, h) * 0.3)
            field += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius * radius))
        field = field / field.max() * 255
    return Image.fromarray(field.astype(np.uint8))


FAMILIES = (_glyphs, _scribble, _noise, _texture, _shapes, _blobs)


def generate_outliers(count: int, seed: int) -> torch.Tensor:
    """``count`` generated non-garments as the model sees them: uint8 [count, 28, 28], the same for a seed."""
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        # Any aspect ratio: a tall strip of texture, trimmed and centred, is shaped like a trouser leg.
        w, h = (int(v) for v in rng.integers(28, 200, 2))
        if rng.random() < 0.4:
            ratio = rng.uniform(0.15, 0.5)
            if rng.random() < 0.5:
                h = max(28, int(w * ratio))  # wide
            else:
                w = max(28, int(h * ratio))  # tall
        background, ink = _colours(rng)
        image = FAMILIES[i % len(FAMILIES)](rng, w, h, background, ink)
        if rng.random() < 0.3:
            image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 3))))
        crops.append(np.asarray(to_fashion_mnist(image)))
    return torch.from_numpy(np.stack(crops))
