"""The held-out part of Fashion-MNIST's training split: never trained on, used to judge and calibrate.

Two disjoint sets of training-split indices, drawn once by a fixed seed, balanced per class:

- the **probe** (100 images per class, 1,000 in all): shipped with the package
  (``fashion/probe.safetensors``) so that any candidate model can be scored on it in milliseconds
  before it is served. It is not the test set, whose numbers the card reports.
- the **calibration** set (200 per class, 2,000 in all): with the probe, the validation split on
  which training fits the temperature and the out-of-distribution detector's thresholds.

Training removes both from what it learns from, so every figure measured on them is held out.
"""

from __future__ import annotations

import torch

from fashion.contract import NUM_CLASSES

SPLIT_SEED = 20261129
PROBE_PER_CLASS = 100
CALIBRATION_PER_CLASS = 200


def held_out_indices(train_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probe, calibration) sorted index tensors into the training split whose labels are ``train_labels``."""
    order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    labels = train_labels[order]
    probe, calibration = [], []
    for class_id in range(NUM_CLASSES):
        of_class = order[labels == class_id]
        probe.append(of_class[:PROBE_PER_CLASS])
        calibration.append(of_class[PROBE_PER_CLASS : PROBE_PER_CLASS + CALIBRATION_PER_CLASS])
    return torch.cat(probe).sort().values, torch.cat(calibration).sort().values


def split(train_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices to learn from, the validation split: probe then calibration) of the training split."""
    probe, calibration = held_out_indices(train_labels)
    validation = torch.cat([probe, calibration])
    keep = torch.ones(len(train_labels), dtype=torch.bool)
    keep[validation] = False
    return keep.nonzero().flatten(), validation
