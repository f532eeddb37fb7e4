"""Augmentations for fluorescence microscopy, applied to whole batches on the training device.

Microscope fields have no up, down or handedness, and the brightness of each stain varies
from image to image, so the useful augmentations are:

- geometry: horizontal/vertical flips, rotations by multiples of 90 degrees, and a random
  resized crop (area fraction in ``crop_scale``, aspect ratio in ``crop_ratio``), all
  composed into ONE affine map per image and applied with one ``grid_sample`` call for the
  whole batch. Without a crop (area 1) the flips and turns are exact pixel permutations.
- intensity, independently per image and channel: gamma ``x ** g`` with ``log g`` in
  ``[-s, s]``, contrast about the channel mean ``(x - m) * c + m`` and brightness ``x * b``
  with ``c, b`` in ``[1 - s, 1 + s]``, clipped to [0, 1] (``s = intensity``).

Input and output: float ``(B, C, H, W)`` in [0, 1] (uint8 batches are scaled by 1/255
first), same shape (or ``out_size`` square), on the input's device. Randomness comes from torch's generator of that
device, so a training run is reproducible (and resumable) from its RNG state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# the 8 symmetries of the square (4 turns x optional flip), as 2x2 integer matrices
_D4 = torch.tensor([[[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]],
                    [[-1, 0], [0, 1]], [[0, 1], [1, 0]], [[1, 0], [0, -1]], [[0, -1], [-1, 0]]], dtype=torch.float32)


class BatchAugment:
    """Random flips, 90-degree turns, resized crops and per-channel intensity changes.

    Args:
        flips: random horizontal/vertical flips.
        rot90: random multiples of 90 degrees.
        crop_scale: ``(min, max)`` crop area as a fraction of the field; ``(1, 1)`` disables.
        crop_ratio: ``(min, max)`` crop aspect ratio (width / height), drawn log-uniformly.
        intensity: strength ``s`` of the gamma/contrast/brightness jitter; 0 disables.
        out_size: side of the output in pixels (None: the input's). With ``out_size`` = S/2
            and ``crop_scale`` about 0.25, crops keep the cache's resolution: training sees
            full-detail quarter fields at a quarter of the cost, and the fully convolutional
            model then predicts on whole fields.
    """

    def __init__(self, flips: bool = True, rot90: bool = True, crop_scale: tuple[float, float] = (1.0, 1.0),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), intensity: float = 0.0,
                 out_size: int | None = None):
        lo, hi = (float(v) for v in crop_scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        rlo, rhi = (float(v) for v in crop_ratio)
        if not 0.0 < rlo <= rhi:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {crop_ratio}")
        if not 0.0 <= intensity < 1.0:
            raise ValueError(f"intensity must lie in [0, 1), got {intensity}")
        self.flips, self.rot90 = bool(flips), bool(rot90)
        self.crop_scale, self.crop_ratio, self.intensity = (lo, hi), (rlo, rhi), float(intensity)
        if out_size is not None and int(out_size) < 8:
            raise ValueError(f"out_size must be >= 8 px or None, got {out_size}")
        self.out_size = None if out_size is None else int(out_size)

    def __repr__(self) -> str:
        return (f"BatchAugment(flips={self.flips}, rot90={self.rot90}, crop_scale={self.crop_scale}, "
                f"crop_ratio={tuple(round(r, 3) for r in self.crop_ratio)}, intensity={self.intensity}, "
                f"out_size={self.out_size})")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = self.geometry(x)
        if self.intensity > 0:
            x = self.jitter(x)
        return x

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        b, dev = x.shape[0], x.device
        resize = self.out_size is not None and tuple(x.shape[-2:]) != (self.out_size, self.out_size)
        crop = self.crop_scale != (1.0, 1.0) or resize
        if not (self.flips or self.rot90 or crop):
            return x
        turns = torch.randint(4, (b,), device=dev) if self.rot90 else torch.zeros(b, dtype=torch.long, device=dev)
        flip = torch.randint(2, (b,), device=dev) if self.flips else torch.zeros(b, dtype=torch.long, device=dev)
        if not crop:  # exact permutations: group the batch by symmetry
            out = torch.empty_like(x)
            for code in torch.unique(turns + 4 * flip).tolist():
                idx = torch.nonzero(turns + 4 * flip == code).squeeze(1)
                y = x[idx]
                if code >= 4:
                    y = y.flip(-1)
                out[idx] = torch.rot90(y, code % 4, (-2, -1))
            return out
        m = _D4.to(dev)[turns + 4 * flip]  # (B, 2, 2)
        lo, hi = self.crop_scale
        area = torch.empty(b, device=dev).uniform_(lo, hi)
        log_r = torch.empty(b, device=dev).uniform_(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        ratio = torch.exp(log_r)
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (torch.rand(b, device=dev) * 2 - 1) * (1 - w)
        ty = (torch.rand(b, device=dev) * 2 - 1) * (1 - h)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, :, :2] = torch.diag_embed(torch.stack([w, h], 1)) @ m
        theta[:, 0, 2], theta[:, 1, 2] = tx, ty
        out_hw = [self.out_size] * 2 if self.out_size is not None else list(x.shape[-2:])
        grid = F.affine_grid(theta, [b, x.shape[1]] + out_hw, align_corners=False)
        return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        s = self.intensity

        def draw(lo, hi):
            return torch.empty(b, c, 1, 1, device=x.device, dtype=x.dtype).uniform_(lo, hi)

        x = x.clamp(0, 1) ** torch.exp(draw(-s, s))
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * draw(1 - s, 1 + s) + mean
        return (x * draw(1 - s, 1 + s)).clamp(0, 1)
