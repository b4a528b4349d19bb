"""When a prediction should not be trusted: calibrated confidence and a not-a-garment detector.

A classifier answers every input with one of its ten classes, a blank page and a cat included.
Two things travel with each model (fitted by training on held-out images, stored in its card and
weights file) so that every answer can say when it does not know:

- **temperature** ``T``: ``softmax(logits / T)`` is the *calibrated* probability, fitted on the
  validation split (fashion.heldout) by minimising its negative log-likelihood. The card keeps the
  expected calibration error (ECE) before and after.
- **a detector**: a small network on the model's input pixels that scores how unlike a garment an
  input is, trained by outlier exposure (real training images against generated non-garments:
  noise, textures, glyphs, scribbles, shapes, blobs; see training/outliers.py). An input scoring
  above ``ood_threshold`` (the validation split's 98th percentile) is ``not_a_garment``.

An answer is then ``uncertain`` with reason ``not_a_garment`` when the detector flags it, else
``low_confidence`` when the calibrated confidence is below ``low_confidence_below`` (also chosen on
the validation split), else certain. Training, the service and ``fashion-predict`` all judge
through ``Judge``, so they agree.

A model without this section in its card (an old one, a hand-made test model) is judged with
``T = 1`` and no detector: its answers are never flagged.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fashion.contract import INPUT_HEIGHT, INPUT_WIDTH

NOT_A_GARMENT = "not_a_garment"
LOW_CONFIDENCE = "low_confidence"
REASONS = (NOT_A_GARMENT, LOW_CONFIDENCE)
# Keys of the detector's tensors in the model's safetensors file, beside the classifier's.
DETECTOR_PREFIX = "detector."


def build_detector(hidden: int) -> nn.Sequential:
    """The not-a-garment scorer: normalized input [N, 1, 28, 28] -> one logit per image (higher: less garment)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(INPUT_HEIGHT * INPUT_WIDTH, hidden), nn.ReLU(), nn.Linear(hidden, 1))


@dataclass(frozen=True)
class TrustConfig:
    """The card's ``trust`` numbers that judge an answer (the rest of that section is the evidence)."""

    temperature: float = 1.0
    low_confidence_below: float = 0.0
    detector_hidden: int | None = None
    ood_threshold: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature!r}")
        if not 0.0 <= self.low_confidence_below <= 1.0:
            raise ValueError(f"low_confidence_below must be in [0, 1], got {self.low_confidence_below!r}")
        if (self.detector_hidden is None) != (self.ood_threshold is None):
            raise ValueError("detector_hidden and ood_threshold come together")
        if self.detector_hidden is not None and int(self.detector_hidden) < 1:
            raise ValueError(f"detector_hidden must be positive, got {self.detector_hidden!r}")

    @classmethod
    def from_card(cls, card: Mapping) -> TrustConfig:
        """The card's trust section, or the neutral judge (T = 1, no detector) when it has none."""
        section = card.get("trust")
        if section is None:
            return cls()
        if not isinstance(section, Mapping):
            raise ValueError("the card's trust section is not an object")
        detector = section.get("detector") or {}
        return cls(
            temperature=float(section.get("temperature", 1.0)),
            low_confidence_below=float(section.get("low_confidence_below", 0.0)),
            detector_hidden=int(detector["hidden"]) if "hidden" in detector else None,
            ood_threshold=float(detector["threshold"]) if "threshold" in detector else None,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Verdicts:
    """One batch's answers: raw softmax, calibrated confidence of the argmax, and why each is uncertain."""

    probabilities: torch.Tensor  # [N, 10] softmax(logits), the model's own numbers
    calibrated: list[float]  # per image: softmax(logits / T) at the argmax
    reasons: list[str | None]  # per image: None (certain), NOT_A_GARMENT or LOW_CONFIDENCE

    def rows(self, start: int, end: int) -> Verdicts:
        """The verdicts of images ``start:end`` (a batch's share of a larger one)."""
        return Verdicts(self.probabilities[start:end], self.calibrated[start:end], self.reasons[start:end])


class Judge:
    """Turns a batch's inputs and logits into Verdicts; one per loaded model."""

    def __init__(self, config: TrustConfig, detector: nn.Module | None = None) -> None:
        if (detector is None) != (config.detector_hidden is None):
            raise ValueError("a detector needs its threshold in the card, and a threshold its detector")
        self.config = config
        self.detector = detector.eval() if detector is not None else None
        self.inverse_temperature = 1.0 / config.temperature
        self._unpack_detector()

    def _unpack_detector(self) -> None:
        """The detector's tensors, for calling its arithmetic directly (ood_scores)."""
        if self.detector is None:
            return
        _, first, _, last = self.detector  # Flatten, Linear, ReLU, Linear(hidden, 1)
        self._first_weight, self._first_bias = first.weight.detach(), first.bias.detach()
        self._last_weight, self._last_bias = last.weight.detach()[0], float(last.bias.detach()[0])

    @classmethod
    def neutral(cls) -> Judge:
        """T = 1, no detector: never flags (a model whose card has no trust section)."""
        return cls(TrustConfig())

    def to(self, device: torch.device) -> Judge:
        if self.detector is not None:
            self.detector.to(device)
            self._unpack_detector()
        return self

    def ood_scores(self, inputs: torch.Tensor) -> list[float] | None:
        """The detector's logits, one per normalized input (None without a detector)."""
        if self.detector is None:
            return None
        # The detector's own arithmetic (Flatten, Linear, ReLU, Linear) in three calls, without
        # nn.Module.__call__'s hook machinery: for one image, each torch call costs more than its
        # arithmetic (50k multiply-adds in all).
        hidden = torch.relu_(F.linear(inputs.reshape(len(inputs), -1), self._first_weight, self._first_bias))
        return [score + self._last_bias for score in torch.mv(hidden, self._last_weight).tolist()]

    def judge(self, inputs: torch.Tensor, logits: torch.Tensor) -> Verdicts:
        """Call under torch.inference_mode, with ``inputs`` and ``logits`` on the model's device."""
        probabilities = torch.softmax(logits, dim=1)
        # max softmax(z / T) = 1 / sum(exp((z - max z) / T)). For a few images in plain Python on the ten
        # logits (one torch call instead of six; a single image is the common request), else in torch.
        if len(logits) <= 8:
            inverse_t = self.inverse_temperature
            calibrated = [
                1.0 / sum(math.exp((value - top) * inverse_t) for value in row)
                for row in logits.tolist()
                for top in (max(row),)
            ]
        else:
            shifted = (logits - logits.amax(dim=1, keepdim=True)).mul_(self.inverse_temperature)
            calibrated = shifted.exp_().sum(dim=1).reciprocal_().tolist()
        below, threshold = self.config.low_confidence_below, self.config.ood_threshold
        scores = self.ood_scores(inputs)
        if scores is None:
            scores, threshold = [0.0] * len(calibrated), math.inf
        reasons = [
            NOT_A_GARMENT if score > threshold else LOW_CONFIDENCE if confidence < below else None
            for score, confidence in zip(scores, calibrated, strict=True)
        ]
        return Verdicts(probabilities.cpu(), calibrated, reasons)


def split_state(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """A weights file's tensors -> (the classifier's, the detector's without the prefix)."""
    model, detector = {}, {}
    for name, tensor in state.items():
        if name.startswith(DETECTOR_PREFIX):
            detector[name[len(DETECTOR_PREFIX) :]] = tensor
        else:
            model[name] = tensor
    return model, detector


def expected_calibration_error(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, bins: int = 15
) -> float:
    """ECE with ``bins`` equal-width confidence bins: the mean |confidence - accuracy|, weighted by bin size."""
    confidence, predicted = torch.softmax(logits.float() / temperature, dim=1).max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in itertools.pairwise(edges):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            error += in_bin.float().mean().item() * abs(
                confidence[in_bin].mean().item() - correct[in_bin].mean().item()
            )
    return error
