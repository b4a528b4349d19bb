"""Small models with known weights, saved as real checkpoints, for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import requests
import torch

from fashion.checkpoint import load_checkpoint, read_card, save_checkpoint
from fashion.contract import CLASS_NAMES, NUM_CLASSES, ModelConfig, build_model, pixels_to_input
from fashion.probe import probe_record
from testing.images import png

# Hand-set and untrained models score about chance on the probe (fashion/probe.py), far below the
# service's floor. Servers and apps that serve them lower the floor with this, explicitly; the
# checks against the card's claims and recorded predictions still apply to them.
TOY_MODEL_ENV = {"MIN_PROBE_ACCURACY": "0"}


def save_model(model: torch.nn.Module, card: dict, path: Path) -> dict:
    """save_checkpoint with an honest probe record, computed on these weights as training does."""
    return save_checkpoint(model, {**card, "probe": probe_record(model)}, path)


def random_model_dir(path: Path, seed: int = 0, hidden_sizes: tuple[int, ...] = (64,)) -> Path:
    """A small MLP with seeded random weights: real, varied probabilities for comparisons.

    Its card claims as test accuracy what it scores on the probe (held-out images drawn like the
    test set): an honest estimate, so the validation's claim check passes without a loosened rule."""
    torch.manual_seed(seed)
    config = ModelConfig(hidden_sizes=hidden_sizes)
    model = build_model(config)
    record = probe_record(model)
    card = {"architecture": config.to_dict(), "metrics": {"test_accuracy": record["accuracy"]}, "probe": record}
    save_checkpoint(model, card, path)
    return path


def known_answer_model_dir(path: Path) -> Path:
    """Hand-set weights whose logits are 0, 1, ..., 9 for every input.

    The first layer ignores the pixels (zero weights) and its bias is 0..9, ReLU keeps those,
    and the output layer is the identity, so the probabilities are softmax([0..9]) exactly.
    """
    config = ModelConfig(hidden_sizes=(NUM_CLASSES,))
    model = build_model(config)
    with torch.no_grad():
        hidden, output = model[1], model[3]
        hidden.weight.zero_()
        hidden.bias.copy_(torch.arange(NUM_CLASSES, dtype=torch.float32))
        output.weight.copy_(torch.eye(NUM_CLASSES))
        output.bias.zero_()
    # It always answers "Ankle boot", one class in ten of the balanced test set: accuracy 0.1 exactly.
    save_model(model, {"architecture": config.to_dict(), "metrics": {"test_accuracy": 0.1}}, path)
    return path


def known_probabilities() -> np.ndarray:
    """softmax([0, 1, ..., 9]) in float32, computed the way torch does."""
    return torch.softmax(torch.arange(NUM_CLASSES, dtype=torch.float32), dim=0).numpy()


def offline_probabilities(model_dir: Path, pixels: torch.Tensor) -> torch.Tensor:
    """The softmax of the checkpoint in ``model_dir`` for uint8 [N, 28, 28] ``pixels``, computed here, not served."""
    model, _ = load_checkpoint(model_dir)
    with torch.inference_mode():
        return torch.softmax(model(pixels_to_input(pixels)), dim=1)


def assert_serves_like_offline(url: str, model_dir: Path, pixels: torch.Tensor) -> list[dict]:
    """POST each image to ``url``/predict as a PNG and require the offline model's probabilities (to 1e-5),
    its argmax and the checkpoint's sha256 in every answer; returns the answers."""
    expected = offline_probabilities(model_dir, pixels)
    sha256 = read_card(model_dir)["weights"]["sha256"]
    answers = []
    for i, image in enumerate(pixels):
        response = requests.post(
            f"{url}/predict", data=png(image.numpy()), headers={"Content-Type": "image/png"}, timeout=30
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        probabilities = torch.tensor([answer["probabilities"][name] for name in CLASS_NAMES])
        assert torch.allclose(probabilities, expected[i], atol=1e-5), (i, probabilities, expected[i])
        assert answer["class_id"] == int(expected[i].argmax()) and answer["label"] == CLASS_NAMES[answer["class_id"]]
        assert answer["model"]["sha256"] == sha256
        answers.append(answer)
    return answers
