"""Predict from the command line, with no server: ``fashion-predict IMAGE... [--model-dir DIR] [--top-k K] [--json]``.

The same path as the service, step for step: fashion.images decodes within the same limits (and
refuses with the same messages), fashion.contract turns each image into the 28x28 input, the model
is loaded verified (fashion.checkpoint) and refused when its probe says it does not work
(fashion.probe, with the service's MIN_PROBE_* variables), and fashion.trust says which answers not to trust.

Exit status: 0 every image answered; 2 bad usage, an unreadable or refused image, or a model
folder that cannot be served (one line on stderr saying which and why).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from fashion.checkpoint import CheckpointError, load_judged
from fashion.contract import CLASS_NAMES, INVERT_MODES, NUM_CLASSES, pixel_rows_to_input, preprocessed_row
from fashion.images import DEFAULT_MAX_PIXELS, ImageError, decode_images
from fashion.probe import CandidateRejected, ProbeError, ValidationPolicy, validate_candidate

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models"
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a tool SIGPIPE ended


class PredictError(Exception):
    """An input or model the command refuses, with the reason in words."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fashion-predict", description="Classify clothing images with the served model, without a server."
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG, JPEG, GIF, BMP, TIFF or WebP files")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="model folder (default: models/)")
    parser.add_argument(
        "--top-k", type=int, default=0, metavar="K", help=f"also list the K best classes (1-{NUM_CLASSES})"
    )
    parser.add_argument("--invert", choices=INVERT_MODES, default="auto", help="background handling, as ?invert=")
    parser.add_argument("--json", action="store_true", help="one JSON object per image, as /predict answers")
    args = parser.parse_args(argv)
    if not 0 <= args.top_k <= NUM_CLASSES:
        parser.error(f"--top-k must be between 0 and {NUM_CLASSES}, got {args.top_k}")
    return args


def decode(path: Path, invert: str) -> bytes:
    """One image file -> the 784 preprocessed pixels the model sees (the service's general path)."""
    try:
        blob = path.read_bytes()
    except OSError as error:
        raise PredictError(f"{path}: cannot be read: {error.strerror}") from None
    try:
        (image,) = decode_images([blob], DEFAULT_MAX_PIXELS)
        return preprocessed_row(image, invert)
    except ImageError as error:
        raise PredictError(f"{path}: {error}") from None


def answer(path: Path, probabilities: list[float], calibrated: float, reason: str | None, top_k: int) -> dict:
    """The answer for one image, with /predict's field names."""
    class_id = max(range(NUM_CLASSES), key=probabilities.__getitem__)
    result = {
        "image": str(path),
        "label": CLASS_NAMES[class_id],
        "class_id": class_id,
        "confidence": probabilities[class_id],
        "calibrated_confidence": calibrated,
        "uncertain": reason is not None,
    }
    if reason is not None:
        result["reason"] = reason
    result["probabilities"] = dict(zip(CLASS_NAMES, probabilities, strict=True))
    if top_k:
        order = sorted(range(NUM_CLASSES), key=probabilities.__getitem__, reverse=True)[:top_k]
        result["top_k"] = [{"label": CLASS_NAMES[i], "class_id": i, "probability": probabilities[i]} for i in order]
    return result


def line(result: dict) -> str:
    """One answer for people: path, label, calibrated confidence, and the doubt if any."""
    text = f"{result['image']}: {result['label']} ({result['calibrated_confidence']:.1%})"
    if result["uncertain"]:
        text += f"  uncertain: {result['reason'].replace('_', ' ')}"
    for entry in result.get("top_k", []):
        text += f"\n    {entry['label']:<12} {entry['probability']:.4f}"
    return text


def predict(args: argparse.Namespace) -> list[dict]:
    """The answers for ``args.images``, or PredictError naming the first file or model it refuses."""
    rows = [decode(path, args.invert) for path in args.images]
    try:
        policy = ValidationPolicy.from_env()
        model, card, judge = load_judged(args.model_dir)
        validate_candidate(model, card, policy)  # what the service would refuse to serve, this refuses to run
    except ValueError as error:
        raise PredictError(str(error)) from None
    except (CheckpointError, ProbeError) as error:
        raise PredictError(f"--model-dir {args.model_dir}: {error}") from None
    except CandidateRejected as rejection:
        raise PredictError(f"--model-dir {args.model_dir}: refused ({rejection.reason}): {rejection.message}") from None
    inputs = pixel_rows_to_input(rows)
    with torch.inference_mode():
        verdicts = judge.judge(inputs, model(inputs))
    return [
        answer(path, probabilities, calibrated, reason, args.top_k)
        for path, probabilities, calibrated, reason in zip(
            args.images, verdicts.probabilities.tolist(), verdicts.calibrated, verdicts.reasons, strict=True
        )
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = predict(args)
    except PredictError as error:
        print(f"fashion-predict: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        for result in results:
            print(json.dumps(result) if args.json else line(result))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader stopped early (`| head`): no traceback. Python's docs' recipe: send what is still
        # buffered to devnull, or the flush at exit raises again; exit as a tool killed by SIGPIPE does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return 0


if __name__ == "__main__":
    sys.exit(main())
