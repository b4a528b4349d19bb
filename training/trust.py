"""Fit what lets a model say when it does not know (fashion.trust): temperature, detector, thresholds.

Runs at the end of training, on images the classifier never learned from:
- the temperature is fitted on the validation split (fashion.heldout: probe + calibration);
- the detector is trained by outlier exposure: the training images against generated
  non-garments (training/outliers.py); its threshold is the validation split's 98th percentile,
  so about 2% of real garments are flagged;
- ``low_confidence_below`` is the calibrated confidence under which the lowest-confidence
  validation images are flagged too, up to UNCERTAIN_SHARE of the split in all.
The test set is only measured, never fitted on: its figures go into the card as evidence.

    python -m training.trust MODEL_DIR [--data-dir DIR]   # fit onto a model trained without it
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fashion.contract import pixels_to_input
from fashion.trust import NOT_A_GARMENT, Judge, TrustConfig, build_detector, expected_calibration_error
from training.outliers import generate_outliers

DETECTOR_HIDDEN = 64
OUTLIERS = 18_000
DETECTOR_EPOCHS = 8
FLAGGED_GARMENTS = 0.02  # share of real validation garments the detector may call non-garments
UNCERTAIN_SHARE = 0.04  # share of validation images flagged for either reason; the test set's goal is <= 5%


def model_logits(model: nn.Module, inputs: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """The model's logits for normalized inputs, in batches, on the model's device, returned on the CPU."""
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(inputs[i : i + batch].to(device)).float().cpu() for i in range(0, len(inputs), batch)])


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimising the negative log-likelihood of softmax(logits / T) (one parameter, LBFGS on log T)."""
    logits, labels = logits.detach().clone(), labels.detach().clone()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def train_detector(garments: torch.Tensor, outliers: torch.Tensor, seed: int) -> nn.Sequential:
    """Outlier exposure: a small classifier of normalized inputs, garment (0) against generated outlier (1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        detector = build_detector(DETECTOR_HIDDEN)
    inputs = torch.cat([garments, outliers])
    targets = torch.cat([torch.zeros(len(garments)), torch.ones(len(outliers))])
    # Each class carries half the loss, however many of each there are.
    weights = torch.where(targets == 1, len(garments) / len(outliers), 1.0)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(DETECTOR_EPOCHS):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), 512):
            index = order[start : start + 512]
            logits = detector(inputs[index]).squeeze(1)
            loss = (
                F.binary_cross_entropy_with_logits(logits, targets[index], reduction="none") * weights[index]
            ).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return detector.eval()


def _low_confidence_threshold(calibrated: torch.Tensor, foreign: torch.Tensor) -> float:
    """The calibrated confidence below which the least confident unflagged images are flagged, so that
    no more than UNCERTAIN_SHARE of the split is flagged in all."""
    room = int(UNCERTAIN_SHARE * len(calibrated)) - int(foreign.sum())
    remaining = calibrated[~foreign].sort().values
    if room <= 0 or len(remaining) == 0:
        return 0.0
    return float(remaining[min(room, len(remaining) - 1)])


def _shares(judge: Judge, inputs: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict:
    with torch.inference_mode():
        verdicts = judge.judge(inputs, logits)
    flagged = torch.tensor([reason is not None for reason in verdicts.reasons])
    foreign = torch.tensor([reason == NOT_A_GARMENT for reason in verdicts.reasons])
    correct = verdicts.probabilities.argmax(dim=1) == labels
    return {
        "images": len(labels),
        "uncertain": round(float(flagged.float().mean()), 4),
        "not_a_garment": round(float(foreign.float().mean()), 4),
        "accuracy": round(float(correct.float().mean()), 4),
        "accuracy_when_certain": round(float(correct[~flagged].float().mean()), 4),
    }


def fit_trust(
    model: nn.Module,
    train_inputs: torch.Tensor,
    validation: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    seed: int = 0,
    log=print,
) -> tuple[nn.Sequential, dict]:
    """(detector, the card's trust section) for ``model``; inputs normalized [N, 1, 28, 28] on the CPU."""
    started = time.perf_counter()
    (validation_inputs, validation_labels), (test_inputs, test_labels) = validation, test
    validation_logits, test_logits = model_logits(model, validation_inputs), model_logits(model, test_inputs)
    temperature = fit_temperature(validation_logits, validation_labels)

    outliers = pixels_to_input(generate_outliers(OUTLIERS, seed))
    detector = train_detector(train_inputs, outliers, seed)
    with torch.inference_mode():
        validation_scores = detector(validation_inputs).squeeze(1)
    threshold = float(torch.quantile(validation_scores, 1 - FLAGGED_GARMENTS))
    calibrated = torch.softmax(validation_logits / temperature, dim=1).amax(dim=1)
    low_confidence_below = _low_confidence_threshold(calibrated, validation_scores > threshold)

    config = TrustConfig(temperature, low_confidence_below, DETECTOR_HIDDEN, threshold)
    judge = Judge(config, detector)
    section = {
        "temperature": round(temperature, 6),
        "low_confidence_below": low_confidence_below,
        "expected_calibration_error": {
            "bins": 15,
            "validation": {
                "before": round(expected_calibration_error(validation_logits, validation_labels), 4),
                "after": round(expected_calibration_error(validation_logits, validation_labels, temperature), 4),
            },
            "test": {
                "before": round(expected_calibration_error(test_logits, test_labels), 4),
                "after": round(expected_calibration_error(test_logits, test_labels, temperature), 4),
            },
        },
        "detector": {
            "kind": "outlier exposure: Flatten, Linear(784, hidden), ReLU, Linear(hidden, 1) on the normalized input",
            "hidden": DETECTOR_HIDDEN,
            "threshold": threshold,
            "trained_on": {"garments": len(train_inputs), "generated_outliers": OUTLIERS, "seed": seed},
            "flags_validation_share": FLAGGED_GARMENTS,
        },
        "fitted_on": f"validation split: {len(validation_labels)} held-out training images (fashion.heldout)",
        "validation": _shares(judge, validation_inputs, validation_logits, validation_labels),
        "test": _shares(judge, test_inputs, test_logits, test_labels),
        "fit_seconds": round(time.perf_counter() - started, 2),
    }
    ece, test = section["expected_calibration_error"]["test"], section["test"]
    log(
        f"trust: T={temperature:.3f}, test ECE {ece['before']:.4f} -> {ece['after']:.4f}, test uncertain "
        f"{test['uncertain']:.2%} (accuracy {test['accuracy']:.4f}, when certain {test['accuracy_when_certain']:.4f}), "
        f"{section['fit_seconds']:.1f}s"
    )
    return detector, section


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.trust", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="the model folder to fit (rewritten atomically)")
    parser.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST root (default: training's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    from fashion.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from training.data import DataError, FastFashionMNIST, default_data_root, ensure_fashion_mnist
    from training.train import hold_out

    try:
        model, card = load_checkpoint(args.model_dir)
        root, _ = ensure_fashion_mnist(args.data_dir or default_data_root(), download=False)
        train_set, test_set = FastFashionMNIST(root, train=True), FastFashionMNIST(root, train=False)
    except (CheckpointError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    validation = hold_out(train_set)
    detector, section = fit_trust(
        model,
        train_set.inputs,
        validation,
        (test_set.inputs, test_set.targets),
        args.seed,
        log=lambda line: print(line, file=sys.stderr),
    )
    card = {key: value for key, value in card.items() if key not in ("weights",)}
    card["trust"] = section
    written = save_checkpoint(model, card, args.model_dir, detector=detector)
    print(f"{args.model_dir}: trust fitted, version {written['weights']['sha256'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
