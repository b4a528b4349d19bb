"""Out-of-distribution (non-garment) evaluation sets for the "uncertain / not_a_garment" detector (issue 11).

Every input is real or generated here, from data that ships in packages: scikit-image's bundled photos
(``skimage.data``, only the files in the wheel, never a pooch download), scikit-learn's sample photos and
its 1,797 handwritten digits, the installed DejaVu fonts and Pillow's own font. Nothing comes from the
Fashion-MNIST test set, and nothing is downloaded or cached.

Each original image is encoded as a client would post it (PNG or JPEG bytes, various sizes, modes and
polarities), then decoded and preprocessed exactly as the service does it: ``fashion.images.decode_image``
then ``fashion.contract.to_fashion_mnist`` (what ``service.web._general_rows`` runs; its fast path for
plain 28x28 PNGs gives the same bytes, and tests/test_ood_sets.py compares with ``service.web.to_inputs``).
So ``OodSet.pixels`` is the 28x28 light-on-black crop the model would see for that upload.

    sets = ood_sets(seed=0)                  # {name: OodSet(name, description, pixels uint8 [N, 28, 28])}
    blobs = ood_samples(seed=0, per_set=4)   # {name: [the encoded bytes of its first 4 inputs]}

``ood_samples(seed)[name][i]`` is the upload whose crop is ``ood_sets(seed)[name].pixels[i]``.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fashion.contract import INPUT_HEIGHT, INPUT_WIDTH, to_fashion_mnist
from fashion.images import decode_image
from testing.images import encode

# skimage.data loaders whose files ship inside the scikit-image wheel (no pooch download): real photos and
# micrographs. colorwheel, logo, the phantom and the chessboard are drawings, not photos, and are left out.
SKIMAGE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
_WORDS = ("OK", "no", "cat", "Hi!", "SALE", "42", "x+y", "dog", "STOP", "abc", "2024", "Zz", "tag", "&", "?!")


@dataclass(frozen=True)
class OodSet:
    """One out-of-distribution set: what it is, and the crops the service would feed the model."""

    name: str
    description: str
    pixels: torch.Tensor  # uint8 [N, 28, 28], light on black, as preprocessing leaves it

    def __len__(self) -> int:
        return len(self.pixels)


# --------------------------------------------------------------------------- the service's preprocessing


def service_crop(blob: bytes) -> bytes:
    """Uploaded image bytes -> the 784 pixels the service feeds the model (invert="auto", its default)."""
    return to_fashion_mnist(decode_image(blob), "auto").tobytes()


def _crops(blobs: list[bytes]) -> torch.Tensor:
    rows = b"".join(service_crop(blob) for blob in blobs)
    return torch.frombuffer(bytearray(rows), dtype=torch.uint8).reshape(len(blobs), INPUT_HEIGHT, INPUT_WIDTH)


def _encode(image: Image.Image, rng: np.random.Generator, jpeg_share: float = 0.3) -> bytes:
    """PNG, or (with probability ``jpeg_share``) JPEG at a random quality, as a client might send it."""
    if rng.random() < jpeg_share:
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        return encode(image, "JPEG", quality=int(rng.integers(70, 96)))
    return encode(image, "PNG", compress_level=1)  # fast; the level does not change the pixels


# --------------------------------------------------------------------------- photos


@cache
def _scenes() -> tuple[tuple[str, np.ndarray], ...]:
    """The bundled photos as uint8 arrays (gray [H, W] or RGB [H, W, 3]); read from the installed wheels."""
    from skimage import data  # test-only dependency

    scenes = []
    for name in SKIMAGE_PHOTOS:
        image = np.asarray(getattr(data, name)())
        if image.dtype == bool:  # the horse silhouette
            image = np.where(image, 0, 255).astype(np.uint8)
        scenes.append((name, image.astype(np.uint8)))
    scenes.append(("motorcycle", np.asarray(data.stereo_motorcycle()[0], dtype=np.uint8)))
    try:
        from sklearn.datasets import load_sample_images

        for filename, image in zip(("china", "flower"), load_sample_images().images, strict=True):
            scenes.append((filename, np.asarray(image, dtype=np.uint8)))
    except ImportError:  # scikit-learn is optional here
        pass
    return tuple(scenes)


def _photos(rng: np.random.Generator) -> list[bytes]:
    blobs = []
    scenes = _scenes()
    # Each whole scene, as PNG and as JPEG.
    for _, array in scenes:
        image = Image.fromarray(array)
        blobs.append(encode(image, "PNG", compress_level=1))
        blobs.append(encode(image.convert("RGB") if image.mode not in ("L", "RGB") else image, "JPEG", quality=90))
    # Faces: scikit-image's 100 LFW face crops (25x25 gray), enlarged as a camera would have taken them.
    from skimage import data

    faces = np.asarray(data.lfw_subset()[:100] * 255, dtype=np.float64).round().clip(0, 255).astype(np.uint8)
    for face in faces:
        edge = int(rng.integers(48, 200))
        blobs.append(_encode(Image.fromarray(face).resize((edge, edge), Image.Resampling.BICUBIC), rng))
    # Random crops of the scenes: parts of other things, at many sizes and aspect ratios.
    for _ in range(480):
        _, array = scenes[int(rng.integers(len(scenes)))]
        height, width = array.shape[:2]
        crop_h = int(rng.integers(min(32, height), height + 1))
        crop_w = int(np.clip(crop_h * rng.uniform(0.5, 2.0), min(32, width), width))
        top, left = int(rng.integers(height - crop_h + 1)), int(rng.integers(width - crop_w + 1))
        image = Image.fromarray(array[top : top + crop_h, left : left + crop_w])
        if rng.random() < 0.3:  # sometimes downscaled, as a thumbnail would be
            scale = rng.uniform(0.2, 0.8)
            image = image.resize((max(8, round(crop_w * scale)), max(8, round(crop_h * scale))))
        if rng.random() < 0.2 and image.mode == "RGB":
            image = image.convert("L")
        blobs.append(_encode(image, rng, jpeg_share=0.5))
    return blobs


# --------------------------------------------------------------------------- digits


def _digits(rng: np.random.Generator, count: int = 1000) -> list[bytes]:
    """scikit-learn's handwritten digits (8x8, 0..16), enlarged smoothly onto canvases of many kinds."""
    from sklearn.datasets import load_digits  # test-only dependency

    images = load_digits().images
    chosen = rng.choice(len(images), size=count, replace=False)
    blobs = []
    for index in chosen:
        ink = (images[index] * (255 / 16)).round().astype(np.uint8)  # light digit, dark background
        edge = int(rng.integers(24, 160))
        resample = Image.Resampling.BICUBIC if rng.random() < 0.8 else Image.Resampling.NEAREST
        digit = Image.fromarray(ink).resize((edge, edge), resample)
        margin_x, margin_y = (int(v) for v in rng.integers(0, edge // 2 + 1, size=2))
        canvas_size = (
            edge + margin_x + int(rng.integers(0, edge // 2 + 1)),
            edge + margin_y + int(rng.integers(0, edge // 2 + 1)),
        )
        style = rng.random()
        if style < 0.45:  # dark ink on white paper, as scanned or photographed
            paper = int(rng.integers(200, 256))
            canvas = Image.new("L", canvas_size, paper)
            canvas.paste(0, (margin_x, margin_y), digit)  # digit coverage as the mask: black ink
        elif style < 0.75:  # light on black, MNIST's own look
            canvas = Image.new("L", canvas_size, int(rng.integers(0, 40)))
            canvas.paste(255, (margin_x, margin_y), digit)
        else:  # coloured ink on tinted paper, RGB
            paper = tuple(int(v) for v in rng.integers(180, 256, size=3))
            ink_colour = tuple(int(v) for v in rng.integers(0, 120, size=3))
            canvas = Image.new("RGB", canvas_size, paper)
            canvas.paste(ink_colour, (margin_x, margin_y), digit)
        blobs.append(_encode(canvas, rng))
    return blobs


# --------------------------------------------------------------------------- characters


@cache
def _font_files() -> tuple[Path, ...]:
    return tuple(sorted(FONT_DIR.glob("*.ttf"))) if FONT_DIR.is_dir() else ()


def _font(rng: np.random.Generator, size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    files = _font_files()
    if files and rng.random() < 0.85:
        return ImageFont.truetype(str(files[int(rng.integers(len(files)))]), size)
    return ImageFont.load_default(size)  # Pillow's bundled font (a bitmap font where FreeType is missing)


def _text(rng: np.random.Generator) -> str:
    kind = rng.random()
    if kind < 0.4:
        return str(rng.choice(list(string.ascii_letters)))
    if kind < 0.65:
        return str(rng.choice(list(string.digits)))
    if kind < 0.75:
        return str(rng.choice(list("#@%&?!$*+=")))
    return str(rng.choice(_WORDS))


def _characters(rng: np.random.Generator, count: int = 600) -> list[bytes]:
    blobs = []
    for _ in range(count):
        text, size = _text(rng), int(rng.integers(14, 120))
        font = _font(rng, size)
        light_ink = rng.random() < 0.4
        ink, paper = (255, int(rng.integers(0, 60))) if light_ink else (0, int(rng.integers(190, 256)))
        # The text on its own transparent layer, rotated, then placed on a larger canvas.
        left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
        layer = Image.new("L", (max(1, right - left) + 4, max(1, bottom - top) + 4), 0)
        ImageDraw.Draw(layer).text((2 - left, 2 - top), text, fill=255, font=font)
        layer = layer.rotate(float(rng.uniform(-35, 35)), resample=Image.Resampling.BICUBIC, expand=True)
        width, height = layer.size
        canvas_size = (width + int(rng.integers(0, 2 * width + 8)), height + int(rng.integers(0, 2 * height + 8)))
        offset = (int(rng.integers(0, canvas_size[0] - width + 1)), int(rng.integers(0, canvas_size[1] - height + 1)))
        if rng.random() < 0.3:  # coloured text, RGB
            canvas = Image.new("RGB", canvas_size, tuple(int(v) for v in rng.integers(0, 256, size=3)))
            canvas.paste(tuple(int(v) for v in rng.integers(0, 256, size=3)), offset, layer)
        else:
            canvas = Image.new("L", canvas_size, paper)
            canvas.paste(ink, offset, layer)
        blobs.append(_encode(canvas, rng))
    return blobs


# --------------------------------------------------------------------------- noise, blank, textures


def _size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width): the model's own 28x28 a quarter of the time, else anything up to 320 pixels."""
    if rng.random() < 0.25:
        return INPUT_HEIGHT, INPUT_WIDTH
    return int(rng.integers(16, 321)), int(rng.integers(16, 321))


def _noise(rng: np.random.Generator, count: int = 400) -> list[bytes]:
    blobs = []
    for i in range(count):
        shape = _size(rng)
        if rng.random() < 0.3:
            shape = (*shape, 3)  # colour noise
        kind = i % 3
        if kind == 0:  # uniform, over the whole range or a band of it
            low = int(rng.integers(0, 200))
            array = rng.integers(low, int(rng.integers(low + 20, 257)), size=shape)
        elif kind == 1:  # Gaussian around a random level
            array = rng.normal(rng.uniform(30, 225), rng.uniform(5, 90), size=shape)
        else:  # salt and pepper on a constant background
            array = np.full(shape, float(rng.integers(0, 256)))
            density = rng.uniform(0.005, 0.5)
            hits = rng.random(shape[:2]) < density
            values = np.where(rng.random(int(hits.sum())) < 0.5, 0.0, 255.0)
            array[hits] = values[:, None] if array.ndim == 3 else values
        image = Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))
        blobs.append(_encode(image, rng, jpeg_share=0.2))
    return blobs


def _blank(rng: np.random.Generator) -> list[bytes]:
    blobs = []
    sizes = ((28, 28), (64, 64), (200, 300), (640, 480))
    # Constant images: every 8th gray level (and pure white/black) at each size, some as RGB.
    for level in (*range(0, 256, 8), 255):
        for width, height in sizes:
            mode = "RGB" if rng.random() < 0.25 else "L"
            image = Image.new(mode, (width, height), (level,) * 3 if mode == "RGB" else level)
            blobs.append(_encode(image, rng, jpeg_share=0.15))
    # Fully transparent PNGs (composited onto white by preprocessing).
    for width, height in sizes:
        blobs.append(encode(Image.new("RGBA", (width, height), (0, 0, 0, 0)), "PNG"))
    # Near-blank: a few dots or a tiny speck on a white, black or gray page.
    for _ in range(120):
        height, width = _size(rng)
        background = int(rng.choice([0, 255, int(rng.integers(0, 256))]))
        array = np.full((height, width), background, dtype=np.uint8)
        for _ in range(int(rng.integers(1, 6))):
            y, x = int(rng.integers(height)), int(rng.integers(width))
            radius = int(rng.integers(0, 3))
            array[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1] = 255 - background
        blobs.append(_encode(Image.fromarray(array), rng, jpeg_share=0.15))
    return blobs


def _texture(rng: np.random.Generator, kind: int, height: int, width: int) -> np.ndarray:
    """One generated pattern in [0, 1], [height, width]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    along = x * np.cos(angle) + y * np.sin(angle)
    period = rng.uniform(3, max(4.0, min(height, width) / 2))
    if kind == 0:  # stripes, hard or sinusoidal
        phase = (along / period) % 1.0
        return (
            (phase < rng.uniform(0.2, 0.8)).astype(float)
            if rng.random() < 0.5
            else 0.5 + 0.5 * np.sin(2 * np.pi * along / period)
        )
    if kind == 1:  # checkerboard, maybe rotated
        across = -x * np.sin(angle) + y * np.cos(angle)
        return ((np.floor(along / period) + np.floor(across / period)) % 2).astype(float)
    if kind == 2:  # linear or radial gradient
        if rng.random() < 0.5:
            span = along.max() - along.min()
            return (along - along.min()) / (span or 1.0)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        distance = np.hypot(y - cy, x - cx)
        return distance / (distance.max() or 1.0)
    if kind == 3:  # concentric rings, or one filled circle / ring
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        distance = np.hypot(y - cy, x - cx)
        if rng.random() < 0.5:
            return ((distance / period) % 1.0 < 0.5).astype(float)
        outer = rng.uniform(0.15, 0.5) * min(height, width)
        inner = outer * rng.choice([0.0, rng.uniform(0.4, 0.9)])
        return ((distance <= outer) & (distance >= inner)).astype(float)
    # kind 4: a grid of lines
    thickness = max(1, int(period * rng.uniform(0.08, 0.3)))
    return (((x % period) < thickness) | ((y % period) < thickness)).astype(float)


def _textures(rng: np.random.Generator, count: int = 500) -> list[bytes]:
    blobs = []
    for i in range(count):
        height, width = _size(rng)
        pattern = _texture(rng, i % 5, height, width)
        low, high = sorted(rng.integers(0, 256, size=2))
        if high - low < 60:
            low, high = 0, 255
        if rng.random() < 0.3:  # two colours instead of two grays
            a, b = rng.integers(0, 256, size=(2, 3))
            array = a[None, None] + (b - a)[None, None] * pattern[..., None]
        else:
            array = low + (high - low) * pattern
        if rng.random() < 0.5:
            array = 255 - array
        image = Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))
        blobs.append(_encode(image, rng, jpeg_share=0.2))
    return blobs


# --------------------------------------------------------------------------- the sets

_BUILDERS: dict[str, tuple[str, Callable[[np.random.Generator], list[bytes]]]] = {
    "photos": (
        "real photos bundled with scikit-image/scikit-learn (whole scenes, LFW faces, random crops), PNG/JPEG",
        _photos,
    ),
    "digits": ("scikit-learn's 8x8 handwritten digits, enlarged onto paper-like or dark canvases", _digits),
    "characters": ("letters, digits, symbols and short words in DejaVu/Pillow fonts, rotated and placed", _characters),
    "noise": ("uniform, Gaussian and salt-and-pepper noise, gray and colour, 28x28 to 320x320", _noise),
    "blank": ("constant images at many gray levels and sizes, transparent PNGs, and a few dots on a page", _blank),
    "textures": ("generated stripes, checkerboards, gradients, circles/rings and grids", _textures),
}
OOD_SET_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def _blobs(name: str, seed: int) -> list[bytes]:
    index = OOD_SET_NAMES.index(name)
    return _BUILDERS[name][1](np.random.default_rng([seed, index]))


def ood_sets(seed: int = 0, names: Iterable[str] | None = None) -> dict[str, OodSet]:
    """The out-of-distribution sets (all of OOD_SET_NAMES, or ``names``), deterministic for ``seed``."""
    result = {}
    for name in OOD_SET_NAMES if names is None else names:
        if name not in _BUILDERS:
            raise KeyError(f"unknown OOD set {name!r} (expected one of {OOD_SET_NAMES})")
        result[name] = OodSet(name, _BUILDERS[name][0], _crops(_blobs(name, seed)))
    return result


def ood_samples(seed: int = 0, per_set: int = 4, names: Iterable[str] | None = None) -> dict[str, list[bytes]]:
    """The original encoded bytes (as a client would POST them) of the first ``per_set`` inputs of each set.

    ``ood_samples(seed)[name][i]`` preprocesses to ``ood_sets(seed)[name].pixels[i]``; for a server test.
    """
    return {name: _blobs(name, seed)[:per_set] for name in (OOD_SET_NAMES if names is None else names)}
