"""Fashion-MNIST and user-image datasets, with the inputs transformed once instead of per item per epoch.

Where the Fashion-MNIST files come from, in order:

1. the data root (``--data-dir DIR``, else ``$FASHION_DATA``, else ``./data``) in torchvision's
   layout ``<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``;
2. the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*.gz``),
   decompressed once into the data root (its gzip bytes differ from torchvision's, the contents don't);
3. torchvision's download into the data root, when the network allows.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.datasets import FashionMNIST

from fashion.contract import (
    CLASS_NAMES,
    FEATURE_TRANSFORM,
    INPUT_HEIGHT,
    INPUT_WIDTH,
    NUM_CLASSES,
    InvertMode,
    one_hot,
    preprocess,
)
from fashion.images import ImageError, decode_image

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
EXPECTED_SIZES = {True: 60_000, False: 10_000}


class DataError(RuntimeError):
    """Data that cannot be used, with what to do about it in words (the CLI exits 2 with it)."""


def default_data_root() -> Path:
    """``$FASHION_DATA`` when set, else ``data/`` in the current directory."""
    return Path(os.environ.get("FASHION_DATA") or "data")


def raw_folder(root: str | os.PathLike) -> Path:
    return Path(root) / "FashionMNIST" / "raw"


def _has_raw_files(root: Path) -> bool:
    return all((raw_folder(root) / name).is_file() for name in RAW_FILES)


def _decompress_debian(debian_dir: Path, root: Path) -> bool:
    """Decompress the Debian package's files into ``root``; False when they are not installed."""
    sources = [debian_dir / f"{name}.gz" for name in RAW_FILES]
    if not all(source.is_file() for source in sources):
        return False
    target_dir = raw_folder(root)
    target_dir.mkdir(parents=True, exist_ok=True)
    for source, name in zip(sources, RAW_FILES, strict=True):
        target = target_dir / name
        if target.is_file():
            continue
        # A temporary name + rename, so an interrupted run never leaves a truncated file that looks complete.
        fd, tmp = tempfile.mkstemp(dir=target_dir, prefix=f".{name}.", suffix=".tmp-write")
        try:
            with os.fdopen(fd, "wb") as out, gzip.open(source, "rb") as compressed:
                os.fchmod(out.fileno(), 0o644)  # mkstemp's 0600 would hide the data from other users/containers
                shutil.copyfileobj(compressed, out, 1 << 20)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return True


def _download(root: Path) -> str | None:
    """Try torchvision's download into ``root``; None on success, else the reason."""
    chatter = io.StringIO()  # torchvision prints progress and per-mirror failures; we report one line instead
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            for train in (True, False):
                FashionMNIST(root, train=train, download=True)
    except Exception as error:  # URLError, RuntimeError, OSError, ... all mean "no data this way"
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        return first_line
    return None


def missing_data_message(root: Path, debian_dir: Path, download_reason: str | None) -> str:
    why = f" (it failed: {download_reason})" if download_reason else " (not attempted: --no-download)"
    return (
        f"Fashion-MNIST was not found. Provide it in one of three ways:\n"
        f"  1. --data-dir DIR pointing at a folder with torchvision's layout, DIR/FashionMNIST/raw/"
        f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte (looked in {root.resolve()});\n"
        f"  2. install the Debian package: sudo apt-get install dataset-fashion-mnist (looked in {debian_dir});\n"
        f"  3. allow network access so torchvision can download it into the data root{why}."
    )


def ensure_fashion_mnist(
    root: str | os.PathLike | None = None, *, debian_dir: str | os.PathLike = DEBIAN_DIR, download: bool = True
) -> tuple[Path, str]:
    """Make sure the raw files are in ``root``; return (root, source) or raise DataError naming the three ways."""
    root = Path(root) if root is not None else default_data_root()
    debian_dir = Path(debian_dir)
    if _has_raw_files(root):
        return root, "data-root"
    try:
        if _decompress_debian(debian_dir, root):
            return root, "debian"
    except OSError as error:
        raise DataError(f"cannot decompress {debian_dir} into {raw_folder(root)}: {error}") from None
    reason = _download(root) if download else None
    if download and reason is None and _has_raw_files(root):
        return root, "download"
    raise DataError(missing_data_message(root, debian_dir, reason))


def file_checksums(root: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of each raw data file, for the model card."""
    checksums = {}
    for name in RAW_FILES:
        digest = hashlib.sha256()
        with open(raw_folder(root) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        checksums[name] = digest.hexdigest()
    return checksums


# --------------------------------------------------------------------------- batched datasets


class BatchFetchMixin:
    """Item and batch access for datasets holding ready ``inputs`` and one-hot ``target_vectors`` tensors.

    DataLoader calls ``__getitems__`` with a whole batch of indices, so a batch is two tensor
    gathers instead of ``batch_size`` Python calls; ``collate_batch`` passes it through.
    """

    inputs: torch.Tensor
    target_vectors: torch.Tensor

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.target_vectors[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long, device=self.inputs.device)
        # index_select copies whole rows (0.27 against 0.46 ms for a batch of 1,024 on 2 threads).
        return self.inputs.index_select(0, index), self.target_vectors.index_select(0, index)

    def to(self, device: str | torch.device):
        """Move the prepared tensors (e.g. onto the GPU, so batches never cross the bus)."""
        self.inputs = self.inputs.to(device)
        self.target_vectors = self.target_vectors.to(device)
        return self


def collate_batch(batch):
    """DataLoader collate_fn for batches that ``__getitems__`` already stacked."""
    return batch


class FastFashionMNIST(BatchFetchMixin, FashionMNIST):
    """torchvision's FashionMNIST with FEATURE_TRANSFORM / one_hot applied once to the whole split.

    ``__getitem__`` returns exactly what the per-item transforms would (tests check it bit for
    bit); the transforms stay attached so ``per_item(i)`` can still run them.
    """

    def __init__(self, root: str | os.PathLike, train: bool = True, download: bool = False) -> None:
        super().__init__(root, train=train, download=download, transform=FEATURE_TRANSFORM, target_transform=one_hot)
        expected = EXPECTED_SIZES[train]
        if tuple(self.data.shape) != (expected, INPUT_HEIGHT, INPUT_WIDTH):
            raise DataError(
                f"{raw_folder(root)} holds {tuple(self.data.shape)} images, "
                f"expected ({expected}, {INPUT_HEIGHT}, {INPUT_WIDTH}): "
                "delete the folder and run again"
            )
        # The per-item transform itself, applied to the whole split at once (v2 transforms take batches).
        self.inputs = FEATURE_TRANSFORM(self.data.unsqueeze(1))
        self.target_vectors = F.one_hot(self.targets, NUM_CLASSES).to(torch.float32)

    @property
    def raw_folder(self) -> str:
        # torchvision derives the folder from the class name; keep FashionMNIST's.
        return str(raw_folder(self.root))

    @property
    def processed_folder(self) -> str:
        return str(Path(self.root) / "FashionMNIST" / "processed")

    def per_item(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stock torchvision path: PIL image -> transform, label -> target_transform."""
        return FashionMNIST.__getitem__(self, index)


class TensorBatchDataset(BatchFetchMixin, Dataset):
    """Several prepared datasets concatenated (Fashion-MNIST plus a user's folder), still batch-fetched."""

    def __init__(self, parts: Sequence[BatchFetchMixin]) -> None:
        self.inputs = torch.cat([part.inputs for part in parts])
        self.target_vectors = torch.cat([part.target_vectors for part in parts])

    def __len__(self) -> int:
        return len(self.inputs)


# --------------------------------------------------------------------------- user images


def _folder_key(name: str) -> str:
    """Folder name -> comparison key: case, spaces and punctuation ignored ("T-shirt_top" == "t-shirt-top")."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


FOLDER_CLASSES = {_folder_key(name): index for index, name in enumerate(CLASS_NAMES)}


def class_index_for_folder(name: str) -> int | None:
    return FOLDER_CLASSES.get(_folder_key(name))


class ImageFolderDataset(BatchFetchMixin, Dataset):
    """A user's labelled images: ``DIR/<class name>/<any image>``, one sub-folder per class.

    Folder names match CLASS_NAMES ignoring case, spaces and punctuation, so "T-shirt/top" is
    spelled ``T-shirt_top``, ``t-shirt-top`` or ``tshirttop`` and "Ankle boot" ``Ankle boot`` or
    ``ankle_boot``. Not every class needs a folder. Every image is decoded and preprocessed
    (``fashion.contract.preprocess``, as the service does) here in the constructor, so a bad
    file stops the run before training with an error naming it. Hidden files are ignored.
    """

    def __init__(self, root: str | os.PathLike, invert: InvertMode = "auto") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"extra data folder {self.root} does not exist or is not a folder")
        self.samples: list[tuple[Path, int]] = []
        entries = sorted(p for p in self.root.iterdir() if not p.name.startswith("."))
        for entry in entries:
            if not entry.is_dir():
                raise DataError(f"{entry}: expected only class folders in {self.root}, found a file")
            label = class_index_for_folder(entry.name)
            if label is None:
                allowed = ", ".join(name.replace("/", "_") for name in CLASS_NAMES)
                raise DataError(f"{entry}: unknown class folder {entry.name!r}; class folders are: {allowed}")
            files = sorted(p for p in entry.iterdir() if not p.name.startswith("."))
            if not files:
                raise DataError(f"{entry}: class folder is empty")
            for file in files:
                if not file.is_file():
                    raise DataError(f"{file}: expected image files in {entry}, found a folder")
                self.samples.append((file, label))
        if not self.samples:
            raise DataError(f"{self.root}: no class folders with images found")
        inputs = []
        self._sha256: dict[str, str] = {}
        for file, _ in self.samples:
            try:
                data = file.read_bytes()
                inputs.append(preprocess(decode_image(data), invert=invert))
            except ImageError as error:
                raise DataError(f"{file}: cannot use this image: {error}") from None
            except OSError as error:
                raise DataError(f"{file}: cannot read: {error.strerror or error}") from None
            self._sha256[str(file.relative_to(self.root))] = hashlib.sha256(data).hexdigest()
        self.inputs = torch.stack(inputs)
        self.targets = torch.tensor([label for _, label in self.samples], dtype=torch.long)
        self.target_vectors = F.one_hot(self.targets, NUM_CLASSES).to(torch.float32)

    def __len__(self) -> int:
        return len(self.samples)

    def checksums(self) -> dict[str, str]:
        """SHA-256 of every image as it was read and trained on, keyed by its path relative to the folder."""
        return dict(self._sha256)
