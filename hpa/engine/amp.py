"""Mixed precision and batch preparation (uint8 -> float, augmentation, normalisation, memory format).

``amp`` settings: ``auto`` = bf16 on a CUDA device that supports it, fp16 (with a gradient
scaler) on older GPUs (V100, T4, P100: no bf16), off on CPU (bf16 measured slower there);
``bf16`` everywhere; ``fp16`` on CUDA only; ``off``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def amp_dtype(amp: str, device: str) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` setting on ``device`` (None: full precision)."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"unknown amp setting {amp!r}; valid: {', '.join(AMP_CHOICES)}")
    cuda = str(device).startswith("cuda")
    if amp == "fp16":
        if not cuda:
            raise ValueError("amp=fp16 needs a CUDA device (use bf16 or off on the CPU)")
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "auto" and cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def grad_scaler(dtype: torch.dtype | None, device: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only (bf16 and fp32 keep fp32's range: a disabled scaler
    passes losses and steps through unchanged)."""
    return torch.amp.GradScaler("cuda" if str(device).startswith("cuda") else "cpu", enabled=dtype == torch.float16)


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
