"""The cell table: one row per segmented cell with its geometry, its image's
probabilities and its class-activation scores.

Columns of ``RUN/cells/{split}.parquet`` (written by stage 04 for train, stage 06 for test):

- ``ID``, ``cell_id``: image and cell (label in ``RUN/masks/{split}/{ID}_cellmask.png``)
- ``x0, y0, x1, y1``: bounding box in field pixels (x1/y1 exclusive); ``area`` in pixels;
  ``height, width``: the field's size; ``rel_area``: area / median cell area of the image;
  ``touches_border``: the cell reaches the field's edge
- ``img_p0..img_p18``: the image model's probabilities for the cell's image
- ``cam_mean_0..18`` and ``cam_topk_0..18``: mean and top-k mean of the image's
  normalised CAM (ReLU, divided by its maximum over the image; [0, 1]) inside the cell;
  NaN for classes whose CAM was not stored (train: only the image's labels)
- ``view_p0..18`` (when the image model is available): its probabilities for the cell
  alone, every other pixel zeroed (:mod:`hpa.cells.view`)
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from hpa.constants import NUM_CLASSES
from hpa.io.fields import read_mask

log = logging.getLogger(__name__)

IMG_COLS = [f"img_p{c}" for c in range(NUM_CLASSES)]
CAM_MEAN_COLS = [f"cam_mean_{c}" for c in range(NUM_CLASSES)]
CAM_TOPK_COLS = [f"cam_topk_{c}" for c in range(NUM_CLASSES)]
VIEW_COLS = [f"view_p{c}" for c in range(NUM_CLASSES)]


def cell_geometry(cell_mask: np.ndarray) -> pd.DataFrame:
    """Bounding boxes, areas and border contact of every cell of an instance mask (H, W)."""
    cell_mask = np.asarray(cell_mask)
    h, w = cell_mask.shape
    n = int(cell_mask.max()) if cell_mask.size else 0
    rows = []
    if n:
        areas = np.bincount(cell_mask.ravel(), minlength=n + 1)
        border = np.zeros(n + 1, bool)
        border[np.unique(np.concatenate([cell_mask[0], cell_mask[-1], cell_mask[:, 0], cell_mask[:, -1]]))] = True
        for k, sl in enumerate(ndimage.find_objects(cell_mask), start=1):
            if sl is None:
                continue
            rows.append((k, sl[1].start, sl[0].start, sl[1].stop, sl[0].stop, int(areas[k]), bool(border[k])))
    cols = ["cell_id", "x0", "y0", "x1", "y1", "area", "touches_border"]
    df = pd.DataFrame(rows, columns=cols).astype({c: np.int64 for c in cols[:-1]} | {"touches_border": bool})
    df["height"], df["width"] = h, w
    med = float(df["area"].median()) if len(df) else 1.0
    df["rel_area"] = df["area"] / max(med, 1.0)
    return df


def _work_mask(cell_mask: np.ndarray, work_size: int) -> np.ndarray:
    h, w = cell_mask.shape
    scale = min(1.0, work_size / max(h, w))
    if scale == 1.0:
        return cell_mask
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(cell_mask.astype(np.float32), size, interpolation=cv2.INTER_NEAREST).astype(np.int32)


def cell_cam_scores(cell_mask: np.ndarray, cams: np.ndarray, topk_frac: float = 0.25,
                    work_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top-k mean of each class map inside each cell.

    Args:
        cell_mask: int (H, W) instance mask, cells 1..N.
        cams: float (K, H', W') maps in [0, 1] covering the whole field at any resolution
            (feature grid or full size); they are resized (bilinear) onto the mask, which is
            itself reduced (nearest) to at most ``work_size`` px on its longest side.
        topk_frac: fraction of a cell's pixels averaged for the top-k score (at least 1 pixel).
    Returns:
        ``(mean, topk)``, float32 (N, K) with N = ``cell_mask.max()``; a cell that vanishes at
        the working scale takes the map's value at its centre.
    """
    cams = np.asarray(cams, np.float32)
    if cams.ndim != 3:
        raise ValueError(f"cams must be (K, h, w), got shape {cams.shape}")
    if not 0 < topk_frac <= 1:
        raise ValueError(f"topk_frac must lie in (0, 1], got {topk_frac}")
    n = int(cell_mask.max()) if cell_mask.size else 0
    k = cams.shape[0]
    mean = np.full((n, k), np.nan, np.float32)
    topk = np.full((n, k), np.nan, np.float32)
    if n == 0 or k == 0:
        return mean, topk
    wm = _work_mask(cell_mask, work_size)
    hh, ww = wm.shape
    up = np.stack([cv2.resize(c, (ww, hh), interpolation=cv2.INTER_LINEAR) for c in cams])  # (K, hh, ww)
    flat_mask = wm.ravel()
    order = np.argsort(flat_mask, kind="stable")
    bounds = np.searchsorted(flat_mask[order], np.arange(n + 2))
    flat = up.reshape(k, -1)
    for cid in range(1, n + 1):
        idx = order[bounds[cid]:bounds[cid + 1]]
        if idx.size == 0:  # vanished at working scale: value at the full-size centre
            ys, xs = np.nonzero(cell_mask == cid)
            if ys.size == 0:
                continue
            cy = (ys.mean() + 0.5) * hh / cell_mask.shape[0] - 0.5
            cx = (xs.mean() + 0.5) * ww / cell_mask.shape[1] - 0.5
            v = up[:, int(np.clip(round(cy), 0, hh - 1)), int(np.clip(round(cx), 0, ww - 1))]
            mean[cid - 1] = topk[cid - 1] = v
            continue
        vals = flat[:, idx]
        mean[cid - 1] = vals.mean(1)
        m = max(1, int(np.ceil(topk_frac * idx.size)))
        topk[cid - 1] = np.partition(vals, idx.size - m, axis=1)[:, idx.size - m:].mean(1)
    return mean, topk


def image_cell_rows(image_id: str, cell_mask: np.ndarray, probs: np.ndarray, cams: np.ndarray | None,
                    cam_classes, topk_frac: float, work_size: int) -> pd.DataFrame:
    """Cell-table rows of one image (see the module docstring for the columns).

    ``cams`` are the image's normalised maps (len(cam_classes), h, w) in [0, 1].
    """
    geo = cell_geometry(cell_mask)
    n = len(geo)
    mean = np.full((n, NUM_CLASSES), np.nan, np.float32)
    topk = np.full((n, NUM_CLASSES), np.nan, np.float32)
    if cams is not None and len(cam_classes) and n:
        m, t = cell_cam_scores(cell_mask, cams, topk_frac, work_size)
        ids = geo["cell_id"].to_numpy() - 1
        mean[:, list(cam_classes)] = m[ids]
        topk[:, list(cam_classes)] = t[ids]
    probs = np.asarray(probs, np.float32).reshape(1, NUM_CLASSES).repeat(n, 0)
    extra = pd.DataFrame(np.concatenate([probs, mean, topk], 1), columns=IMG_COLS + CAM_MEAN_COLS + CAM_TOPK_COLS)
    geo.insert(0, "ID", image_id)
    return pd.concat([geo.reset_index(drop=True), extra], axis=1)


def build_cell_table(ids: list[str], masks_dir: str | Path, cams_dir: str | Path, topk_frac: float = 0.25,
                     work_size: int = 512, view=None) -> pd.DataFrame:
    """Cell table of a split from its masks (stage 03) and CAMs (stage 02).

    Images without a mask file are an error naming the file; images without a CAM file
    are an error too (run stage 02 for the split first). ``view``: optional callable
    ``(image_id, cell_mask) -> float (N, 19)``, the image model's probabilities for each
    cell alone (:class:`hpa.cells.view.CellViewer`), stored as ``view_p0..18``.
    """
    from hpa.cam.maps import load_cam, normalize_cams

    masks_dir, cams_dir = Path(masks_dir), Path(cams_dir)
    parts = []
    for image_id in tqdm(ids, desc="cell table", unit="img", leave=False):
        mask = read_mask(masks_dir / f"{image_id}_cellmask.png")
        rec = load_cam(cams_dir / f"{image_id}.npz")
        cams = normalize_cams(rec.cams) if len(rec.classes) else None
        rows = image_cell_rows(image_id, mask, rec.probs, cams, list(rec.classes), topk_frac, work_size)
        if view is not None:
            probs = view(image_id, mask)
            rows[VIEW_COLS] = (probs[rows["cell_id"].to_numpy() - 1] if len(rows)
                               else np.zeros((0, NUM_CLASSES), np.float32))  # float32 also for images without cells
        parts.append(rows)
    if not parts:
        empty = image_cell_rows("", np.zeros((1, 1), np.int32), np.zeros(NUM_CLASSES), None, [], topk_frac, work_size)
        if view is not None:
            empty[VIEW_COLS] = np.zeros((0, NUM_CLASSES), np.float32)
        return empty
    return pd.concat(parts, ignore_index=True)
