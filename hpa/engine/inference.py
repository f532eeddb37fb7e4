"""Batched inference of a trained model over arrays or datasets (tiles, flips, mixed precision).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hpa.engine.amp import amp_dtype, autocast, prepare_batch


@torch.no_grad()
def predict(model: nn.Module, meta: dict, data, batch_size: int = 32, device: str = "cpu", tta_flip: bool = False,
            num_workers: int = 0, amp: str = "auto", progress: bool = False) -> np.ndarray:
    """Class probabilities of every field/crop of ``data``.

    Args:
        model, meta: from :func:`load_model` (or a trained model and its meta).
        data: uint8 array/memmap ``(N, C, H, W)`` (0..255), float array in [0, 1], or a
            dataset whose items are ``x`` or ``(x, target)`` as in :func:`fit`.
        tta_flip: average over the input and its horizontal flip.
    Multi-label models trained on crops (``meta["tile"]``) see items larger than a crop as
    overlapping tiles (:func:`hpa.engine.tiling.tiled_probs`), as in their validation.
    Returns:
        float32 ``(N, K)``: sigmoid probabilities (multilabel) or softmax (multiclass).
    """
    from hpa.engine.tiling import forward_in_passes, make_tiles, needs_tiles

    if isinstance(data, np.ndarray):
        if data.ndim != 4 or data.shape[1] != meta["in_channels"]:
            raise ValueError(f"expected a (N, {meta['in_channels']}, H, W) array, got shape {data.shape}")
        data = ArrayDataset(data)
    model = model.to(device).eval()
    mean = std = None
    if meta.get("mean") is not None and meta.get("normalize", True):
        mean = torch.tensor(meta["mean"], device=device).view(1, -1, 1, 1)
        std = torch.tensor(meta["std"], device=device).view(1, -1, 1, 1)
    dtype = amp_dtype(amp, device)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = []
    for batch in tqdm(loader, desc="predict", disable=not progress, mininterval=2.0):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = prepare_batch(x.to(device, non_blocking=True), mean, std)
        multiclass = meta.get("task") == "multiclass"
        tiled = not multiclass and needs_tiles(x, meta.get("tile"))
        xin = make_tiles(x, int(meta["tile"]))[0] if tiled else x
        with autocast(device, dtype):  # on the CPU in passes of a few dozen 64-px items (cache-sized)
            logits = forward_in_passes(model, xin).float()
            if tta_flip:
                logits2 = forward_in_passes(model, xin.flip(-1)).float()
        act = (lambda z: torch.softmax(z, 1)) if multiclass else torch.sigmoid
        p = act(logits) if not tta_flip else 0.5 * (act(logits) + act(logits2))
        if tiled:
            p = p.reshape(len(x), -1, p.shape[-1]).mean(1)
        out.append(p.cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, meta["num_classes"]), np.float32)


class ArrayDataset(torch.utils.data.Dataset):
    def __init__(self, arr: np.ndarray):
        self.arr = arr

    def __len__(self):
        return len(self.arr)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.arr[i]))


@torch.no_grad()
def field_probs(model: nn.Module, x: torch.Tensor, tile: int | None = None, tta_flip: bool = False) -> np.ndarray:
    """Image-level sigmoid probabilities of normalised fields, computed as stage 02 computes them.

    The same arithmetic as the logits of :func:`hpa.cam.methods.compute_cams` (whose
    probabilities stage 06 uses), without any map: the logits of each tile (or of the whole
    field when it is no larger than ``tile``, or ``tile`` is None) are averaged over the
    field, its horizontal and its vertical flip when ``tta_flip``; tiled fields then take
    the mean over tiles of the sigmoid (:func:`hpa.engine.tiling.mean_tile_probs`).

    Args:
        model: a multi-label model in eval mode on ``x``'s device.
        x: float32 ``(B, C, S, S)`` normalised fields (:func:`hpa.engine.amp.prepare_batch`).
        tile: the model's training crop (``meta["tile"]``); tta_flip: setting ``cam.tta_flip``.
    Returns:
        float32 ``(B, K)`` in [0, 1].
    """
    from hpa.engine.tiling import forward_in_passes, make_tiles, mean_tile_probs, needs_tiles

    tiled = needs_tiles(x, tile)
    xin = make_tiles(x, int(tile))[0] if tiled else x
    views = (lambda t: t, lambda t: t.flip(-1), lambda t: t.flip(-2)) if tta_flip else (lambda t: t,)
    was = model.training
    model.eval()
    try:
        logits = sum(forward_in_passes(model, view(xin)).float() for view in views) / float(len(views))
    finally:
        model.train(was)
    p = mean_tile_probs(logits, x.shape[0]) if tiled else torch.sigmoid(logits)
    return p.cpu().numpy().astype(np.float32)
