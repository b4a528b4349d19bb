"""Small models with known weights, saved as real checkpoints, for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fashion.checkpoint import save_checkpoint
from fashion.contract import NUM_CLASSES, ModelConfig, build_model


def random_model_dir(path: Path, seed: int = 0, accuracy: float = 0.5) -> Path:
    """A small MLP with seeded random weights: real, varied probabilities for comparisons."""
    torch.manual_seed(seed)
    config = ModelConfig(hidden_sizes=(64,))
    model = build_model(config)
    save_checkpoint(model, {"architecture": config.to_dict(), "metrics": {"test_accuracy": accuracy}}, path)
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
    save_checkpoint(model, {"architecture": config.to_dict(), "metrics": {"test_accuracy": 0.1}}, path)
    return path


def known_probabilities() -> np.ndarray:
    """softmax([0, 1, ..., 9]) in float32, computed the way torch does."""
    return torch.softmax(torch.arange(NUM_CLASSES, dtype=torch.float32), dim=0).numpy()
