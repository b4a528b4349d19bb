#!/usr/bin/env python3
"""Write fashion/probe.safetensors: the held-out probe images of Fashion-MNIST's training split.

    python scripts/make_probe.py [--data-dir DIR] [--output fashion/probe.safetensors]

The indices are ``fashion.heldout.held_out_indices(labels)[0]`` (1,000 images, 100 per class),
so the file is a pure function of the data set and the split's seed: running this again gives the
same bytes, and tests/test_probe.py checks the shipped file against the data. Exit status 2 with
one line when the data cannot be found.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from anywhere, import this checkout's fashion package

from fashion.probe import PROBE_FILE, probe_tensors, write_probe  # noqa: E402
from training.data import DataError, default_data_root, ensure_fashion_mnist  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="Fashion-MNIST root (default $FASHION_DATA or ./data)")
    parser.add_argument("--output", type=Path, default=PROBE_FILE, help=f"default {PROBE_FILE}")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    from torchvision.datasets import FashionMNIST

    try:
        root, _ = ensure_fashion_mnist(args.data_dir or default_data_root(), download=False)
    except DataError as error:
        print(f"make_probe: {error}", file=sys.stderr)
        return 2
    train = FashionMNIST(root, train=True)
    images, labels, indices = probe_tensors(train.data, train.targets)
    digest = write_probe(args.output, images, labels, indices)
    counts = torch.bincount(labels.long(), minlength=10).tolist()
    print(f"wrote {args.output}: {len(indices)} images, per class {counts}, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
