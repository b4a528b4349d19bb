"""Image bytes for tests and benchmarks: the one PNG (or other format) builder."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    """A Pillow image -> the bytes of a file in ``fmt`` (PNG, JPEG, ...)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png(pixels: np.ndarray | int, size: tuple[int, int] = (28, 28)) -> bytes:
    """uint8 grayscale pixels (or one value filling ``size``, width x height) -> PNG file bytes."""
    if isinstance(pixels, int):
        pixels = np.full(size[::-1], pixels, dtype=np.uint8)
    return encode(Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="L"))
