"""Accuracy of the served model per image encoding, next to the plain 28x28 PNGs.

Every encoding in testing/realimages.py (product-style photos made from real test images:
dark garment on a light background, larger, with margins; RGBA cut-outs, palette, 16-bit,
CMYK, JPEG, WebP, GIF, BMP, TIFF, EXIF-rotated) goes through the service's own decoding and
preprocessing (service.app.to_inputs) and the bundled model, in process.

    python benchmarks/real_images.py [--model-dir models] [--images 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

import numpy as np  # noqa: E402
from torchvision.datasets import FashionMNIST  # noqa: E402

from fashion.images import DEFAULT_MAX_PIXELS  # noqa: E402
from service.model import ModelRunner  # noqa: E402
from service.web import to_inputs  # noqa: E402
from testing.realimages import ENCODINGS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=PROJECT_ROOT / "models")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FASHION_DATA") or PROJECT_ROOT / "data"))
    parser.add_argument("--images", type=int, default=1000, help="test images per encoding (evenly spaced)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict[str, float]:
    runner = ModelRunner(args.model_dir, "cpu", reload_interval=0)
    if not runner.load():
        raise SystemExit(runner.reason)
    test_set = FashionMNIST(str(args.data_dir), train=False)
    indices = np.linspace(0, len(test_set) - 1, args.images).round().astype(int)
    pixels, labels = test_set.data.numpy()[indices], test_set.targets.numpy()[indices]
    results = {}
    print(f"{'encoding':<30} | accuracy | vs plain | mean bytes | preprocessing ms/image")
    plain = None
    for name, encode in ENCODINGS.items():
        blobs = [encode(p) for p in pixels]
        started = time.perf_counter()
        predicted = []
        for start in range(0, len(blobs), 64):
            batch = to_inputs(blobs[start : start + 64], "auto", DEFAULT_MAX_PIXELS)
            predicted += runner.predict(runner.require(), batch).probabilities.argmax(1).tolist()
        seconds = time.perf_counter() - started
        accuracy = float(np.mean(np.array(predicted) == labels))
        plain = accuracy if plain is None else plain
        results[name] = accuracy
        print(
            f"{name:<30} | {accuracy:8.3f} | {accuracy - plain:+8.3f} | {np.mean([len(b) for b in blobs]):10,.0f} | "
            f"{seconds / len(blobs) * 1000:.2f}"
        )
    return results


if __name__ == "__main__":
    main(parse_args())
