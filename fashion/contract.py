"""The single source of truth that training and serving share.

Class names, input geometry, normalization, the model architecture and the preprocessing of
one image are defined here and nowhere else, so a served model cannot drift from the way it
was trained (the classic training/serving skew). Both ``training`` and ``service`` import
this module; the model card records these values and the loader refuses a card that
disagrees with them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from fashion.images import ImageError

log = logging.getLogger(__name__)

# Fashion-MNIST's label order: index i of the model's output is CLASS_NAMES[i].
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)

INPUT_CHANNELS, INPUT_HEIGHT, INPUT_WIDTH = 1, 28, 28
INPUT_SHAPE = (INPUT_CHANNELS, INPUT_HEIGHT, INPUT_WIDTH)

# Pixel mean and standard deviation over the 60,000 training images, scaled to [0, 1]
# (tests/test_contract.py recomputes them from the real data).
MEAN = 0.2860405969887955
STD = 0.3530242483182949


def normalize(tensor: torch.Tensor) -> torch.Tensor:
    """(x - MEAN) / STD: torchvision.transforms.v2.Normalize((MEAN,), (STD,))'s arithmetic, op for op.

    Written out so that importing the contract does not import torchvision: the service never
    needs it, and it costs a worker about 90 MB and 0.4 s at start. FEATURE_TRANSFORM is the
    torchvision pipeline itself; tests check that both give the same bits.
    """
    mean = torch.as_tensor((MEAN,), dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std = torch.as_tensor((STD,), dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    return tensor.sub(mean).div_(std)


InvertMode = Literal["auto", "true", "false"]
INVERT_MODES: tuple[str, ...] = ("auto", "true", "false")


def contract_summary() -> dict:
    """What a model card must agree with before its weights may be served."""
    return {
        "classes": list(CLASS_NAMES),
        "input": {"channels": INPUT_CHANNELS, "height": INPUT_HEIGHT, "width": INPUT_WIDTH},
        "normalization": {"mean": MEAN, "std": STD},
    }


# --------------------------------------------------------------------------- architecture


ARCHITECTURES: tuple[str, ...] = ("mlp", "cnn")
# What a card that names no widths was trained with: the default of the project's first models.
FIRST_DEFAULT_HIDDEN_SIZES: tuple[int, ...] = (512, 512)


@dataclass(frozen=True)
class ModelConfig:
    """The few numbers that rebuild the classifier; stored in every model card.

    ``kind="mlp"``: Flatten, then one Linear + ReLU per ``hidden_sizes`` entry, then the output
    Linear. ``kind="cnn"``: per ``channels`` entry a 3x3 Conv (padding 1) + BatchNorm + ReLU +
    2x2 max-pool, then Flatten and the same Linear head over ``hidden_sizes``. Both are one
    nn.Sequential, so the loader and the service need no case for either.
    """

    hidden_sizes: tuple[int, ...] = (256, 256)
    dropout: float = 0.0
    kind: str = field(default="mlp")
    channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ARCHITECTURES:
            raise ValueError(f"unknown architecture kind {self.kind!r} (expected one of {ARCHITECTURES})")
        if not self.hidden_sizes or any(int(h) < 1 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive integers, got {self.hidden_sizes!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.kind == "mlp" and self.channels:
            raise ValueError(f"an mlp has no convolution channels, got {self.channels!r}")
        # Each conv block halves the image; 28 -> 14 -> 7 -> 3 leaves something to classify.
        if self.kind == "cnn" and (not 1 <= len(self.channels) <= 3 or any(int(c) < 1 for c in self.channels)):
            raise ValueError(f"a cnn needs 1 to 3 positive channel counts, got {self.channels!r}")
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["hidden_sizes"] = list(self.hidden_sizes)
        if self.kind == "mlp":
            del data["channels"]  # an MLP's card stays as it always was
        else:
            data["channels"] = list(self.channels)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        unknown = set(data) - {"hidden_sizes", "dropout", "kind", "channels"}
        if unknown:
            raise ValueError(f"unknown architecture fields: {sorted(unknown)}")
        return cls(
            hidden_sizes=tuple(data.get("hidden_sizes", FIRST_DEFAULT_HIDDEN_SIZES)),
            dropout=float(data.get("dropout", 0.0)),
            kind=data.get("kind", "mlp"),
            channels=tuple(data.get("channels", ())),
        )


def build_model(config: ModelConfig | None = None) -> nn.Sequential:
    """The classifier ``config`` describes (see ModelConfig), producing NUM_CLASSES logits."""
    config = config or ModelConfig()
    layers: list[nn.Module] = []
    channels, height, width = INPUT_CHANNELS, INPUT_HEIGHT, INPUT_WIDTH
    for out_channels in config.channels:
        # No conv bias: BatchNorm's shift does the same job.
        layers += [
            nn.Conv2d(channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels, height, width = out_channels, height // 2, width // 2
    layers.append(nn.Flatten())
    features = channels * height * width
    for hidden in config.hidden_sizes:
        layers += [nn.Linear(features, hidden), nn.ReLU()]
        if config.dropout > 0:
            layers.append(nn.Dropout(config.dropout))
        features = hidden
    layers.append(nn.Linear(features, NUM_CLASSES))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- features


def pixels_to_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., H, W] or [..., 1, H, W] -> normalized float32 [..., 1, H, W].

    The arithmetic of FEATURE_TRANSFORM (torchvision's ToDtype(float32, scale=True) then
    Normalize), op for op: training applies it to whole data sets, serving to one image
    (through INPUT_TABLE), and all of them produce bit-identical inputs.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
    if pixels.shape[-3:] != INPUT_SHAPE:
        pixels = pixels.unsqueeze(-3)
    return normalize(pixels.to(torch.float32).mul_(1.0 / 255))


_feature_transform = None


def feature_transform():
    """The per-item transform torchvision's FashionMNIST dataset is built with: PIL image -> input tensor.

    torchvision.transforms.v2: ToImage, ToDtype(float32, scale=True), Normalize((MEAN,), (STD,)).
    It also takes uint8 tensors [N, 1, H, W], so training can transform a whole split at once.
    """
    global _feature_transform
    if _feature_transform is None:
        from torchvision.transforms import v2  # only training and tests need torchvision

        _feature_transform = v2.Compose(
            [
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=(MEAN,), std=(STD,)),
                _plain_tensor,
            ]
        )
    return _feature_transform


def _plain_tensor(image: torch.Tensor) -> torch.Tensor:
    """tv_tensors.Image -> torch.Tensor, so datasets hand models the same type serving does."""
    return image.as_subclass(torch.Tensor)


def __getattr__(name: str):
    # ``from fashion.contract import FEATURE_TRANSFORM`` builds it on first use (PEP 562).
    if name == "FEATURE_TRANSFORM":
        return feature_transform()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def one_hot(label: int) -> torch.Tensor:
    """Class index -> one-hot float vector of length NUM_CLASSES (the target_transform)."""
    target = torch.zeros(NUM_CLASSES, dtype=torch.float32)
    target[label] = 1.0
    return target


# --------------------------------------------------------------------------- real images

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# A pixel brighter than this (after inversion) belongs to the garment when trimming borders.
_TRIM_THRESHOLD = 24


def to_grayscale(image: Image.Image) -> Image.Image:
    """Any Pillow image -> upright 8-bit grayscale, transparency composited onto white.

    White is the background of the product photos Fashion-MNIST was made from, so a
    transparent cut-out ends up as the same dark-on-light photo and is inverted like one.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if image.mode == "F" else 257.0
        if image.mode == "F" and array.size and array.max() <= 1.0:
            scale = 1 / 255.0
        return Image.fromarray(np.clip(array / scale, 0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode == "CMYK":
        image = image.convert("RGB")
    return image.convert("L")


def light_border(pixels: bytes, width: int) -> bool:
    """True when the border of an 8-bit grayscale image (its raw bytes, ``width`` pixels a row) is mostly
    light: a dark garment on a light photo background.

    The median of the outermost pixels is robust to a garment touching the frame; on the
    real Fashion-MNIST test set it never exceeds 89, so those images are never inverted.
    """
    # On the raw bytes rather than numpy: this runs on every request and numpy's per-call
    # overhead was most of its cost. Rows 0 and -1, then columns 0 and -1 of the rows between.
    border = sorted(
        pixels[:width] + pixels[-width:] + pixels[width:-width:width] + pixels[2 * width - 1 : -width : width]
    )
    middle = len(border) // 2
    median = border[middle] if len(border) % 2 else (border[middle - 1] + border[middle]) / 2
    return median > 127


def fit_to_canvas(gray: Image.Image) -> Image.Image:
    """Trim the dark background, fit the longest edge to 28 and centre it, as Fashion-MNIST was made.

    An image already at the model's 28x28 resolution is taken as it is: resampling it
    again would only blur a crop that was made this way.
    """
    if gray.size == (INPUT_WIDTH, INPUT_HEIGHT):
        return gray
    mask = gray.point(lambda p: 255 if p > _TRIM_THRESHOLD else 0)
    box = mask.getbbox()
    if box is not None:
        gray = gray.crop(box)
    width, height = gray.size
    scale = min(INPUT_WIDTH / width, INPUT_HEIGHT / height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    gray = gray.resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new("L", (INPUT_WIDTH, INPUT_HEIGHT), 0)
    canvas.paste(gray, ((INPUT_WIDTH - size[0]) // 2, (INPUT_HEIGHT - size[1]) // 2))
    return canvas


def to_fashion_mnist(image: Image.Image, invert: InvertMode = "auto") -> Image.Image:
    """Any decoded image -> a 28x28 light-on-black grayscale crop like Fashion-MNIST's."""
    if invert not in INVERT_MODES:
        raise ValueError(f"invert must be one of {INVERT_MODES}, got {invert!r}")
    return fit_to_canvas(inverted_as_asked(to_grayscale(image), invert))


def preprocessed_row(image: Image.Image, invert: InvertMode = "auto") -> bytes:
    """A decoded image -> the 784 bytes of its to_fashion_mnist canvas, what the model sees.

    A decodable image in a layout the conversion cannot take is an ImageError with one message, the
    same for the service and ``fashion-predict``; the cause goes to the log."""
    try:
        return to_fashion_mnist(image, invert).tobytes()
    except Exception as error:  # whatever Pillow raises on a mode or layout it cannot convert
        log.warning(
            "preprocessing failed",
            extra={"image_format": image.format, "image_mode": image.mode, "error": repr(error)},
        )
        raise ImageError("the image cannot be converted to grayscale") from None


# 255 - value for each 8-bit value (ImageOps.invert's table), for bytes.translate.
_NEGATIVE = bytes(range(255, -1, -1))


def inverted_pixels(pixels: bytes, width: int, invert: InvertMode) -> bytes:
    """An 8-bit grayscale image's raw bytes (``width`` pixels a row), negated when ``invert`` says so
    ("auto": when its border is light), else the same bytes.

    The one inversion rule: the general pipeline (``inverted_as_asked``) and the service's path for
    plain crops both use it."""
    if invert == "true" or (invert == "auto" and light_border(pixels, width)):
        return pixels.translate(_NEGATIVE)
    return pixels


def inverted_as_asked(gray: Image.Image, invert: InvertMode) -> Image.Image:
    """``inverted_pixels`` for a grayscale image: a negated copy, or the image itself."""
    pixels = gray.tobytes()
    inverted = inverted_pixels(pixels, gray.size[0], invert)
    return gray if inverted is pixels else Image.frombytes("L", gray.size, inverted)


def _input_table() -> np.ndarray:
    """pixels_to_input of each of the 256 pixel values, so images are normalized with one lookup.

    pixels_to_input is elementwise, so looking every pixel up gives bit for bit what calling
    it gives (tests check it on the real test set), at a tenth of the per-request cost.
    """
    values = pixels_to_input(torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)).flatten()
    return values.numpy().copy()


INPUT_TABLE = _input_table()


def canvases_to_input(canvases: Sequence[Image.Image]) -> torch.Tensor:
    """28x28 grayscale canvases (to_fashion_mnist's output) -> the normalized batch [N, 1, 28, 28]."""
    return pixel_rows_to_input([canvas.tobytes() for canvas in canvases])


def pixel_rows_to_input(rows: Sequence[bytes]) -> torch.Tensor:
    """The 784 bytes of each 28x28 grayscale canvas -> the normalized batch [N, 1, 28, 28], one table lookup."""
    pixels = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), *INPUT_SHAPE)
    return torch.from_numpy(INPUT_TABLE[pixels])


def preprocess(image: Image.Image, invert: InvertMode = "auto") -> torch.Tensor:
    """One decoded image -> the normalized float32 tensor [1, 28, 28] the model takes."""
    return canvases_to_input([to_fashion_mnist(image, invert)])[0]
