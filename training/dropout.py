"""Dropout for training on the CPU that draws its mask from whole random words.

On the CPU, ``nn.Dropout`` asks the generator for one Bernoulli sample per element, on one thread:
at the 784-512-512-10 MLP's shapes (batch 1024 x 512, p = 0.1) that is about 4 ms a layer, forward and
backward, and the two layers took a 13.3-14.5 ms training step to 20.8-21.9 ms (AMD EPYC, 2 threads,
bf16; ``benchmarks/bench_training.py --steps``, two runs).
``BitsDropout`` fills one int64 with 64 random bits per four elements and keeps an element when its
16 bits clear a threshold: the same distribution (each element kept independently with probability
``1 - p``, survivors scaled by ``1 / (1 - p)``), with ``p`` rounded to a multiple of 1/65536, from
the same seeded generator, in well under half the time (1.7-1.8 ms a layer, 15.6-17.0 ms a step).

It has no saved state, so a model trained with it saves the very ``state_dict`` that ``build_model``'s
plain ``nn.Dropout`` loads, and in eval mode it is the identity, as ``nn.Dropout`` is. Off the CPU
(CUDA's dropout is a fused kernel) it is ``nn.Dropout``.

Its masks can also be drawn ahead (``draw_ahead``), by the thread that prepares the training batches
(``training.prefetch``), in the order the forward passes would draw them: the step then only
multiplies, and the random stream, hence the trained weights, stay what they were.
"""

from __future__ import annotations

import collections

import torch
from torch import nn

_LEVELS = 1 << 16


class BitsDropout(nn.Dropout):
    """``nn.Dropout`` with a mask made from 16 random bits per element (CPU training only)."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__(p, inplace)
        self.ahead: collections.deque[torch.Tensor] = collections.deque()  # masks drawn ahead, oldest first

    def mask(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A fresh scaled keep-mask for inputs of ``shape`` and ``dtype`` (0 < p < 1)."""
        dropped_levels = round(self.p * _LEVELS)
        count = torch.Size(shape).numel()
        # random_(int64 min, None) fills all 64 bits (a bare random_() leaves the sign bit at 0).
        words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)
        bits = words.view(torch.int16)[:count].view(shape)
        keep = bits >= dropped_levels - _LEVELS // 2
        return keep.to(dtype).mul_(_LEVELS / (_LEVELS - dropped_levels))

    def draw_ahead(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Draw the mask of a forward pass still to come (inputs of ``shape`` and ``dtype``) and queue it."""
        if self.training and self.p > 0 and round(self.p * _LEVELS) < _LEVELS:
            self.ahead.append(self.mask(shape, dtype))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or inputs.device.type != "cpu":
            return super().forward(inputs)
        if round(self.p * _LEVELS) >= _LEVELS:
            return inputs * 0  # drawing nothing, as always
        mask = self.ahead.popleft() if self.ahead else self.mask(inputs.shape, inputs.dtype)
        if mask.shape != inputs.shape or mask.dtype != inputs.dtype:
            raise RuntimeError(
                f"a mask drawn ahead for {tuple(mask.shape)} {mask.dtype} met inputs of "
                f"{tuple(inputs.shape)} {inputs.dtype}: the random stream would no longer match the serial loop's"
            )
        return inputs * mask


def use_bits_dropout(model: nn.Module) -> nn.Module:
    """Swap each ``nn.Dropout`` child of ``model`` (a Sequential) for a ``BitsDropout`` with the same ``p``."""
    for name, child in model.named_children():
        if type(child) is nn.Dropout:
            setattr(model, name, BitsDropout(child.p))
        else:
            use_bits_dropout(child)
    return model


def dropout_widths(model: nn.Module) -> list[tuple[BitsDropout, int]] | None:
    """Each ``BitsDropout`` of a Sequential, in forward order, with the width of its inputs (the
    ``out_features`` of the Linear before it, ReLUs between allowed), or None when one follows
    anything else (its mask shape is then not known before the forward pass)."""
    found, width = [], None
    for layer in model.children() if isinstance(model, nn.Sequential) else ():
        if isinstance(layer, nn.Linear):
            width = layer.out_features
        elif isinstance(layer, BitsDropout):
            if width is None:
                return None
            found.append((layer, width))
        elif not isinstance(layer, nn.ReLU):
            width = None
    if sum(isinstance(module, BitsDropout) for module in model.modules()) != len(found):
        return None  # one nested deeper, which this walk did not see
    return found
