#!/usr/bin/env python3
"""Share of each out-of-distribution set a scorer flags, at the threshold that flags 5% of the real test images.

    python scripts/ood_report.py [--model-dir models] [--scorer msp] [--seed 0] [--test-share 0.05]

The OOD sets are testing/ood.py's (non-garments through the service's own preprocessing); the in-distribution
set is the Fashion-MNIST test split ($FASHION_DATA or ./data, filled from the Debian package when needed).
A scorer maps uint8 crops [N, 28, 28] to one outlier score each (higher: less like a garment); an input is
flagged when its score is above the threshold. ``--scorer msp`` is the baseline: 1 - the maximum softmax
probability. Add a scorer to SCORERS (name -> factory(model, card) -> score function) to compare another.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: shared CPUs

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fashion.checkpoint import load_judged  # noqa: E402
from fashion.contract import pixels_to_input  # noqa: E402
from fashion.trust import NOT_A_GARMENT, Judge  # noqa: E402

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
TEST_SET = "fashion-mnist test"


@torch.inference_mode()
def logits_of(model: nn.Module, pixels: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """uint8 crops [N, 28, 28] -> the model's logits [N, classes], normalized as the service does."""
    return torch.cat([model(pixels_to_input(pixels[i : i + batch_size])) for i in range(0, len(pixels), batch_size)])


def msp_scorer(model: nn.Module, card: dict) -> ScoreFn:
    """The maximum-softmax-probability baseline: score = 1 - max softmax (higher: less confident)."""

    def score(pixels: torch.Tensor) -> torch.Tensor:
        return 1.0 - logits_of(model, pixels).softmax(dim=1).amax(dim=1)

    return score


SCORERS: dict[str, Callable[[nn.Module, dict], ScoreFn]] = {"msp": msp_scorer}


def threshold_for(scores: torch.Tensor, share: float) -> float:
    """The score above which ``share`` of ``scores`` (the in-distribution test set's) lie."""
    return float(torch.quantile(scores.double(), 1.0 - share))


def flagged_share(score_fn: ScoreFn, sets: Mapping[str, torch.Tensor], threshold: float) -> dict[str, float]:
    """Per set (name -> uint8 crops [N, 28, 28]): the share of its inputs whose score is above ``threshold``."""
    return {name: float((score_fn(pixels) > threshold).double().mean()) for name, pixels in sets.items()}


def judged(model: nn.Module, judge: Judge, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uncertain, not_a_garment) boolean masks from the model's own Judge: the thresholds in its card,
    fitted on the validation split, not on any set measured here."""
    inputs = pixels_to_input(pixels)
    with torch.inference_mode():
        reasons = judge.judge(inputs, model(inputs)).reasons
    return torch.tensor([r is not None for r in reasons]), torch.tensor([r == NOT_A_GARMENT for r in reasons])


def report_judged(model: nn.Module, judge: Judge, test, sets: Mapping) -> dict[str, float]:
    """Print and return each set's share flagged uncertain (either reason) and not_a_garment."""
    uncertain, foreign = judged(model, judge, test.data)
    correct = logits_of(model, test.data).argmax(dim=1) == test.targets
    print(f"{'set':<20} {'N':>6} {'uncertain':>10} {'not_a_garment':>14}  description")
    print(
        f"{TEST_SET:<20} {len(test.data):>6} {float(uncertain.double().mean()):>10.1%} "
        f"{float(foreign.double().mean()):>14.1%}  the real Fashion-MNIST test images"
    )
    shares = {TEST_SET: float(uncertain.double().mean())}
    flagged_total = 0
    for name, ood in sets.items():
        set_uncertain, set_foreign = judged(model, judge, ood.pixels)
        shares[name] = float(set_uncertain.double().mean())
        flagged_total += int(set_uncertain.sum())
        print(
            f"{name:<20} {len(ood):>6} {shares[name]:>10.1%} {float(set_foreign.double().mean()):>14.1%}  "
            f"{ood.description}"
        )
    total = sum(len(s) for s in sets.values())
    shares["all OOD"] = flagged_total / total
    print(f"{'all OOD':<20} {total:>6} {shares['all OOD']:>10.1%}")
    kept = ~uncertain
    print(
        f"test accuracy: {float(correct.double().mean()):.4f} overall, "
        f"{float(correct[kept].double().mean()):.4f} on the {int(kept.sum())} certain images"
    )
    return shares


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=PROJECT_ROOT / "models")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FASHION_DATA") or PROJECT_ROOT / "data"))
    parser.add_argument(
        "--scorer",
        choices=["judge", *sorted(SCORERS)],
        default="judge",
        help="judge: the model's own uncertain flags (card thresholds); msp: the softmax baseline at --test-share",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the OOD sets (testing.ood.ood_sets)")
    parser.add_argument("--test-share", type=float, default=0.05, help="share of the test set the threshold flags")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict[str, float]:
    from torchvision.datasets import FashionMNIST

    from testing.ood import ood_sets
    from training.data import ensure_fashion_mnist

    torch.set_num_threads(args.threads)

    model, card, judge = load_judged(args.model_dir)

    root, _ = ensure_fashion_mnist(args.data_dir, download=False)
    test = FashionMNIST(str(root), train=False)
    started = time.perf_counter()
    sets = ood_sets(args.seed)
    build_seconds = time.perf_counter() - started
    if args.scorer == "judge":
        print(
            f"model {args.model_dir}: its own uncertain flags; sets built in {build_seconds:.1f} s (seed {args.seed})"
        )
        return report_judged(model, judge, test, sets)
    score_fn = SCORERS[args.scorer](model, card)

    test_scores = score_fn(test.data)
    threshold = threshold_for(test_scores, args.test_share)
    flagged_test = test_scores > threshold
    predicted = logits_of(model, test.data).argmax(dim=1)
    correct = predicted == test.targets
    shares = {TEST_SET: float(flagged_test.double().mean())}
    shares |= flagged_share(score_fn, {name: s.pixels for name, s in sets.items()}, threshold)

    print(
        f"model {args.model_dir} ({card.get('architecture', {}).get('kind', '?')}), scorer {args.scorer}, "
        f"threshold {threshold:.4f} (flags {args.test_share:.0%} of the test set); OOD sets built in "
        f"{build_seconds:.1f} s (seed {args.seed})"
    )
    print(f"{'set':<20} {'N':>6} {'flagged':>8}  description")
    print(f"{TEST_SET:<20} {len(test.data):>6} {shares[TEST_SET]:>8.1%}  the real Fashion-MNIST test images")
    for name, ood in sets.items():
        print(f"{name:<20} {len(ood):>6} {shares[name]:>8.1%}  {ood.description}")
    total = sum(len(s) for s in sets.values())
    overall = sum(shares[name] * len(s) for name, s in sets.items()) / total
    shares["all OOD"] = overall
    print(f"{'all OOD':<20} {total:>6} {overall:>8.1%}")
    kept = ~flagged_test
    print(
        f"test accuracy: {float(correct.double().mean()):.4f} overall, "
        f"{float(correct[kept].double().mean()):.4f} on the {int(kept.sum())} unflagged images"
    )
    return shares


if __name__ == "__main__":
    main(parse_args())
