"""Tiled inference: predict a field the way a crop-trained model saw it.

A model trained on crops of side ``t`` cut from the cached fields (``image_model.train_crop``)
predicts worse on the whole field in one pass than on crops of side ``t``: on the default
synthetic benchmark (64-px crops of 128-px fields) the image-level mAP of 600 held-out fields
was 0.686 from whole fields and 0.754 from tiles (docs/training.md). Every part of a crop's
feature map lies near the crop's border; a whole field is mostly interior, which the model
never trained on.

So image-level outputs of such a model come from overlapping tiles of the training size:

- tiles of side ``tile`` start every ``stride`` pixels (default ``tile // 2``) along each
  axis, the last one flush with the far edge (:func:`tile_starts`);
- the image probability of class k is the **mean over tiles of the tile's sigmoid
  probability** (:func:`tiled_probs`): for ranking images it beat the maximum and the mean
  logit on that benchmark;
- a class activation map of the field (:func:`stitch`) is the average of the tiles' maps,
  each placed at its tile's position on the field's feature grid. Each tile's logit is still
  exactly the mean of its own map plus the bias; the field's logit is ``logit(mean prob)``.

Fields no larger than one tile go through the model in one pass, unchanged.
"""

from __future__ import annotations

import numpy as np
import torch


def tile_starts(size: int, tile: int, stride: int | None = None) -> list[int]:
    """Offsets of tiles of side ``tile`` covering ``0..size`` every ``stride`` px, the last flush with the end.

    ``size <= tile`` gives ``[0]`` (one pass over the whole field).
    """
    tile = int(tile)
    stride = int(stride or max(1, tile // 2))
    if tile < 1 or stride < 1:
        raise ValueError(f"tile and stride must be >= 1, got {tile} and {stride}")
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def needs_tiles(x: torch.Tensor, tile: int | None) -> bool:
    """True when ``x`` (B, C, H, W) is larger than one tile of side ``tile`` (None: never)."""
    return tile is not None and max(x.shape[-2:]) > int(tile)


def make_tiles(x: torch.Tensor, tile: int, stride: int | None = None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Cut ``x`` (B, C, H, W) into tiles: ``(B * T, C, tile, tile)`` image-major, and their ``(y, x)`` offsets (T)."""
    h, w = x.shape[-2:]
    if min(h, w) < tile:
        raise ValueError(f"field of {h}x{w} px is smaller than the {tile}-px tile")
    offsets = [(a, b) for a in tile_starts(h, tile, stride) for b in tile_starts(w, tile, stride)]
    tiles = torch.stack([x[:, :, a:a + tile, b:b + tile] for a, b in offsets], 1)
    return tiles.reshape(-1, x.shape[1], tile, tile), offsets


#: On the CPU one forward pass takes at most this many input pixels (36 tiles of 64 px): many tiles in one
#: pass overflow the caches. Measured on 2 cores (docs/cams.md, "Speed"; benchmarks/cam_speed.py --passes):
#: 16 fields enlarged to 256 px, 784 tiles in one pass, 0.51 s per field for their maps; in passes of 36
#: tiles 0.19 s. GPUs take a whole batch in one pass.
CPU_PASS_PIXELS = 36 * 64 * 64


def pass_size(x: torch.Tensor) -> int:
    """How many items of the batch ``x`` (B, C, H, W) one forward pass should take: all of them on a GPU,
    at most :data:`CPU_PASS_PIXELS` input pixels' worth (at least one) on the CPU."""
    if x.device.type != "cpu":
        return max(1, int(x.shape[0]))
    return max(1, CPU_PASS_PIXELS // max(1, int(x.shape[-2] * x.shape[-1])))


def forward_in_passes(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` computed in passes of :func:`pass_size` items, concatenated (the same values)."""
    n = pass_size(x)
    if x.shape[0] <= n:
        return model(x)
    return torch.cat([model(part) for part in x.split(n)])


def mean_tile_probs(tile_logits: torch.Tensor, n_images: int) -> torch.Tensor:
    """``(B * T, K)`` tile logits (image-major) -> ``(B, K)`` mean sigmoid probabilities."""
    return torch.sigmoid(tile_logits.float()).reshape(n_images, -1, tile_logits.shape[-1]).mean(1)


def prob_logit(p: torch.Tensor | np.ndarray, eps: float = 1e-6):
    """``log(p / (1 - p))`` with ``p`` clipped to ``[eps, 1 - eps]``: the logit of an averaged probability."""
    if torch.is_tensor(p):
        p = p.clamp(eps, 1 - eps)
        return torch.log(p) - torch.log1p(-p)
    p = np.clip(p, eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


@torch.no_grad()
def tiled_probs(model: torch.nn.Module, x: torch.Tensor, tile: int | None, stride: int | None = None) -> torch.Tensor:
    """Sigmoid probabilities ``(B, K)`` of a multi-label model on the normalised batch ``x`` (B, C, H, W).

    With ``tile`` set and the fields larger than it: the mean over overlapping tiles
    (module docstring); otherwise one pass over the whole field.
    """
    if not needs_tiles(x, tile):
        return torch.sigmoid(forward_in_passes(model, x).float())
    tiles, _ = make_tiles(x, int(tile), stride)
    return mean_tile_probs(forward_in_passes(model, tiles), x.shape[0])


def stitch(tile_maps: np.ndarray, offsets: list[tuple[int, int]], field_hw: tuple[int, int], tile: int) -> np.ndarray:
    """Average tile maps onto the field's feature grid.

    Args:
        tile_maps: ``(B, T, K, h, w)`` maps of the T tiles of each of B fields, in ``offsets`` order.
        offsets: ``(y, x)`` pixel offsets of the tiles (:func:`make_tiles`).
        field_hw: the fields' ``(H, W)`` in pixels; tile: tile side in pixels.
    Returns:
        float32 ``(B, K, Hf, Wf)`` with ``Hf = round(H * h / tile)`` (the field's grid at the
        tiles' stride); each tile lands at ``round(offset * h / tile)``, overlaps are averaged.
    """
    b, t, k, h, w = tile_maps.shape
    hf, wf = round(field_hw[0] * h / tile), round(field_hw[1] * w / tile)
    out = np.zeros((b, k, hf, wf), np.float64)
    count = np.zeros((hf, wf), np.float64)
    for i, (oy, ox) in enumerate(offsets):
        gy, gx = min(round(oy * h / tile), hf - h), min(round(ox * w / tile), wf - w)
        out[:, :, gy:gy + h, gx:gx + w] += tile_maps[:, i]
        count[gy:gy + h, gx:gx + w] += 1
    return (out / np.maximum(count, 1)).astype(np.float32)

