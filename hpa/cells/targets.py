"""Cell labels as soft targets: ``ID, cell_id, weight, t0..t18`` (rows sum to 1), from stage
04's pseudo-labels or from the ground truth (oracle), joined onto the crop cache, and
class-balanced sampling weights.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from hpa.constants import IOU_THRESHOLD, NUM_CLASSES, TARGET_COLS
from hpa.eval import gt as gtmod
from hpa.io.errors import InputError
from hpa.io.fields import read_mask

log = logging.getLogger(__name__)


def soft_targets(classes: Sequence[Sequence[int]]) -> np.ndarray:
    """float32 ``(N, 19)``: row i spreads 1 uniformly over ``classes[i]`` (one class -> one-hot)."""
    out = np.zeros((len(classes), NUM_CLASSES), np.float32)
    for i, cl in enumerate(classes):
        cl = sorted(set(int(c) for c in cl))
        if not cl or cl[0] < 0 or cl[-1] >= NUM_CLASSES:
            raise ValueError(f"row {i}: classes {cl} must be a non-empty subset of 0..{NUM_CLASSES - 1}")
        out[i, cl] = 1.0 / len(cl)
    return out


def _labels_frame(ids, cell_ids, classes, weights) -> pd.DataFrame:
    df = pd.DataFrame({"ID": pd.Series(ids, dtype=str), "cell_id": np.asarray(cell_ids, np.int64),
                       "weight": np.asarray(weights, np.float32)})
    return pd.concat([df, pd.DataFrame(soft_targets(classes), columns=TARGET_COLS)], axis=1)


def read_pseudo_labels(path: str | os.PathLike) -> pd.DataFrame:
    """Stage 04's ``pseudo_labels.parquet`` (ID, cell_id, label 0..18, weight) as cell labels.

    Returns ``ID, cell_id, weight, t0..t18``: one-hot targets, or uniform over the classes of an
    optional ``labels`` column (``"3|7"``, starting with ``label``). Rows of optional ``t0..t18``
    columns that are not all NaN are probability targets taken as they are (non-negative, summing
    to 1; stage 04 writes them for cycle 2's filled cells with ``pseudo.cycle2_fill_targets=soft``).
    ``weight`` defaults to 1.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found: run stage 04 (pseudo-labels) for this cycle first")
    df = pd.read_parquet(path)
    missing = {"ID", "cell_id", "label"} - set(df.columns)
    if missing:
        raise InputError(f"{path}: missing column(s) {sorted(missing)}; found {list(df.columns)}")
    labels = df["label"].to_numpy()
    bad = (labels < 0) | (labels >= NUM_CLASSES)
    if bad.any():
        raise InputError(f"{path}: {int(bad.sum())} labels outside 0..{NUM_CLASSES - 1} (first: {labels[bad][0]})")
    weight = df["weight"].to_numpy(np.float32) if "weight" in df.columns else np.ones(len(df), np.float32)
    if (weight < 0).any() or not np.isfinite(weight).all():
        raise InputError(f"{path}: weights must be finite and >= 0")
    if df.duplicated(["ID", "cell_id"]).any():
        raise InputError(f"{path}: a cell appears more than once")
    if "labels" in df.columns:  # soft multi-class targets: the best class first, then the others it passes
        sets = [[int(c) for c in str(v).split("|")] for v in df["labels"]]
        if any(c < 0 or c >= NUM_CLASSES for cs in sets for c in cs) or any(cs[0] != l for cs, l in zip(sets, labels)):
            raise InputError(f"{path}: column 'labels' must list classes 0..{NUM_CLASSES - 1} starting with 'label'")
    else:
        sets = [[int(c)] for c in labels]
    out = _labels_frame(df["ID"].astype(str), df["cell_id"], sets, weight)
    if set(TARGET_COLS) <= set(df.columns):
        given = df[TARGET_COLS].to_numpy(np.float64)
        rows = ~np.isnan(given).all(1)
        t = given[rows]
        if np.isnan(t).any() or (t < 0).any() or not np.allclose(t.sum(1), 1.0, atol=1e-3):
            raise InputError(f"{path}: soft targets t0..t{NUM_CLASSES - 1} must be non-negative and sum to 1 per cell")
        out.loc[rows, TARGET_COLS] = (t / t.sum(1, keepdims=True)).astype(np.float32)
    return out


def oracle_cell_labels(data_dir: str | os.PathLike, masks_dir: str | os.PathLike, ids: Sequence[str],
                       split: str = "train", threshold: float = IOU_THRESHOLD) -> pd.DataFrame:
    """True labels moved onto our predicted cells (oracle mode; reads ``DATA/gt``).

    Each predicted cell of ``masks_dir/{ID}_cellmask.png`` matched one-to-one at IoU >=
    ``threshold`` to a true cell of ``DATA/gt/{ID}_cellmask.png`` takes that cell's classes
    (soft target, uniform over them); unmatched cells are left out. Returns the cell-labels
    frame ``ID, cell_id, weight (1), t0..t18``.
    """
    truth = gtmod.read_cell_labels(data_dir, split)
    rows_id, rows_cell, rows_cls = [], [], []
    for image_id in ids:
        if image_id not in truth:
            continue
        pred = read_mask(Path(masks_dir) / f"{image_id}_cellmask.png")
        moved = gtmod.transfer_labels(pred, gtmod.read_gt_mask(data_dir, image_id), truth[image_id], threshold)
        for cid in sorted(moved):
            rows_id.append(image_id)
            rows_cell.append(cid)
            rows_cls.append(moved[cid])
    log.info("oracle: %d predicted cells of %d images took true labels", len(rows_id), len(ids))
    return _labels_frame(rows_id, rows_cell, rows_cls, np.ones(len(rows_id)))


def attach_targets(index: pd.DataFrame, labels: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labelled rows of a crop-cache index.

    Args:
        index: crop-cache index (ID, cell_id, row, ...).
        labels: cell labels (ID, cell_id, weight, t0..t18).
    Returns:
        ``(rows, targets, weights)``: int64 ``(M,)`` cache rows in index order, float32
        ``(M, 19)``, float32 ``(M,)``. Labels of cells missing from the cache are an error
        (the masks changed after labelling).
    """
    merged = labels.merge(index[["ID", "cell_id", "row"]], on=["ID", "cell_id"], how="left", validate="one_to_one")
    lost = merged["row"].isna()
    if lost.any():
        first = merged[lost].iloc[0]
        raise InputError(f"{int(lost.sum())} labelled cells are not in the crop cache (first: image {first.ID} "
                         f"cell {first.cell_id}); were the masks re-made after labelling? re-run stages 04 and 05")
    merged = merged.sort_values("row", kind="stable")
    return (merged["row"].to_numpy(np.int64), merged[TARGET_COLS].to_numpy(np.float32),
            merged["weight"].to_numpy(np.float32))


def balanced_sample_weights(targets: np.ndarray, weights: np.ndarray | None = None, power: float = 0.5) -> np.ndarray:
    """Sampling weight per cell: ``sum_c t_c * count_c ** -power`` x ``weights``, mean 1.

    ``count_c`` is the (soft) number of cells of class c; ``power`` 0.5 samples a class in
    proportion to the square root of its size, 1 equally often, 0 as it comes.
    Returns float64 ``(M,)``.
    """
    targets = np.asarray(targets, np.float64)
    if targets.ndim != 2 or targets.shape[1] != NUM_CLASSES:
        raise ValueError(f"targets must be (M, {NUM_CLASSES}), got {targets.shape}")
    counts = targets.sum(0)
    inv = np.where(counts > 0, np.maximum(counts, 1e-12) ** -float(power), 0.0)
    w = targets @ inv
    if weights is not None:
        w = w * np.asarray(weights, np.float64)
    return w / w.mean() if len(w) and w.mean() > 0 else w
