"""Train the Fashion-MNIST classifier and write model.safetensors, model.json and plots.

``parse_args(argv)`` builds the options, ``main(args)`` runs them and returns the exit code.
"""

from __future__ import annotations

import argparse
import io
import math
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader

from fashion.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    sha256_bytes,
    write_file_atomically,
)
from fashion.contract import CLASS_NAMES, NUM_CLASSES, ModelConfig, build_model, pixels_to_input
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

CURVES_FILE = "training-curves.png"
CONFUSION_FILE = "confusion-matrix.png"
EVAL_BATCH = 2_000
# A black pixel as the contract prepares it: what random_shift brings in at the borders.
BLACK = pixels_to_input(torch.zeros(1, 1, dtype=torch.uint8)).item()


@dataclass
class TrainConfig:
    """Hyper-parameters; the defaults are the shipped model's recipe."""

    epochs: int = 30
    batch_size: int = 1024
    lr: float = 4e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    hflip: float = 0.0
    shift: int = 0
    bf16: bool = True
    seed: int = 0
    hidden_sizes: tuple[int, ...] = (512, 512)
    dropout: float = 0.0
    freeze: bool = False
    limit_train: int | None = None
    optimizer: str = field(default="AdamW")
    schedule: str = field(default="OneCycleLR(max_lr=lr, cosine anneal, 30% warm-up), stepped per batch")


# --------------------------------------------------------------------------- CLI


def _number(convert, what: str, accept, requirement: str):
    """An argparse ``type`` that parses with ``convert`` and refuses values ``accept`` rejects (exit 2)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    return parse


_positive_int = _number(int, "an integer", lambda v: v >= 1, "at least 1")
_non_negative_int = _number(int, "an integer", lambda v: v >= 0, "at least 0")
_positive_float = _number(float, "a number", lambda v: 0 < v < math.inf, "a positive number")  # NaN fails too
_non_negative_float = _number(float, "a number", lambda v: 0 <= v < math.inf, "a non-negative number")
_fraction = _number(float, "a number", lambda v: 0.0 <= v < 1.0, "in [0, 1)")


def _hidden_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train the Fashion-MNIST MLP and write model.safetensors + model.json (+ plots).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=_positive_int, default=defaults.epochs, help="passes over the training set")
    parser.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size, help="images per step")
    parser.add_argument("--lr", type=_positive_float, default=defaults.lr, help="peak learning rate of the schedule")
    parser.add_argument("--seed", type=_non_negative_int, default=defaults.seed, help="same seed, same weights")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda when available")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="Fashion-MNIST root in torchvision layout; unset: $FASHION_DATA or ./data, "
        f"filled from {DEBIAN_DIR} or a download when empty",
    )
    parser.add_argument(
        "--extra-data", type=Path, default=None, help="folder of your own images, one sub-folder per class name"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("models"), help="where the model is written")
    parser.add_argument("--init-from", type=Path, default=None, help="start from the model in this folder")
    parser.add_argument(
        "--freeze", action="store_true", help="with --init-from: train only the last layer (requires_grad=False)"
    )
    parser.add_argument(
        "--hidden-sizes", type=_hidden_sizes, default=defaults.hidden_sizes, metavar="H1,H2,...", help="MLP widths"
    )
    parser.add_argument("--dropout", type=_fraction, default=defaults.dropout, help="after each hidden ReLU")
    parser.add_argument(
        "--weight-decay", type=_non_negative_float, default=defaults.weight_decay, help="AdamW's decoupled decay"
    )
    parser.add_argument(
        "--label-smoothing", type=_fraction, default=defaults.label_smoothing, help="mixed into the one-hot targets"
    )
    parser.add_argument(
        "--hflip", type=_fraction, default=defaults.hflip, help="probability of mirroring a training image"
    )
    parser.add_argument(
        "--shift", type=_non_negative_int, default=defaults.shift, help="random translation of training images, pixels"
    )
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=defaults.bf16,
        help="bfloat16 autocast for the forward pass (weights and optimizer stay float32)",
    )
    parser.add_argument(
        "--limit-train", type=_positive_int, default=None, help="use only the first N training images (smoke tests)"
    )
    parser.add_argument(
        "--debian-dir", type=Path, default=DEBIAN_DIR, help="where the dataset-fashion-mnist package keeps its files"
    )
    parser.add_argument("--no-download", action="store_true", help="never try torchvision's download")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.freeze and args.init_from is None:
        parser.error("--freeze needs --init-from MODEL_DIR (there is nothing to freeze in a fresh model)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return args


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        hflip=args.hflip,
        shift=args.shift,
        bf16=args.bf16,
        seed=args.seed,
        hidden_sizes=args.hidden_sizes,
        dropout=args.dropout,
        freeze=args.freeze,
        limit_train=args.limit_train,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# --------------------------------------------------------------------------- training


def freeze_all_but_last(model: nn.Sequential) -> None:
    """requires_grad=False on every Linear but the last, which alone is retrained."""
    linears = [module for module in model if isinstance(module, nn.Linear)]
    for module in linears[:-1]:
        for parameter in module.parameters():
            parameter.requires_grad_(False)


def random_shift(inputs: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``shift`` pixels each way, filling with the background value."""
    count, _, height, width = inputs.shape
    padded = F.pad(inputs, (shift, shift, shift, shift), value=BLACK)
    dy = torch.randint(0, 2 * shift + 1, (count,), generator=generator).to(inputs.device)
    dx = torch.randint(0, 2 * shift + 1, (count,), generator=generator).to(inputs.device)
    rows = (dy[:, None] + torch.arange(height, device=inputs.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(width, device=inputs.device))[:, None, :]
    batch = torch.arange(count, device=inputs.device)[:, None, None]
    return padded[batch, 0, rows, cols].unsqueeze(1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy against one-hot (probability) targets, optionally smoothed towards uniform."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(accuracy, mean loss, confusion matrix [true, predicted]) of ``model`` on a whole split."""
    model.eval()
    correct, loss_sum = 0, 0.0
    confusion = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.long, device=inputs.device)
    for start in range(0, len(inputs), EVAL_BATCH):
        logits = model(inputs[start : start + EVAL_BATCH]).float()
        batch_labels = labels[start : start + EVAL_BATCH]
        predicted = logits.argmax(dim=1)
        correct += (predicted == batch_labels).sum().item()
        loss_sum += F.cross_entropy(logits, batch_labels, reduction="sum").item()
        confusion += torch.bincount(batch_labels * NUM_CLASSES + predicted, minlength=NUM_CLASSES * NUM_CLASSES)
    return correct / len(inputs), loss_sum / len(inputs), confusion.view(NUM_CLASSES, NUM_CLASSES).cpu()


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
) -> list[dict]:
    """The autograd loop; returns one history entry per epoch (losses, accuracies, lr, elapsed seconds)."""
    model.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        train_set, batch_size=config.batch_size, shuffle=True, generator=generator, collate_fn=collate_batch
    )
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * len(loader), pct_start=0.3
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)
    test_labels = test_set.targets.to(device)
    history = []
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        seen, correct, loss_sum = 0, 0, 0.0
        bar = _progress(loader, len(loader), f"epoch {epoch}/{config.epochs}")
        for inputs, targets in bar:
            if config.hflip > 0:
                # A mirrored garment is still the same class (off by default: it slowed convergence here).
                flip = (torch.rand(len(inputs), generator=generator) < config.hflip).to(inputs.device)
                inputs = torch.where(flip[:, None, None, None], inputs.flip(-1), inputs)
            if config.shift > 0:
                inputs = random_shift(inputs, config.shift, generator)
            with autocast:
                logits = model(inputs)
            loss = soft_cross_entropy(logits, targets, config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            # Running metrics stay on the device; one sync per epoch, not per batch.
            batch = len(inputs)
            seen += batch
            loss_sum = loss_sum + loss.detach() * batch
            correct = correct + (logits.argmax(dim=1) == targets.argmax(dim=1)).sum()
            if bar is not loader and bar.n % 20 == 0:
                bar.set_postfix(loss=f"{(loss_sum / seen).item():.4f}", acc=f"{(correct / seen).item():.4f}")
        train_loss, train_acc = (loss_sum / seen).item(), (correct / seen).item()
        test_acc, test_loss, _ = evaluate(model, test_set.inputs, test_labels)
        entry = {
            "epoch": epoch,
            "train_loss": round(train_loss, 6),
            "train_accuracy": round(train_acc, 6),
            "test_loss": round(test_loss, 6),
            "test_accuracy": test_acc,
            "lr": optimizer.param_groups[0]["lr"],
            "elapsed_s": round(time.perf_counter() - started, 3),
        }
        history.append(entry)
        log(
            f"epoch {epoch}/{config.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
            f"test loss {test_loss:.4f} acc {test_acc:.4f} | {entry['elapsed_s']:.1f}s"
        )
    return history


def fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and _cpu_has_bf16()


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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


def write_outputs(model: nn.Module, card: dict, output_dir: Path, plots: dict[str, bytes]) -> dict:
    """Plots first, then weights, then the card that names all of them; every file via temp + fsync + rename.

    A crash leaves each final name either the old or the new complete file; the card, written
    last, is the commit point, and it records the plots' hashes too.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    card = {**card, "plots": {name: sha256_bytes(data) for name, data in plots.items()}}
    for name, data in plots.items():
        write_file_atomically(output_dir / name, data)
    return save_checkpoint(model, card, output_dir)


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
        "training": {
            **{key: value for key, value in asdict(config).items() if key not in ("hidden_sizes", "dropout")},
            "loss": "cross-entropy on one-hot targets (label smoothing as above)",
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
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
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=output_dir):
        pass


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    device = resolve_device(args.device)
    # bf16 autocast only where the hardware has it (elsewhere it is slower than float32); the card says which ran.
    config.bf16 = config.bf16 and fast_bf16(device)
    torch.manual_seed(config.seed)
    root = args.data_dir if args.data_dir is not None else default_data_root()
    try:
        root, source = ensure_fashion_mnist(root, debian_dir=args.debian_dir, download=not args.no_download)
        train_set = FastFashionMNIST(root, train=True)
        test_set = FastFashionMNIST(root, train=False)
        extra = ImageFolderDataset(args.extra_data) if args.extra_data is not None else None
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        check_writable(args.output_dir)
    except OSError as error:
        print(f"error: cannot write the model to {args.output_dir}: {error.strerror or error}", file=sys.stderr)
        return 2
    data = {
        "source": source,
        "root": str(root),
        "files_sha256": file_checksums(root),
        "train_images": len(train_set),
        "test_images": len(test_set),
    }
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
        init_from = {"folder": str(args.init_from), "weights_sha256": base_card["weights"]["sha256"]}
        if args.freeze:
            freeze_all_but_last(model)
    else:
        model_config = ModelConfig(hidden_sizes=config.hidden_sizes, dropout=config.dropout)
        model = build_model(model_config)
    config.hidden_sizes, config.dropout = model_config.hidden_sizes, model_config.dropout

    started = time.perf_counter()
    print(
        f"training on {len(train_data):,} images ({source}: {root}) on {device}, "
        f"{config.epochs} epochs of batch {config.batch_size}",
        file=sys.stderr,
    )
    history = train(model, train_data, test_set, config, device, log=lambda line: print(line, file=sys.stderr))
    wall_time = time.perf_counter() - started
    accuracy, loss, confusion = evaluate(model, test_set.inputs, test_set.targets.to(device))
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
    )
    plots = {} if args.no_plots else plot_files(history, confusion)
    try:
        written = write_outputs(model.cpu(), card, args.output_dir, plots)
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
