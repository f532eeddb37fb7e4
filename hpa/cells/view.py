"""The image model's view of each cell on its own: isolated-cell probabilities.

A CAM says where in a field the image model found a class, but only at the resolution of
its last feature map (a 256-px synthetic field cached at 128 px gives an 8 x 8 map at
output stride 16; a cell covers about 2 x 2 of it) and with the model's large receptive
field smearing evidence across neighbours. Asking the same model about one cell at a time
is sharper: cut a window around the cell from the field at the scale the model was
trained on, zero every pixel that is not the cell's, and run the classifier. On the default
synthetic benchmark the two separate a labelled image's positive cells from its other cells
with a mean ROC AUC of 0.61 (CAM top-k score) against 0.87 (isolated cell); see
docs/pseudo_labels.md.

Geometry: fields are resized to the model's square input size ``S`` (as for training and
CAMs), masks with nearest-neighbour sampling. Every window of an image has the same side:
the largest cell's bounding box at that scale plus 20%, rounded up to a multiple of 32,
at least 32 and at most ``S``; the cell sits at its centre.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from scipy import ndimage

from hpa.constants import NUM_CLASSES
from hpa.engine.amp import amp_dtype, autocast


def mask_at(mask: np.ndarray, size: int) -> np.ndarray:
    """Instance mask (H, W) resized to (size, size) with nearest-neighbour sampling, int32."""
    return cv2.resize(np.asarray(mask).astype(np.float32), (size, size), interpolation=cv2.INTER_NEAREST).astype(np.int32)


def window_side(boxes: np.ndarray, size: int) -> int:
    """Common window side for cells with bounding boxes ``(N, 4)`` (y0, x0, y1, x1) at scale ``size``."""
    if len(boxes) == 0:
        return 32
    side = float(np.max(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]))) * 1.2
    return int(min(size, max(32, int(np.ceil(side / 32.0)) * 32)))


def cell_windows(field: np.ndarray, mask: np.ndarray, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of every cell with the other pixels zeroed.

    Args:
        field: uint8 or float (C, S, S) field at the model's input scale.
        mask: int (H, W) instance mask of the full-resolution field, cells 1..``n_cells``.
        n_cells: number of cells (``mask.max()``).
    Returns:
        ``(windows, present)``: float32 (n_cells, C, w, w) in the field's units (uint8 input
        is scaled to [0, 1]) and bool (n_cells,); a cell too small to survive the resize keeps
        the pixels of its scaled bounding box.
    """
    field = np.asarray(field)
    if field.ndim != 3 or field.shape[1] != field.shape[2]:
        raise ValueError(f"field must be (C, S, S), got {field.shape}")
    c, s, _ = field.shape
    f = field.astype(np.float32) / (255.0 if field.dtype == np.uint8 else 1.0)
    h, w = mask.shape
    small = mask_at(mask, s)
    boxes = np.zeros((n_cells, 4), np.int64)  # y0, x0, y1, x1 at scale s, from the full-res mask
    present = np.zeros(n_cells, bool)
    for k, sl in enumerate(ndimage.find_objects(np.asarray(mask, np.int32), max_label=n_cells), start=1):
        if sl is None:
            continue
        present[k - 1] = True
        boxes[k - 1] = (int(sl[0].start * s / h), int(sl[1].start * s / w),
                        max(int(np.ceil(sl[0].stop * s / h)), int(sl[0].start * s / h) + 1),
                        max(int(np.ceil(sl[1].stop * s / w)), int(sl[1].start * s / w) + 1))
    win = window_side(boxes[present], s)
    pad = win
    fp = np.pad(f, ((0, 0), (pad, pad), (pad, pad)))
    mp = np.pad(small, ((pad, pad), (pad, pad)))
    out = np.zeros((n_cells, c, win, win), np.float32)
    for k in np.flatnonzero(present):
        y0, x0, y1, x1 = boxes[k]
        cy, cx = (y0 + y1) // 2 + pad, (x0 + x1) // 2 + pad
        sy, sx = cy - win // 2, cx - win // 2
        keep = mp[sy:sy + win, sx:sx + win] == k + 1
        if not keep.any():  # vanished at this scale: its bounding box stands in
            keep = np.zeros((win, win), bool)
            keep[y0 + pad - sy:y1 + pad - sy, x0 + pad - sx:x1 + pad - sx] = True
        out[k] = fp[:, sy:sy + win, sx:sx + win] * keep[None]
    return out, present


@torch.no_grad()
def isolated_cell_probs(model: torch.nn.Module, field: np.ndarray, mask: np.ndarray, mean=None, std=None,
                        batch_size: int = 64, device: str = "cpu", amp: str = "off") -> np.ndarray:
    """Sigmoid probabilities float32 (N, 19) of the image model for each cell alone.

    Args:
        model: the image model (multi-label logits), in eval mode.
        field: uint8 (4, S, S) field resized to the model's input size (e.g. a row of the
            stage-01 field cache).
        mask: int (H, W) full-resolution instance mask, cells 1..N.
        mean, std: the checkpoint's per-channel normalisation (sequences of 4) or None.
        device: where ``model`` is (the windows are sent there). amp: mixed precision
            (:func:`hpa.engine.amp.amp_dtype`: ``auto`` is bf16 or fp16 on a GPU, off on the CPU).
    Returns:
        (N, 19) with N = ``mask.max()``; rows of cell ids absent from the mask are NaN.
    """
    n = int(np.asarray(mask).max()) if np.asarray(mask).size else 0
    out = np.full((n, NUM_CLASSES), np.nan, np.float32)
    if n == 0:
        return out
    windows, present = cell_windows(field, mask, n)
    idx = np.flatnonzero(present)
    m = None if mean is None else torch.as_tensor(np.asarray(mean, np.float32)).view(1, -1, 1, 1).to(device)
    sd = None if std is None else torch.as_tensor(np.asarray(std, np.float32)).view(1, -1, 1, 1).to(device)
    dtype = amp_dtype(amp, device)
    for i in range(0, len(idx), batch_size):
        rows = idx[i:i + batch_size]
        x = torch.from_numpy(windows[rows]).to(device)
        if m is not None:
            x = (x - m) / sd
        with autocast(device, dtype):
            logits = model(x)
        out[rows] = torch.sigmoid(logits.float()).cpu().numpy()
    return out


class CellViewer:
    """``viewer(image_id, cell_mask) -> (N, 19)``: isolated-cell probabilities of a run's image model.

    Fields come from the split's stage-01/02 field cache (``RUN/cache/{split}_{S}.npy``) when
    it holds the image, else they are decoded and resized the same way
    (:func:`hpa.data.cache.build_field_cache`'s reader), so sharded and partial runs agree. The model
    runs on ``device`` (the run's: a GPU when there is one) with mixed precision ``amp``
    (``image_model.amp``; ``auto``: bf16, or fp16 on GPUs without bf16, off on the CPU).
    """

    def __init__(self, run, data_dir, split: str, device: str = "cpu", batch_size: int = 64, amp: str = "auto"):
        import json
        from pathlib import Path

        from hpa.data.cache import cache_path
        from hpa.engine.checkpoint import load_model

        self.model, self.meta = load_model(Path(run) / "image_model" / "model.pt", device)
        self.size = int(self.meta["image_size"])
        self.folder = Path(data_dir) / split
        self.device, self.batch_size, self.amp = device, batch_size, amp
        self.cache, self.row_of = None, {}
        path = cache_path(run, split, self.size)
        side = path.with_suffix(".json")
        if path.is_file() and side.is_file():
            info = json.loads(side.read_text())
            if info.get("complete", True) and info.get("size") == self.size:
                self.cache = np.load(path, mmap_mode="r")
                self.row_of = {i: r for r, i in enumerate(info.get("ids", []))}

    def field(self, image_id: str) -> np.ndarray:
        """uint8 (4, S, S) field at the model's input size."""
        from hpa.data.cache import read_cache_rows
        from hpa.io.fields import field_to_uint8, read_field

        r = self.row_of.get(image_id)
        if r is not None and self.cache is not None:
            return read_cache_rows(self.cache, [r])[0]  # not through the map: RSS stays flat over a split
        return field_to_uint8(read_field(self.folder, image_id), self.size)

    def __call__(self, image_id: str, cell_mask: np.ndarray) -> np.ndarray:
        return isolated_cell_probs(self.model, self.field(image_id), cell_mask, self.meta.get("mean"),
                                   self.meta.get("std"), self.batch_size, self.device, self.amp)
