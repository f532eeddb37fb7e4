"""Learning-rate schedule (linear warm-up, cosine decay) and AdamW parameter groups.

Both are kept here rather than taken from a library, on purpose:

- torch's ``SequentialLR(LinearLR, CosineAnnealingLR)`` gives the same curve, but as a stateful
  object whose cosine part is computed recursively from the previous rate; :func:`lr_at` is a pure
  function of the optimizer step, so a resumed run gets bit-identical rates from the step alone
  (``last.pt`` stores the step) and the rate can be read off for any step (the metrics' ``lr``).
- torch has no helper for "no weight decay on biases and norm layers"; timm's
  ``param_groups_weight_decay`` does the same as :func:`param_groups`, but timm is not a
  dependency for ten lines.
"""

from __future__ import annotations

import math

from torch import nn


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float = 0.01) -> float:
    """Learning rate after ``step`` optimizer steps: linear warm-up to ``peak``, cosine to ``floor * peak``."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    t = min(max(t, 0.0), 1.0)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices and filters, none on biases and norm layers (ndim <= 1)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
