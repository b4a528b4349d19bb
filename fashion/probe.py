"""The probe: 1,000 held-out images every candidate model must score on before it is served.

A model card proves that its weights are the ones it names (the SHA-256) and that they fit the
contract; it proves nothing about whether they classify. A training bug, a wrong ``--init-from``
or a bad ``--extra-data`` folder gives a model that loads fine and answers nonsense. So training
records how the model does on the probe (``probe_record``, the card's ``probe`` section), and
the service, the ``fashion-models`` CLI and the retrain gate score the candidate again
(``validate_candidate``) and refuse it when:

- its probe accuracy is below an absolute floor (``MIN_PROBE_ACCURACY``);
- its probe accuracy is more than ``MAX_PROBE_DROP`` below what its card claims: the recorded
  probe accuracy, and the test accuracy (1,000 images carry about one point of sampling noise
  against the 10,000-image test set, hence a tolerance of a few points);
- its predictions agree with the card's recorded ones on fewer than ``MIN_PROBE_AGREEMENT`` of
  the images: a card that describes other weights (or lies about these) is caught. Agreement,
  not a hash of the outputs, because a GPU and a CPU may break a near-tie differently.

The images are ``fashion.heldout.held_out_indices(labels)[0]`` of the training split
(``scripts/make_probe.py`` writes ``probe.safetensors`` from the real data), not the test set
whose numbers the card reports. Training leaves these images out (with the calibration set), so a
model has never learned from its probe.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from fashion.contract import INPUT_HEIGHT, INPUT_WIDTH, NUM_CLASSES, pixels_to_input
from fashion.policy import ValidationPolicy

PROBE_FILE = Path(__file__).with_name("probe.safetensors")
PROBE_IMAGES = 1000
# Images per forward pass: the whole probe at once for the MLP would do, but a CNN's first
# activations are 100 KB per image; 250 keeps them near 25 MB whatever the architecture.
PROBE_BATCH = 250


# Reason codes (the rejection metric's label values, the CLI's and the gate's verdicts).
NO_PROBE_RECORD = "no_probe_record"
INVALID_PROBE_RECORD = "invalid_probe_record"
PROBE_MISMATCH = "probe_mismatch"
BELOW_FLOOR = "probe_accuracy_below_floor"
BELOW_CLAIM = "probe_accuracy_below_claim"
PREDICTIONS_MISMATCH = "probe_predictions_mismatch"
REASONS = (NO_PROBE_RECORD, INVALID_PROBE_RECORD, PROBE_MISMATCH, BELOW_FLOOR, BELOW_CLAIM, PREDICTIONS_MISMATCH)


class ProbeError(RuntimeError):
    """The shipped probe file is missing or damaged: an installation problem, not the candidate's."""


class CandidateRejected(Exception):
    """A model that must not be served: ``reason`` is one of REASONS, ``message`` says why in words."""

    def __init__(self, reason: str, message: str, measured: dict | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.measured = measured
        self.version: str | None = None  # the candidate's, set by whoever loaded it (service.model)


@dataclass(frozen=True)
class ProbeSet:
    images: torch.Tensor  # uint8 [1000, 28, 28]
    labels: torch.Tensor  # int64 [1000]
    indices: torch.Tensor  # int64 [1000], into the training split
    sha256: str  # of the file's bytes: what a card's probe record names
    inputs: torch.Tensor  # the images normalized as the model sees them, float32 [1000, 1, 28, 28]


# --------------------------------------------------------------------------- the file


def probe_tensors(train_images: torch.Tensor, train_labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(images uint8, labels int64, indices int64) of the probe, from the whole training split."""
    from fashion.heldout import held_out_indices

    indices = held_out_indices(train_labels)[0].to(torch.int64)
    return train_images[indices].to(torch.uint8).contiguous(), train_labels[indices].to(torch.int64), indices


def write_probe(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> str:
    """Write the probe file (atomically); return the SHA-256 of its bytes."""
    from fashion.checkpoint import write_file_atomically

    data = save_safetensors(
        {"images": images.contiguous(), "labels": labels.contiguous(), "indices": indices.contiguous()},
        # One metadata entry: safetensors writes a map of several in no fixed order, and the file
        # must be the same bytes on every run (its SHA-256 is what cards name).
        metadata={"selection": "fashion-mnist train split, fashion.heldout.held_out_indices(labels)[0]"},
    )
    write_file_atomically(Path(path), data)
    return hashlib.sha256(data).hexdigest()


@functools.cache
def load_probe(path: str | os.PathLike = PROBE_FILE) -> ProbeSet:
    """The probe set, read and checked once per process (about 0.8 MB)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ProbeError(f"the probe set {path} cannot be read: {error.strerror}") from None
    try:
        tensors = load_safetensors(data)
        images, labels, indices = tensors["images"], tensors["labels"].to(torch.int64), tensors["indices"]
    except Exception as error:
        raise ProbeError(f"the probe set {path} is not the expected safetensors file: {error}") from None
    if (
        images.dtype != torch.uint8
        or tuple(images.shape) != (PROBE_IMAGES, INPUT_HEIGHT, INPUT_WIDTH)
        or tuple(labels.shape) != (PROBE_IMAGES,)
        or tuple(indices.shape) != (PROBE_IMAGES,)
        or not bool(((labels >= 0) & (labels < NUM_CLASSES)).all())
    ):
        raise ProbeError(f"the probe set {path} does not hold {PROBE_IMAGES} labelled 28x28 uint8 images")
    return ProbeSet(images, labels, indices, hashlib.sha256(data).hexdigest(), pixels_to_input(images))


# --------------------------------------------------------------------------- scoring


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def probe_predictions(model: nn.Module, probe: ProbeSet | None = None) -> torch.Tensor:
    """The model's argmax class for each probe image, int64 [1000] on the CPU (eval mode, no autograd)."""
    probe = probe or load_probe()
    device = _device_of(model)
    was_training = model.training
    model.eval()  # dropout off, BatchNorm on its running statistics: as served
    try:
        with torch.inference_mode():
            parts = [
                model(batch.to(device, non_blocking=True)).argmax(dim=1).cpu()
                for batch in probe.inputs.split(PROBE_BATCH)
            ]
    finally:
        model.train(was_training)
    return torch.cat(parts)


def _digits(predictions: torch.Tensor) -> str:
    return "".join(map(str, predictions.tolist()))


def probe_record(model: nn.Module) -> dict:
    """What a model card records under ``probe``: which probe, the accuracy on it, every prediction."""
    probe = load_probe()
    predictions = probe_predictions(model, probe)
    return {
        "images": PROBE_IMAGES,
        "sha256": probe.sha256,
        "accuracy": (predictions == probe.labels).sum().item() / PROBE_IMAGES,
        # One digit per image, in the file's order: the argmax a validator must reproduce.
        "predictions": _digits(predictions),
    }


# --------------------------------------------------------------------------- the rule


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _recorded(card: dict, probe: ProbeSet) -> tuple[float, str]:
    """The card's (recorded accuracy, recorded predictions), or CandidateRejected saying what is wrong."""
    record = card.get("probe")
    if record is None:
        raise CandidateRejected(
            NO_PROBE_RECORD, "the model card has no probe record (train with this version, or retrain the model)"
        )
    if not isinstance(record, dict):
        raise CandidateRejected(INVALID_PROBE_RECORD, "the card's probe record is not a JSON object")
    if record.get("sha256") != probe.sha256:
        raise CandidateRejected(
            PROBE_MISMATCH,
            f"the card was scored on another probe set (sha256 {str(record.get('sha256'))[:12]}…, "
            f"this package's is {probe.sha256[:12]}…)",
        )
    accuracy, predictions = _number(record.get("accuracy")), record.get("predictions")
    if accuracy is None or not 0.0 <= accuracy <= 1.0:
        raise CandidateRejected(INVALID_PROBE_RECORD, "the card's probe accuracy is not a number between 0 and 1")
    if not isinstance(predictions, str) or len(predictions) != PROBE_IMAGES or not predictions.isdigit():
        raise CandidateRejected(
            INVALID_PROBE_RECORD, f"the card's probe predictions are not {PROBE_IMAGES} class digits"
        )
    return accuracy, predictions


def validate_candidate(model: nn.Module, card: dict, policy: ValidationPolicy | None = None) -> dict:
    """Score ``model`` on the probe and judge it against ``card`` and ``policy``.

    Returns ``{"accuracy", "agreement", "seconds"}`` for an accepted candidate; raises
    CandidateRejected (with the same figures as ``measured`` when they were taken) otherwise.
    The checks run in this order: the record exists and names this probe; the floor (needs no
    trust in the card); the claims; the agreement with the recorded predictions.
    """
    policy = policy or ValidationPolicy()
    probe = load_probe()
    claimed_probe, recorded = _recorded(card, probe)
    started = time.perf_counter()
    predictions = probe_predictions(model, probe)
    accuracy = (predictions == probe.labels).sum().item() / PROBE_IMAGES
    agreement = sum(a == b for a, b in zip(_digits(predictions), recorded, strict=True)) / PROBE_IMAGES
    measured = {"accuracy": accuracy, "agreement": agreement, "seconds": round(time.perf_counter() - started, 4)}
    if accuracy < policy.min_accuracy:
        raise CandidateRejected(
            BELOW_FLOOR,
            f"probe accuracy {accuracy:.3f} is below the floor {policy.min_accuracy:g} (MIN_PROBE_ACCURACY)",
            measured,
        )
    metrics = card.get("metrics")
    claimed_test = _number(metrics.get("test_accuracy")) if isinstance(metrics, dict) else None
    for what, claim in (("recorded probe accuracy", claimed_probe), ("test accuracy", claimed_test)):
        # Rounded to a millionth so that a drop of exactly MAX_PROBE_DROP is still allowed.
        if claim is not None and round(claim - accuracy, 6) > policy.max_drop:
            raise CandidateRejected(
                BELOW_CLAIM,
                f"probe accuracy {accuracy:.3f} is more than {policy.max_drop:g} (MAX_PROBE_DROP) below "
                f"the card's {what} {claim:.4f}",
                measured,
            )
    if agreement < policy.min_agreement:
        raise CandidateRejected(
            PREDICTIONS_MISMATCH,
            f"only {agreement:.3f} of the probe predictions match the card's recorded ones "
            f"(at least {policy.min_agreement:g} required, MIN_PROBE_AGREEMENT): the card does not describe "
            "these weights",
            measured,
        )
    return measured
