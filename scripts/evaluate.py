#!/usr/bin/env python3
"""An independent check of a model card's test accuracy: torchvision's own FashionMNIST test split with
its stock ToTensor and Normalize (built from the card's mean/std), the model loaded from its folder,
argmax over the 10,000 images. None of the training code's data path is used.

    python scripts/evaluate.py MODEL_DIR [--data-dir DIR]

Prints both figures; exit status 0 when they agree to the image, 1 when they do not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fashion.checkpoint import load_checkpoint
from training.data import default_data_root


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="Fashion-MNIST root (default: $FASHION_DATA or ./data)"
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    model, card = load_checkpoint(args.model_dir)
    norm = card["normalization"]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(norm["mean"], norm["std"])])
    root = args.data_dir or default_data_root()
    test_set = datasets.FashionMNIST(str(root), train=False, transform=transform, download=False)
    correct = 0
    with torch.no_grad():
        for images, labels in DataLoader(test_set, batch_size=500):
            correct += (model(images).argmax(dim=1) == labels).sum().item()
    claimed = card["metrics"]["test_accuracy"]
    measured = correct / len(test_set)
    print(f"{args.model_dir}: {correct} of {len(test_set)} right, accuracy {measured:.4f}; the card says {claimed:.4f}")
    return 0 if round(claimed * len(test_set)) == correct else 1


if __name__ == "__main__":
    sys.exit(main(parse_args()))
