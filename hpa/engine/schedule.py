"""Learning-rate schedule (linear warm-up, cosine decay) and AdamW parameter groups.
"""

from __future__ import annotations

import math

from torch import nn


# --------------------------------------------------------------------------- losses, schedule
def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float = 0.01) -> float:
    """Learning rate after ``step`` optimizer steps: linear warm-up to ``peak``, cosine to ``floor * peak``."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    t = min(max(t, 0.0), 1.0)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
