"""Train the Fashion-MNIST classifier and write model.safetensors, model.json and plots.

``parse_args(argv)`` builds the options, ``main(args)`` runs them and returns the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import itertools
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR
from torch.utils.data import DataLoader

from fashion.bounds import argparse_type
from fashion.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    sha256_bytes,
    write_file_atomically,
)
from fashion.contract import ARCHITECTURES, CLASS_NAMES, NUM_CLASSES, ModelConfig, build_model, pixels_to_input
from fashion.heldout import split as held_out_split
from fashion.machine import cpu_name, usable_cpus
from fashion.probe import probe_record
from training.data import (
    DEBIAN_DIR,
    DataError,
    FastFashionMNIST,
    ImageFolderDataset,
    TensorBatchDataset,
    collate_batch,
    default_data_root,
    ensure_fashion_mnist,
    file_checksums,
)
from training.dropout import BitsDropout, dropout_widths, use_bits_dropout
from training.prefetch import prefetched
from training.trust import fit_trust

CURVES_FILE = "training-curves.png"
CONFUSION_FILE = "confusion-matrix.png"
# Small enough that a piece of an evaluation fits in the batch-preparing thread's spare time.
EVAL_BATCH = 500
# A black pixel as the contract prepares it: what random_shift brings in at the borders.
BLACK = pixels_to_input(torch.zeros(1, 1, dtype=torch.uint8)).item()
# What choosing the precision and thread count may cost at start, in seconds (measured steps).
CALIBRATION_BUDGET_S = 0.6
# Every mode first takes two steps on this many images; one over HOPELESS times the fastest there is
# timed no further. bf16 on a CPU without bf16 instructions (AVX2: 5x float32's MLP step on 32 images,
# 15x on 1024) cannot win, and its full-size steps alone would cost more than the whole budget.
SCOUT_IMAGES = 32
HOPELESS = 3.0
# Full-size rounds of timed steps: at most TIMED_ROUNDS, ended after CLEAR_AFTER when the leader is clear.
TIMED_ROUNDS = 5
CLEAR_AFTER = 3


@dataclass
class TrainConfig:
    """Hyper-parameters; the defaults are the shipped MLP's recipe (RECIPES["cnn"] is the CNN's).

    ``bf16`` and ``threads`` left at None are chosen at start by timing real training steps
    (``choose_mode``); ``calibration`` then records what was measured.
    """

    epochs: int = 120
    batch_size: int = 1024
    lr: float = 4e-3
    weight_decay: float = 0.1
    label_smoothing: float = 0.1
    hflip: float = 0.0
    shift: int = 1
    shift_after: int = 20  # epochs on plain images before the shift and mixup start (epoch_recipe)
    erase: float = 0.0
    mixup: float = 0.2
    ema: float = 0.98
    warmup: float = 0.1
    bf16: bool | None = None
    threads: int | None = None
    seed: int = 0
    arch: str = "mlp"
    hidden_sizes: tuple[int, ...] = ModelConfig.hidden_sizes
    channels: tuple[int, ...] = ()
    dropout: float = 0.0
    freeze: bool = False
    limit_train: int | None = None
    optimizer: str = field(default="AdamW (fused where available)")
    schedule: str = field(default="OneCycleLR(max_lr=lr, cosine anneal, warm-up fraction = warmup), stepped per batch")
    calibration: dict | None = None

    def model_config(self) -> ModelConfig:
        """The architecture this recipe trains, as the card records it and build_model builds it."""
        return ModelConfig(kind=self.arch, hidden_sizes=self.hidden_sizes, dropout=self.dropout, channels=self.channels)


RECIPES: dict[str, TrainConfig] = {
    "mlp": TrainConfig(),
    "cnn": TrainConfig(
        arch="cnn",
        epochs=30,
        batch_size=256,
        lr=3e-3,
        weight_decay=5e-4,
        hflip=0.5,
        shift=2,
        shift_after=0,
        ema=0.99,
        mixup=0.0,
        warmup=0.3,
        hidden_sizes=(128,),
        channels=(32, 64),
        dropout=0.25,
    ),
}


# --------------------------------------------------------------------------- CLI


_positive_int = argparse_type(int, minimum=1)
_non_negative_int = argparse_type(int, minimum=0)
_positive_float = argparse_type(float, above=0)
_non_negative_float = argparse_type(float, minimum=0)
_fraction = argparse_type(float, minimum=0, below=1)
_open_fraction = argparse_type(float, above=0, below=1)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return sizes


def _recipe_help(text: str, name: str, show=str) -> str:
    """Help text naming each architecture's default for a recipe option."""
    defaults = ", ".join(f"{arch}: {show(getattr(recipe, name))}" for arch, recipe in RECIPES.items())
    return f"{text} (default {defaults})"


def _commas(values) -> str:
    return ",".join(str(v) for v in values) or "none"


def add_recipe_arguments(recipe) -> None:
    """The recipe's options (RECIPE_OPTIONS), each unset unless given: the CLI's, and the training benchmark's."""
    recipe.add_argument("--epochs", type=_positive_int, help=_recipe_help("passes over the training set", "epochs"))
    recipe.add_argument("--batch-size", type=_positive_int, help=_recipe_help("images per step", "batch_size"))
    recipe.add_argument("--lr", type=_positive_float, help=_recipe_help("peak learning rate of the schedule", "lr"))
    recipe.add_argument(
        "--hidden-sizes",
        type=_sizes,
        metavar="H1,H2,...",
        help=_recipe_help("Linear widths", "hidden_sizes", _commas),
    )
    recipe.add_argument(
        "--channels", type=_sizes, metavar="C1,C2", help=_recipe_help("cnn: conv channels", "channels", _commas)
    )
    recipe.add_argument("--dropout", type=_fraction, help=_recipe_help("after each hidden ReLU", "dropout"))
    recipe.add_argument(
        "--weight-decay", type=_non_negative_float, help=_recipe_help("AdamW's decoupled decay", "weight_decay")
    )
    recipe.add_argument(
        "--label-smoothing", type=_fraction, help=_recipe_help("mixed into the one-hot targets", "label_smoothing")
    )
    recipe.add_argument("--hflip", type=_fraction, help=_recipe_help("probability of mirroring an image", "hflip"))
    recipe.add_argument(
        "--shift", type=_non_negative_int, help=_recipe_help("random translation of images, pixels", "shift")
    )
    recipe.add_argument(
        "--shift-after",
        type=_non_negative_int,
        help=_recipe_help("epochs trained on plain images before --shift and --mixup start", "shift_after"),
    )
    recipe.add_argument(
        "--mixup",
        type=_non_negative_float,
        help=_recipe_help("alpha of the Beta mixing images and their targets in pairs; 0: none", "mixup"),
    )
    recipe.add_argument(
        "--erase", type=_fraction, help=_recipe_help("probability of blanking a random rectangle", "erase")
    )
    recipe.add_argument(
        "--warmup",
        type=_open_fraction,
        help=_recipe_help("share of the steps the learning rate rises to --lr, then anneals", "warmup"),
    )
    recipe.add_argument(
        "--ema",
        type=_fraction,
        help=_recipe_help("decay of the weights' moving average that is evaluated and saved; 0 = off", "ema"),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train the Fashion-MNIST classifier and write model.safetensors + model.json (+ plots).",
    )
    parser.add_argument(
        "--arch", choices=ARCHITECTURES, help="model family (default mlp; with --init-from, the loaded model's)"
    )
    add_recipe_arguments(parser.add_argument_group("recipe (defaults depend on --arch)"))
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="same seed, same weights (default 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda when available")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force (or with --no-bf16 forbid) bfloat16 autocast for the forward pass; unset: whichever "
        "of float32 and bf16 trains faster in a few timed steps at start (weights always stay float32)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads; unset: 1 or all usable, whichever trains faster in the timed steps at start "
        "(with 1 chosen, a second thread prepares the batches; --threads 1 keeps the run on one)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="Fashion-MNIST root in torchvision layout; must exist unless --download is given. Unset: "
        f"$FASHION_DATA or ./data, filled from {DEBIAN_DIR} or a download when empty",
    )
    parser.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--download: may create --data-dir and fill it; --no-download: never try torchvision's download",
    )
    parser.add_argument(
        "--extra-data", type=Path, default=None, help="folder of your own images, one sub-folder per class name"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=Path("models"), help="where the model is written (default models)"
    )
    parser.add_argument("--init-from", type=Path, default=None, help="start from the model in this folder")
    parser.add_argument(
        "--freeze", action="store_true", help="with --init-from: train only the last layer (requires_grad=False)"
    )
    parser.add_argument(
        "--limit-train", type=_positive_int, default=None, help="use only the first N training images (smoke tests)"
    )
    parser.add_argument(
        "--debian-dir", type=Path, default=DEBIAN_DIR, help="where the dataset-fashion-mnist package keeps its files"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--trust",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fit the temperature and the not-a-garment detector after training (about 15 s; default: on)",
    )
    return parser


RECIPE_OPTIONS = (
    "epochs",
    "batch_size",
    "lr",
    "hidden_sizes",
    "channels",
    "dropout",
    "weight_decay",
    "label_smoothing",
    "hflip",
    "shift",
    "shift_after",
    "erase",
    "mixup",
    "ema",
    "warmup",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.freeze and args.init_from is None:
        parser.error("--freeze needs --init-from MODEL_DIR (there is nothing to freeze in a fresh model)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if args.arch in (None, "mlp") and args.channels and args.init_from is None:
        parser.error("--channels is for --arch cnn; an MLP has no convolutions")
    return args


def recipe_given(args: argparse.Namespace) -> dict:
    """The recipe options given on the command line, by TrainConfig field name."""
    return {name: getattr(args, name) for name in RECIPE_OPTIONS if getattr(args, name) is not None}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The recipe of ``--arch``, with every option given on the command line in its place."""
    return replace(
        RECIPES[args.arch or "mlp"],
        **recipe_given(args),
        bf16=args.bf16,
        threads=args.threads,
        seed=args.seed,
        freeze=args.freeze,
        limit_train=args.limit_train,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# --------------------------------------------------------------------------- training


def freeze_all_but_last(model: nn.Sequential) -> None:
    """requires_grad=False on every parameter but the last Linear's, which alone is retrained."""
    last = [module for module in model if isinstance(module, nn.Linear)][-1]
    keep = {id(parameter) for parameter in last.parameters()}
    for parameter in model.parameters():
        if id(parameter) not in keep:
            parameter.requires_grad_(False)


def train_mode(model: nn.Module, frozen: bool) -> None:
    """``model.train()``, except that with ``--freeze`` BatchNorm layers stay in eval mode: their
    running statistics are part of what was frozen, and train mode would keep updating them."""
    model.train()
    if frozen:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def random_shift(
    inputs: torch.Tensor, shift: int, generator: torch.Generator, crop: Callable | None = None
) -> torch.Tensor:
    """Translate each image by up to ``shift`` pixels each way, filling with the background value.

    ``crop`` (``shift_by_windows`` or ``shift_by_gather``, the same images) defaults to the faster
    one on the inputs' device; the step benchmark passes each in turn."""
    padded = F.pad(inputs, (shift, shift, shift, shift), value=BLACK)
    side = 2 * shift + 1
    dy = torch.randint(0, side, (len(inputs),), generator=generator).to(inputs.device)
    dx = torch.randint(0, side, (len(inputs),), generator=generator).to(inputs.device)
    if crop is None:
        crop = shift_by_windows if inputs.device.type == "cpu" else shift_by_gather
    return crop(padded, dy, dx, inputs.shape[-2:])


def shift_by_windows(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Image i of ``padded`` cropped to ``size`` at (dy[i], dx[i]): one window copy per distinct offset.

    On the CPU, indexing, padding and shifting a batch of 1024 takes 3.4-3.6 ms this way against 4.5
    with the gather (``benchmarks/bench_training.py --steps``, 2 threads; 9 offsets for a 1-pixel
    shift), the same images; the default recipe shifts every batch."""
    (height, width), side = size, padded.shape[-1] - size[-1] + 1
    offsets = dy * side + dx
    order = torch.argsort(offsets, stable=True)
    shifted = padded.new_empty((len(padded), padded.shape[1], height, width))
    start = 0
    for offset, count in enumerate(torch.bincount(offsets, minlength=side * side).tolist()):
        if count:
            rows, (top, left) = order[start : start + count], divmod(offset, side)
            shifted.index_copy_(0, rows, padded.index_select(0, rows)[:, :, top : top + height, left : left + width])
            start += count
    return shifted


def shift_by_gather(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """The same crops as ``shift_by_windows`` in one gather (one kernel on a GPU, no host round trip)."""
    height, width = size
    rows = (dy[:, None] + torch.arange(height, device=padded.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(width, device=padded.device))[:, None, :]
    batch = torch.arange(len(padded), device=padded.device)[:, None, None]
    return padded[batch, 0, rows, cols].unsqueeze(1)


def random_erase(inputs: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Blank one random rectangle (2-25% of the area, aspect 1/3-3) per chosen image with the background.

    torchvision's RandomErasing idea, drawn per image for a whole batch at once (v2.RandomErasing
    on a batch tensor would erase the same rectangle in every image).
    """
    count, _, height, width = inputs.shape
    area = torch.empty(count).uniform_(0.02, 0.25, generator=generator) * height * width
    aspect = torch.exp(torch.empty(count).uniform_(-1.0986, 1.0986, generator=generator))
    h = (area * aspect).sqrt().round().clamp(1, height)
    w = (area / aspect).sqrt().round().clamp(1, width)
    top = (torch.rand(count, generator=generator) * (height - h + 1)).floor()
    left = (torch.rand(count, generator=generator) * (width - w + 1)).floor()
    chosen = torch.rand(count, generator=generator) < probability
    rows = torch.arange(height)[None, :]
    cols = torch.arange(width)[None, :]
    inside_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
    inside_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
    mask = (inside_rows[:, :, None] & inside_cols[:, None, :] & chosen[:, None, None]).unsqueeze(1)
    return inputs.masked_fill(mask.to(inputs.device), BLACK)


def epoch_recipe(config: TrainConfig, epoch: int) -> TrainConfig:
    """The recipe epoch ``epoch`` (from 1) trains with: no shift or mixup for the first ``shift_after`` epochs.

    Shifted images are harder to fit while the learning rate is high: held back for 20 epochs, the
    shift let the MLP first reach 0.90 7-10 epochs sooner than with it from the start, and the shift
    that follows still takes the final accuracy above 0.91 (README, Training). Mixup is held back
    with it for the same reason."""
    return replace(config, shift=0, mixup=0.0) if epoch <= config.shift_after else config


def augment(inputs: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    if config.hflip > 0:
        # A mirrored garment is still the same class.
        flip = (torch.rand(len(inputs), generator=generator) < config.hflip).to(inputs.device)
        inputs = torch.where(flip[:, None, None, None], inputs.flip(-1), inputs)
    if config.shift > 0:
        inputs = random_shift(inputs, config.shift, generator)
    if config.erase > 0:
        inputs = random_erase(inputs, config.erase, generator)
    return inputs


def mix_up(
    inputs: torch.Tensor, targets: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image and its target vector blended with the next pair of the batch (mixup; the last with the
    first), by a weight drawn from Beta(alpha, alpha) and folded to at least 0.5 on the image's own, so
    its class leads.

    The loader shuffles, so the next image is a random partner; blending neighbours in one pass costs
    half of gathering partners by a permutation first (0.45 against 0.90 ms a batch of 1,024, 1 thread),
    on the thread that prepares batches beside the steps. torch has no Beta sampler that takes a
    generator: numpy's draws the weights, seeded from ``generator``."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    own = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, len(inputs))).float()
    own = torch.maximum(own, 1 - own).to(inputs.device)
    mixed = []
    for tensor, weight in ((inputs, own.view(-1, *[1] * (inputs.dim() - 1))), (targets, own[:, None])):
        # lerp(partner, own, w) = w * own + (1 - w) * partner, written in place of a copy of the batch
        blend = torch.empty_like(tensor)
        torch.lerp(tensor[1:], tensor[:-1], weight[:-1], out=blend[:-1])
        torch.lerp(tensor[:1], tensor[-1:], weight[-1:], out=blend[-1:])
        mixed.append(blend)
    return mixed[0], mixed[1]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy against one-hot (probability) targets, optionally smoothed towards uniform."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    smoothing: float,
    bf16: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step (forward, under bf16 autocast if asked; loss; backward; optimizer): (logits, loss).

    The loop, the timed steps that choose its precision and the step benchmark all run this one."""
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(inputs)
    loss = soft_cross_entropy(logits, targets, smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, loss


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(accuracy, mean loss, confusion matrix [true, predicted]) of ``model`` on a whole split, in float32."""
    model.eval()
    tally = Tally(inputs.device)
    for piece in evaluation_pieces(model, inputs, labels, tally):
        piece()
    return tally.accuracy(), tally.mean_loss(), tally.confusion.view(NUM_CLASSES, NUM_CLASSES).cpu()


def evaluation_pieces(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, tally: Tally
) -> Iterator[Callable[[], None]]:
    """An evaluation of ``model`` (in eval mode) on a split as jobs of EVAL_BATCH images, each adding to ``tally``."""
    for start in range(0, len(inputs), EVAL_BATCH):
        piece = slice(start, start + EVAL_BATCH)
        yield functools.partial(tally.add, model, inputs[piece], labels[piece])


class Tally:
    """An evaluation's running sums, added to a batch at a time (by any thread)."""

    def __init__(self, device: torch.device) -> None:
        self.images, self.correct, self.loss_sum = 0, 0, 0.0
        self.confusion = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.long, device=device)
        self.finished = time.perf_counter()

    @torch.no_grad()  # grad mode is per thread: this may run on the batch-preparing one
    def add(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        logits = model(inputs).float()
        predicted = logits.argmax(dim=1)
        self.images += len(inputs)
        self.correct += (predicted == labels).sum().item()
        self.loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        self.confusion += torch.bincount(labels * NUM_CLASSES + predicted, minlength=NUM_CLASSES * NUM_CLASSES)
        self.finished = time.perf_counter()

    def accuracy(self) -> float:
        return self.correct / self.images

    def mean_loss(self) -> float:
        return self.loss_sum / self.images


class WeightAverage:
    """An exponential moving average of a model's weights (buffers copied), evaluated and saved instead of it.

    The average of the last few hundred steps sits nearer the middle of the minimum than the last
    step does, so it is more accurate for the same training; the decay ramps up from 0 so the
    early, random weights are forgotten quickly.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        self.updates = 0
        self._averaged = list(self.model.parameters())
        self._current = list(model.parameters())
        self._buffers = list(zip(self.model.buffers(), model.buffers(), strict=True))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._averaged, self._current, 1.0 - decay)
        for averaged, current in self._buffers:
            averaged.copy_(current)


def relu_in_place(model: nn.Module) -> nn.Module:
    """Make each ReLU of ``model``'s Sequentials that directly follows a Linear or a BatchNorm work in place.

    Those layers' backward passes do not read their outputs, so the ReLU may overwrite them: a step
    then allocates and streams two activations fewer (on 2 CPU threads, float32, a step of the
    784-512-512-10 took 12.3 against 13.1 ms). Any other ReLU keeps its copy: after a Flatten, say, it would
    overwrite the batch, a view of the training data. Nothing saved changes; a ReLU has no state."""
    for sequential in (module for module in model.modules() if isinstance(module, nn.Sequential)):
        for before, layer in itertools.pairwise(sequential.children()):
            if type(layer) is nn.ReLU and isinstance(
                before, nn.Linear | nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d
            ):
                layer.inplace = True
    return model


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel per step where this torch has it for the device (it is cheaper)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)


def one_cycle(optimizer: torch.optim.Optimizer, lr: float, total_steps: int, warmup: float) -> OneCycleLR:
    """The recipe's schedule: the learning rate rises to ``lr`` over ``warmup`` of the steps, then anneals.

    OneCycleLR divides by its warm-up's length in steps minus one, so a warm-up of exactly one step
    (``--warmup 0.1`` over 10 steps: ``--epochs 1`` on 10 batches) raised ZeroDivisionError; a hair
    more than one step is the same schedule."""
    if warmup * total_steps == 1:
        warmup *= 1 + 1e-9
    return OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=warmup)


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 autocast can run on ``device`` at all; whether it is faster is measured (choose_mode)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available()


def _mode_name(bf16: bool, threads: int | None) -> str:
    return ("bf16" if bf16 else "fp32") + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def threads_kept(count: int | None = None) -> Iterator[None]:
    """Run the block (on ``count`` intra-op threads, if given), then put torch's thread count back."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def choose_mode(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig,
    device: torch.device,
    budget_s: float = CALIBRATION_BUDGET_S,
) -> tuple[bool, int | None, dict]:
    """(bf16, threads, record): the fastest precision/thread mode, by timing real steps on a copy of the model.

    A CPU flag says an instruction exists, not that oneDNN's kernels for it win at these shapes,
    so each candidate runs the same training steps (forward, loss, backward, AdamW) on one batch
    of the real data, prepared as the loop prepares it in that mode (``prepare_batch``), round-robin
    so background load hits all alike. A batch costs its step plus its preparation, except with one
    thread on a CPU with a core to spare, where the loop prepares the next batches beside the
    step (``prefetch_batches``) and a batch costs the longer of the two. The lowest median cost wins.
    Modes far slower than the fastest on a few images (``SCOUT_IMAGES``, ``HOPELESS``) are dropped
    before the full-size steps. ``config.bf16``/``config.threads`` not None pin that choice. The random
    state and torch's thread count are restored, so the calibration does not change the trained weights.
    """
    precisions = [config.bf16] if config.bf16 is not None else [False, *([True] if fast_bf16(device) else [])]
    if device.type == "cuda":
        thread_counts = [None]
    elif config.threads is not None:
        thread_counts = [config.threads]
    else:
        thread_counts = sorted({1, torch.get_num_threads()})
    modes = [(bf16, threads) for bf16 in precisions for threads in thread_counts]
    if len(modes) == 1:
        bf16, threads = modes[0]
        return bf16, threads, {"chosen": _mode_name(bf16, threads), "by": "options"}

    started = time.perf_counter()
    pinned = config.threads is not None
    size = min(config.batch_size, len(inputs))
    preparing: dict[tuple, list[float]] = {mode: [] for mode in modes}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), threads_kept():
        trial = copy.deepcopy(model).train()
        optimizer = make_optimizer(trial, config, device)
        rows = torch.randperm(len(inputs), device=inputs.device)
        augmenting = torch.Generator().manual_seed(0)
        ahead = dropout_widths(trial) or []

        def step(mode, images: int | None = None) -> float:
            """Prepare a batch as the loop would in ``mode`` (timed into ``preparing``), then step on it."""
            bf16, threads = mode
            if threads is not None:
                torch.set_num_threads(threads)
            _synchronize(device)
            begun = time.perf_counter()
            chosen = rows[: images or size]
            beside = prefetch_batches(device, threads, pinned)
            batch, batch_targets = prepare_batch(
                inputs[chosen], targets[chosen], config, augmenting, bf16, ahead, beside
            )
            _synchronize(device)
            prepared = time.perf_counter()
            preparing[mode].append(prepared - begun)
            optimizer_step(trial, optimizer, batch, batch_targets, config.label_smoothing, bf16)
            _synchronize(device)
            return time.perf_counter() - prepared

        scout = min(size, SCOUT_IMAGES)
        scouted = {}
        for mode in modes:
            step(mode, scout)  # the first call at a shape pays for its kernels' selection
            scouted[mode] = step(mode, scout)
        dropped = [mode for mode in modes if scouted[mode] > HOPELESS * min(scouted.values())]
        modes = sorted((mode for mode in modes if mode not in dropped), key=scouted.get)
        # The fastest mode's first full-size step (kernel selection included, so on the high side)
        # says whether every mode's would fit the budget. A slow model's (the CNN's) would not: then
        # fewer images per step are timed, so the choice still costs about budget_s.
        full_round = step(modes[0]) * len(modes)
        if full_round > budget_s / 3 and size > 16:
            size = max(16, int(size * budget_s / 6 / full_round))
            warming = modes
        else:
            warming = modes[1:]
        for mode in warming:
            step(mode)  # first calls at the timed size pay for kernel selection; not counted
        preparing = {mode: [] for mode in modes}
        timings: dict[tuple, list[float]] = {mode: [] for mode in modes}

        def batch_cost(mode, step_s: float, preparation_s: float) -> float:
            """A batch's cost in ``mode``: its preparation runs beside the step only when batches are prefetched."""
            beside = prefetch_batches(device, mode[1], pinned)
            return max(step_s, preparation_s) if beside else step_s + preparation_s

        def costs_so_far() -> dict:
            """Each mode's batch costs, one per round timed."""
            return {
                mode: [batch_cost(mode, *pair) for pair in zip(timings[mode], preparing[mode], strict=True)]
                for mode in modes
            }

        for rounds in range(1, (TIMED_ROUNDS if len(modes) > 1 else 1) + 1):
            for mode in modes:
                timings[mode].append(step(mode))
            if time.perf_counter() - started > budget_s or (rounds >= CLEAR_AFTER and clear_leader(costs_so_far())):
                break
    steps = {mode: statistics.median(times) for mode, times in timings.items()}
    preparations = {mode: statistics.median(times) for mode, times in preparing.items()}
    batches = {mode: batch_cost(mode, steps[mode], preparations[mode]) for mode in modes}
    bf16, threads = min(batches, key=batches.get)

    def in_ms(medians: dict) -> dict:
        return {_mode_name(*mode): round(seconds * 1000, 2) for mode, seconds in medians.items()}

    record = {
        "chosen": _mode_name(bf16, threads),
        "by": "timed training steps",
        "images_per_step": size,
        "median_step_ms": in_ms(steps),
        "median_preparation_ms": in_ms(preparations),
        "median_batch_ms": in_ms(batches),
        "scouted_step_ms": {"images": scout, **in_ms(scouted)},
        "dropped": [_mode_name(*mode) for mode in dropped],
        "rounds": rounds,
        "cost_s": round(time.perf_counter() - started, 3),
    }
    return bf16, threads, record


def clear_leader(costs: dict) -> bool:
    """Whether one mode's slowest timed batch beat every other mode's fastest: more rounds would not
    change which median is lowest unless the machine's load changed, so the calibration may stop."""
    worst = {mode: max(times) for mode, times in costs.items()}
    leader = min(worst, key=worst.get)
    return all(worst[leader] < min(times) for mode, times in costs.items() if mode != leader)


def prefetch_batches(device: torch.device, threads: int | None, pinned: bool = False) -> bool:
    """Whether the loop prepares the next batches on a second thread: training on one CPU thread with
    another CPU to spare (``training.prefetch``); with more threads the step's kernels use the cores.
    Not when ``--threads 1`` was given (``pinned``): whoever asks for one thread, say to share the
    machine with another run, gets one CPU's worth of work, not a second thread beside it."""
    return device.type == "cpu" and threads == 1 and not pinned and usable_cpus() >= 2


def _progress(iterable, total: int, description: str):
    """tqdm when stderr is a terminal; the plain iterable otherwise, so CI logs stay short."""
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=description, leave=False, unit="batch", dynamic_ncols=True)


def train(
    model: nn.Sequential,
    train_set,
    test_set: FastFashionMNIST,
    config: TrainConfig,
    device: torch.device,
    log=print,
    stop_when=None,
) -> list[dict]:
    """The autograd loop; returns one history entry per epoch (losses, accuracies, lr, elapsed seconds).

    ``stop_when(entry)`` returning True ends the run at that epoch's weights (benchmarks stop at a
    target). An entry's ``elapsed_s`` is when its evaluation finished: with batches prefetched, that
    evaluation runs behind the next epoch, and a stop comes at that epoch's end.

    Chooses the precision and thread count first (``choose_mode``; the time counts in elapsed_s),
    writes the choice into ``config`` and leaves torch on that thread count (the CLI's trust fitting
    and card follow it; callers that train again wrap ``train`` in ``threads_kept``). With ``config.ema``
    the weights' moving average is what each epoch evaluates, and it is copied into ``model`` at the end.
    On the CPU, ``model``'s dropout layers become ``BitsDropout`` (same distribution, a third of the cost,
    no state); on any device its ReLUs work in place where that is safe (``relu_in_place``).
    """
    model.to(device)
    relu_in_place(model)
    if device.type == "cpu":
        use_bits_dropout(model)
    for layer in model.modules():
        if isinstance(layer, BitsDropout):
            layer.ahead.clear()  # no masks left over from a run an exception ended
    started = time.perf_counter()
    pinned = config.threads is not None
    config.bf16, config.threads, config.calibration = choose_mode(
        model, train_set.inputs, train_set.target_vectors, config, device
    )
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    prefetch = prefetch_batches(device, config.threads, pinned)
    config.calibration["prefetch"] = prefetch
    # Batches prepared ahead carry their dropout masks, drawn there in the order the steps would draw them.
    ahead = (dropout_widths(model) or []) if prefetch else []
    log(
        f"precision and threads: {config.calibration['chosen']} ({config.calibration['by']})"
        + ("; batches prepared on a second thread" if prefetch else "")
    )
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        train_set, batch_size=config.batch_size, shuffle=True, generator=generator, collate_fn=collate_batch
    )
    optimizer = make_optimizer(model, config, device)
    scheduler = one_cycle(optimizer, config.lr, config.epochs * len(loader), config.warmup)
    average = WeightAverage(model, config.ema) if config.ema > 0 else None
    evaluated = average.model if average is not None else model
    test_labels = test_set.targets.to(device)
    history = []

    def record(epoch: int, train_loss: float, train_acc: float, lr: float, evaluation: tuple) -> bool:
        """Add an epoch's entry to the history and log it; True when ``stop_when`` ends the run there."""
        test_acc, test_loss, finished = evaluation
        entry = {
            "epoch": epoch,
            "train_loss": round(train_loss, 6),
            "train_accuracy": round(train_acc, 6),
            "test_loss": round(test_loss, 6),
            "test_accuracy": test_acc,
            "lr": lr,
            "elapsed_s": round(finished - started, 3),
        }
        history.append(entry)
        log(
            f"epoch {epoch}/{config.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
            f"test loss {test_loss:.4f} acc {test_acc:.4f} | {entry['elapsed_s']:.1f}s"
        )
        return stop_when is not None and stop_when(entry)

    # When batches are prefetched, each epoch's evaluation runs on their thread in its spare time during
    # the next epoch, on a copy of the weights it evaluates: its entry is recorded (with the time its
    # answer came) at the next epoch's end, and a stop there returns the weights that were evaluated.
    behind = SpareTimeEvaluation(evaluated, test_set.inputs, test_labels) if prefetch else None
    stopped = False
    for epoch in range(1, config.epochs + 1):
        train_mode(model, config.freeze)
        seen, correct, loss_sum = 0, 0, 0.0
        batches = prepared_batches(loader, epoch_recipe(config, epoch), generator, ahead, prefetch)
        if prefetch:
            batches = prefetched(batches, spare=behind.pieces)
        bar = _progress(batches, len(loader), f"epoch {epoch}/{config.epochs}")
        for inputs, targets in bar:
            logits, loss = optimizer_step(model, optimizer, inputs, targets, config.label_smoothing, config.bf16)
            scheduler.step()
            if average is not None:
                average.update()
            # Running metrics stay on the device; one sync per epoch, not per batch.
            batch = len(inputs)
            seen += batch
            loss_sum = loss_sum + loss.detach() * batch
            correct = correct + (logits.argmax(dim=1) == targets.argmax(dim=1)).sum()
            if bar is not batches and bar.n % 20 == 0:
                bar.set_postfix(loss=f"{(loss_sum / seen).item():.4f}", acc=f"{(correct / seen).item():.4f}")
        epoch_record = (epoch, (loss_sum / seen).item(), (correct / seen).item(), optimizer.param_groups[0]["lr"])
        if behind is None:
            test_acc, test_loss, _ = evaluate(evaluated, test_set.inputs, test_labels)
            stopped = record(*epoch_record, (test_acc, test_loss, time.perf_counter()))
        else:
            stopped = behind.pending is not None and record(*behind.collect())
            if not stopped:
                behind.start(epoch_record)
        if stopped:
            break
    if behind is not None and behind.pending is not None:
        record(*behind.collect())
    if stopped and behind is not None:
        model.load_state_dict(behind.snapshot.state_dict())
    elif average is not None:
        model.load_state_dict(average.model.state_dict())
    return history


class SpareTimeEvaluation:
    """An epoch's evaluation, of a copy of the weights it evaluates, in EVAL_BATCH pieces: the thread
    that prepares the next epoch's batches runs them while it is ahead of the steps (``pieces``), and
    ``collect`` runs whatever it left."""

    def __init__(self, evaluated: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.evaluated, self.inputs, self.labels = evaluated, inputs, labels
        self.snapshot = copy.deepcopy(evaluated).requires_grad_(False).eval()
        self.pending = None  # the epoch entry's fields besides the evaluation's answer
        self.pieces: Iterator[Callable[[], None]] = iter(())
        self._tally = Tally(inputs.device)

    def start(self, pending: tuple) -> None:
        """Copy the weights as they are now; the pieces evaluate the copy."""
        with torch.no_grad():
            for copied, current in zip(
                self.snapshot.state_dict().values(), self.evaluated.state_dict().values(), strict=True
            ):
                copied.copy_(current)
        self.pending = pending
        self._tally = Tally(self.inputs.device)
        self.pieces = evaluation_pieces(self.snapshot, self.inputs, self.labels, self._tally)

    def collect(self) -> tuple:
        """The started epoch's entry fields, then (accuracy, mean loss, when its last piece finished)."""
        for piece in self.pieces:
            piece()
        pending, self.pending = self.pending, None
        return (*pending, (self._tally.accuracy(), self._tally.mean_loss(), self._tally.finished))


def prepare_batch(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
    bf16: bool,
    ahead: list,
    prefetch: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fetched batch (inputs, target vectors), augmented and mixed up. For a prefetching thread
    (``prefetch``), more of a step's work that needs no weights is done here, off the step's core: the
    batch's dropout masks are drawn (``ahead``: (BitsDropout, width) pairs), and under bf16 the inputs
    are cast as autocast would cast them (the same values; autocast then has nothing to do)."""
    inputs = augment(inputs, config, generator)
    if config.mixup > 0:
        inputs, targets = mix_up(inputs, targets, config.mixup, generator)
    if prefetch:
        dtype = torch.bfloat16 if bf16 else torch.float32  # what the layers see under autocast, or not
        for layer, width in ahead:
            layer.draw_ahead((len(inputs), width), dtype)
        inputs = inputs.to(dtype)
    return inputs, targets


def prepared_batches(
    loader: DataLoader, config: TrainConfig, generator: torch.Generator, ahead: list, prefetch: bool
) -> Iterator:
    """The loader's batches, each through ``prepare_batch``."""
    for inputs, targets in loader:
        yield prepare_batch(inputs, targets, config, generator, config.bf16, ahead, prefetch)


# --------------------------------------------------------------------------- outputs


def _render_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plot_files(history: list[dict], confusion: torch.Tensor) -> dict[str, bytes]:
    """PNG bytes of the training curves and the confusion matrix (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [entry["epoch"] for entry in history]
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [e["train_loss"] for e in history], marker="o", label="train (smoothed targets)")
    loss_axis.plot(epochs, [e["test_loss"] for e in history], marker="o", label="test")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    loss_axis.legend()
    acc_axis.plot(epochs, [e["train_accuracy"] for e in history], marker="o", label="train (running, during the epoch)")
    acc_axis.plot(epochs, [e["test_accuracy"] for e in history], marker="o", label="test")
    acc_axis.axhline(0.90, color="grey", linestyle=":", linewidth=1)
    acc_axis.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    acc_axis.legend()
    for axis in (loss_axis, acc_axis):
        axis.grid(alpha=0.3)
    curves = _render_png(figure)
    plt.close(figure)

    matrix = confusion.numpy()
    figure, axis = plt.subplots(figsize=(7.5, 6.5))
    image = axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(NUM_CLASSES), CLASS_NAMES, rotation=45, ha="right")
    axis.set_yticks(range(NUM_CLASSES), CLASS_NAMES)
    axis.set(xlabel="predicted", ylabel="true", title="Confusion matrix (10,000 test images)")
    threshold = matrix.max() / 2
    for i in range(NUM_CLASSES):
        for j in range(NUM_CLASSES):
            color = "white" if matrix[i, j] > threshold else "black"
            axis.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color, fontsize=8)
    figure.colorbar(image, ax=axis)
    matrix_png = _render_png(figure)
    plt.close(figure)
    return {CURVES_FILE: curves, CONFUSION_FILE: matrix_png}


def write_outputs(
    model: nn.Module, card: dict, output_dir: Path, plots: dict[str, bytes], detector: nn.Module | None = None
) -> dict:
    """Plots first, then weights, then the card that names all of them; every file via temp + fsync + rename.

    A crash leaves each final name either the old or the new complete file; the card, written
    last, is the commit point, and it records the plots' hashes too.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    card = {**card, "plots": {name: sha256_bytes(data) for name, data in plots.items()}}
    for name, data in plots.items():
        write_file_atomically(output_dir / name, data)
    return save_checkpoint(model, card, output_dir, detector=detector)


def hold_out(train_set: FastFashionMNIST) -> tuple[torch.Tensor, torch.Tensor]:
    """Take the held-out split (fashion.heldout) out of ``train_set``; return it as (inputs, labels)."""
    kept, validation = held_out_split(train_set.targets)
    held = train_set.inputs[validation], train_set.targets[validation]
    train_set.inputs, train_set.target_vectors = train_set.inputs[kept], train_set.target_vectors[kept]
    return held


def build_card(
    *,
    config: TrainConfig,
    model_config: ModelConfig,
    device: torch.device,
    history: list[dict],
    accuracy: float,
    loss: float,
    confusion: torch.Tensor,
    wall_time: float,
    data: dict,
    init_from: dict | None,
    arguments: dict,
    probe: dict | None = None,
) -> dict:
    per_class = (confusion.diag().double() / confusion.sum(dim=1).double()).tolist()
    return {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "architecture": model_config.to_dict(),
        "metrics": {
            "test_accuracy": accuracy,
            "test_loss": round(loss, 6),
            "test_images": int(confusion.sum()),
            "per_class_accuracy": {name: round(acc, 4) for name, acc in zip(CLASS_NAMES, per_class, strict=True)},
            "confusion_matrix": {"rows": "true class", "columns": "predicted class", "counts": confusion.tolist()},
        },
        # fashion.probe.probe_record: what the service re-checks before it serves this model.
        "probe": probe,
        "training": {
            # The architecture's own numbers are under "architecture"; the rest of the recipe here.
            **{
                key: value
                for key, value in asdict(config).items()
                if key not in ("arch", "hidden_sizes", "channels", "dropout")
            },
            "loss": "cross-entropy on one-hot targets (label smoothing as above)",
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "cpu_threads": torch.get_num_threads(),
            "wall_time_s": round(wall_time, 2),
            "init_from": init_from,
            "history": history,
        },
        "data": data,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        },
        "arguments": arguments,
    }


# --------------------------------------------------------------------------- main


def check_writable(output_dir: Path) -> None:
    """Fail before training, not after it, when the model could not be written (OSError)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"{output_dir} is a file, not a folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=output_dir):
        pass


def check_data_dir(data_dir: Path | None, download: bool | None) -> None:
    """A folder the user named is used, never made up: it must exist unless --download says to create it."""
    if data_dir is None or download or data_dir.is_dir():
        return
    if data_dir.exists():
        raise DataError(f"--data-dir {data_dir} is a file, not a folder")
    raise DataError(
        f"--data-dir {data_dir} does not exist. Create it (empty is fine: it is filled from the Debian package "
        f"dataset-fashion-mnist when that is installed) or pass --download to let training create it and "
        f"download Fashion-MNIST into it"
    )


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    device = resolve_device(args.device)
    torch.manual_seed(config.seed)
    root = args.data_dir if args.data_dir is not None else default_data_root()
    try:
        check_data_dir(args.data_dir, args.download)
        root, source = ensure_fashion_mnist(root, debian_dir=args.debian_dir, download=args.download is not False)
        train_set = FastFashionMNIST(root, train=True)
        test_set = FastFashionMNIST(root, train=False)
        extra = ImageFolderDataset(args.extra_data) if args.extra_data is not None else None
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        check_writable(args.output_dir)
    except OSError as error:
        reason = error.strerror if error.strerror and not isinstance(error, NotADirectoryError) else error
        if isinstance(error, NotADirectoryError) and error.filename is not None:
            reason = f"a part of the path is a file, not a folder ({error.strerror})"
        print(f"error: cannot write the model to {args.output_dir}: {reason}", file=sys.stderr)
        return 2
    data = {
        "source": source,
        "root": str(root),
        "files_sha256": file_checksums(root),
        "train_images": len(train_set),
        "test_images": len(test_set),
    }
    # The held-out split (probe + calibration) is never learned from: the model is judged and calibrated on it.
    validation = hold_out(train_set)
    data["train_images"] = len(train_set.inputs)
    data["held_out_images"] = len(validation[1])
    parts = [train_set]
    if config.limit_train is not None and config.limit_train < len(train_set):
        train_set.inputs = train_set.inputs[: config.limit_train]
        train_set.target_vectors = train_set.target_vectors[: config.limit_train]
        data["train_images"] = config.limit_train
    if extra is not None:
        parts.append(extra)
        data["extra"] = {"folder": str(args.extra_data), "images": len(extra), "files_sha256": extra.checksums()}
    train_data = TensorBatchDataset(parts).to(device)
    test_set.to(device)

    init_from = None
    if args.init_from is not None:
        try:
            model, base_card = load_checkpoint(args.init_from, device)
        except CheckpointError as error:
            print(f"error: --init-from {args.init_from}: {error}", file=sys.stderr)
            return 2
        model_config = ModelConfig.from_dict(base_card["architecture"])
        if args.arch not in (None, model_config.kind):
            print(f"error: --arch {args.arch}: the model in {args.init_from} is a {model_config.kind}", file=sys.stderr)
            return 2
        # The loaded model's family decides the recipe (a CNN is fine-tuned with the CNN's), options on top.
        config = config_from_args(argparse.Namespace(**{**vars(args), "arch": model_config.kind}))
        init_from = {"folder": str(args.init_from), "weights_sha256": base_card["weights"]["sha256"]}
        if args.freeze:
            freeze_all_but_last(model)
    else:
        model_config = config.model_config()
        model = build_model(model_config)
    config.arch, config.hidden_sizes = model_config.kind, model_config.hidden_sizes
    config.dropout, config.channels = model_config.dropout, model_config.channels

    started = time.perf_counter()
    print(
        f"training on {len(train_data):,} images ({source}: {root}) on {device}, "
        f"{config.epochs} epochs of batch {config.batch_size}, {config.arch} {model_config.to_dict()}",
        file=sys.stderr,
    )
    history = train(model, train_data, test_set, config, device, log=lambda line: print(line, file=sys.stderr))
    wall_time = time.perf_counter() - started
    accuracy, loss, confusion = evaluate(model, test_set.inputs, test_set.targets.to(device))
    detector, trust = None, None
    if args.trust:
        detector, trust = fit_trust(
            model,
            train_set.inputs.cpu(),
            validation,
            (test_set.inputs.cpu(), test_set.targets),
            seed=config.seed,
            log=lambda line: print(line, file=sys.stderr),
        )
    card = build_card(
        config=config,
        model_config=model_config,
        device=device,
        history=history,
        accuracy=accuracy,
        loss=loss,
        confusion=confusion,
        wall_time=wall_time,
        data=data,
        init_from=init_from,
        arguments={key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        probe=probe_record(model),
    )
    plots = {} if args.no_plots else plot_files(history, confusion)
    try:
        if trust is not None:
            card["trust"] = trust
        written = write_outputs(model.cpu(), card, args.output_dir, plots, detector)
    except OSError as error:
        print(f"error: cannot write the model to {args.output_dir}: {error}", file=sys.stderr)
        return 1
    print(
        f"done: test accuracy {accuracy:.4f} after {config.epochs} epochs in {wall_time:.1f}s on {device} -> "
        f"{args.output_dir / 'model.safetensors'} (sha256 {written['weights']['sha256'][:12]})"
    )
    return 0


def run(argv: list[str] | None = None) -> int:
    """Console entry: parse, run, turn Ctrl-C into exit 130 without a traceback."""
    args = parse_args(argv)
    try:
        return main(args)
    except KeyboardInterrupt:
        print("interrupted: the previous model (weights and card) is untouched", file=sys.stderr)
        return 130
