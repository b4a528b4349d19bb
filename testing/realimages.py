"""Real-world-looking images made from real Fashion-MNIST test crops, in many encodings.

Fashion-MNIST was made from product photos (dark garment on white, trimmed, resized, negated
to light-on-black). ``product_photo`` undoes that: it enlarges a crop, negates it back to a
dark garment on a light background, tints it and places it off-centre with margins on a
larger non-square canvas. Each ``ENCODINGS`` entry turns one 28x28 crop into the bytes a
client would post. Used by tests/test_service_images.py and benchmarks/real_images.py.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from testing.images import encode

# (R, G, B) tints for the garment, chosen by index so every encoding sees a mix of colours.
_TINTS = ((40, 40, 40), (20, 40, 110), (110, 30, 30), (30, 80, 40), (90, 70, 40))


def _index_of(pixels: np.ndarray) -> int:
    return int(pixels.sum()) % len(_TINTS)


def plain(pixels: np.ndarray) -> Image.Image:
    """The original 28x28 light-on-black grayscale crop."""
    return Image.fromarray(pixels, mode="L")


def _garment_mask(pixels: np.ndarray, size: int) -> Image.Image:
    """The crop enlarged to ``size`` pixels on its long edge: coverage 0 (background) .. 255 (garment)."""
    return plain(pixels).resize((size, size), Image.Resampling.BICUBIC)


def _canvas_box(size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """A larger portrait canvas with uneven margins (the garment is not centred)."""
    return (size + 64, size + 120), (40, 70)


def product_photo(pixels: np.ndarray, size: int = 168) -> Image.Image:
    """A dark, tinted garment on an off-white background, RGB, larger than 28x28, with margins."""
    coverage = np.asarray(_garment_mask(pixels, size), dtype=np.float32)[..., None] / 255.0
    tint = np.array(_TINTS[_index_of(pixels)], dtype=np.float32)
    background = np.array((246, 245, 242), dtype=np.float32)
    garment = background * (1 - coverage) + tint * coverage
    canvas_size, offset = _canvas_box(size)
    canvas = Image.new("RGB", canvas_size, tuple(int(v) for v in background))
    canvas.paste(Image.fromarray(garment.round().astype(np.uint8), "RGB"), offset)
    return canvas


def cutout(pixels: np.ndarray, size: int = 168) -> Image.Image:
    """A transparent RGBA cut-out: the garment's colour with its coverage as alpha, nothing behind."""
    coverage = _garment_mask(pixels, size)
    canvas_size, offset = _canvas_box(size)
    rgba = Image.new("RGBA", canvas_size, (0, 0, 0, 0))
    layer = Image.new("RGBA", (size, size), (*_TINTS[_index_of(pixels)], 255))
    layer.putalpha(coverage)
    rgba.paste(layer, offset)
    return rgba


def light_on_dark_large(pixels: np.ndarray, size: int = 140) -> Image.Image:
    """Fashion-MNIST's own look, but enlarged with black margins (must not be inverted)."""
    canvas = Image.new("L", (size + 50, size + 30), 0)
    canvas.paste(_garment_mask(pixels, size), (30, 10))
    return canvas


def _sixteen_bit(pixels: np.ndarray) -> bytes:
    gray = np.asarray(product_photo(pixels).convert("L"), dtype=np.uint16) * 257
    return encode(Image.fromarray(gray), "PNG")


def _exif_rotated(pixels: np.ndarray) -> bytes:
    """Stored sideways, with EXIF orientation 6 ("rotate 90 clockwise to view") as cameras write it."""
    photo = product_photo(pixels)
    stored = photo.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise; the viewer turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=90, exif=exif.tobytes())


def _gif_animated(pixels: np.ndarray) -> bytes:
    """Two frames; only the first is the garment (the service takes the first frame)."""
    first = product_photo(pixels).convert("P", palette=Image.Palette.ADAPTIVE)
    second = Image.new("P", first.size, 0)
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100)


ENCODINGS: dict[str, Callable[[np.ndarray], bytes]] = {
    "plain PNG 28x28": lambda p: encode(plain(p), "PNG"),
    "product photo PNG (RGB)": lambda p: encode(product_photo(p), "PNG"),
    "light-on-dark large PNG": lambda p: encode(light_on_dark_large(p), "PNG"),
    "JPEG q85": lambda p: encode(product_photo(p), "JPEG", quality=85),
    "RGBA cut-out PNG": lambda p: encode(cutout(p), "PNG"),
    "palette PNG": lambda p: encode(product_photo(p).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
    "16-bit grayscale PNG": _sixteen_bit,
    "CMYK JPEG": lambda p: encode(product_photo(p).convert("CMYK"), "JPEG", quality=90),
    "WebP (lossy)": lambda p: encode(product_photo(p), "WEBP", quality=80),
    "GIF (animated, first frame)": _gif_animated,
    "BMP": lambda p: encode(product_photo(p), "BMP"),
    "EXIF-rotated JPEG": _exif_rotated,
    "TIFF": lambda p: encode(product_photo(p), "TIFF"),
}
