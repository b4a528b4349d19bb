"""Dropout for training on the CPU that draws its mask from whole random words.

On the CPU, ``nn.Dropout`` asks the generator for one Bernoulli sample per element, on one thread:
at the default MLP's shapes (batch 1024 x 512, p = 0.1) that is about 4 ms a layer, forward and
backward, and the two layers took a 13.3-14.5 ms training step to 20.8-21.9 ms (AMD EPYC, 2 threads,
bf16; ``benchmarks/bench_training.py --steps``, two runs).
``BitsDropout`` fills one int64 with 64 random bits per four elements and keeps an element when its
16 bits clear a threshold: the same distribution (each element kept independently with probability
``1 - p``, survivors scaled by ``1 / (1 - p)``), with ``p`` rounded to a multiple of 1/65536, from
the same seeded generator, in well under half the time (1.7-1.8 ms a layer, 15.6-17.0 ms a step).

It has no state, so a model trained with it saves the very ``state_dict`` that ``build_model``'s
plain ``nn.Dropout`` loads, and in eval mode it is the identity, as ``nn.Dropout`` is. Off the CPU
(CUDA's dropout is a fused kernel) it is ``nn.Dropout``.
"""

from __future__ import annotations

import torch
from torch import nn

_LEVELS = 1 << 16


class BitsDropout(nn.Dropout):
    """``nn.Dropout`` with a mask made from 16 random bits per element (CPU training only)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or inputs.device.type != "cpu":
            return super().forward(inputs)
        dropped_levels = round(self.p * _LEVELS)
        if dropped_levels >= _LEVELS:
            return inputs * 0
        count = inputs.numel()
        # random_(int64 min, None) fills all 64 bits (a bare random_() leaves the sign bit at 0).
        words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)
        bits = words.view(torch.int16)[:count].view(inputs.shape)
        keep = bits >= dropped_levels - _LEVELS // 2
        scale = _LEVELS / (_LEVELS - dropped_levels)
        return inputs * keep.to(inputs.dtype).mul_(scale)


def use_bits_dropout(model: nn.Module) -> nn.Module:
    """Swap each ``nn.Dropout`` child of ``model`` (a Sequential) for a ``BitsDropout`` with the same ``p``."""
    for name, child in model.named_children():
        if type(child) is nn.Dropout:
            setattr(model, name, BitsDropout(child.p))
        else:
            use_bits_dropout(child)
    return model
