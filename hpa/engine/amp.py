"""Mixed precision and batch preparation (uint8 -> float, augmentation, normalisation, memory format).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

AMP_CHOICES = ("auto", "bf16", "off")


# --------------------------------------------------------------------------- helpers
def amp_dtype(amp: str, device: str) -> torch.dtype | None:
    """``auto``: bf16 on CUDA, none on CPU; ``bf16``: bf16 everywhere; ``off``: none."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"unknown amp setting {amp!r}; valid: {', '.join(AMP_CHOICES)}")
    if amp == "bf16" or (amp == "auto" and str(device).startswith("cuda")):
        return torch.bfloat16
    return None


def autocast(device: str, dtype):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type="cuda" if str(device).startswith("cuda") else "cpu", dtype=dtype)


def prepare_batch(x: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None,
                  augment: Callable | None = None, channels_last: bool = False) -> torch.Tensor:
    """uint8 0..255 or float [0, 1] ``(B, C, H, W)`` on the device -> augmented, normalised float32."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    else:
        x = x.float()
    if augment is not None:
        x = augment(x)
    if mean is not None:
        x = (x - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
