"""Ground truth of a benchmark data set (``DATA/gt/``), read only by evaluation,
diagnostics and the explicit oracle mode; never by training on pseudo-labels.

``DATA/gt/{ID}_cellmask.png``: uint16 instance labels; ``DATA/gt/cell_labels.csv``:
``ID,cell_id,Label,split`` with ``Label`` the cell's classes joined by ``|`` (18 = Negative).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .constants import IOU_THRESHOLD
from .io import InputError, parse_label_string, read_mask
from .matching import match_cells


def has_gt(data_dir: str | Path) -> bool:
    """True when ``DATA/gt/cell_labels.csv`` exists."""
    return (Path(data_dir) / "gt" / "cell_labels.csv").is_file()


def read_cell_labels(data_dir: str | Path, split: str | None = None) -> dict[str, dict[int, list[int]]]:
    """``{ID: {cell_id: [classes]}}`` from ``DATA/gt/cell_labels.csv``, optionally one split."""
    path = Path(data_dir) / "gt" / "cell_labels.csv"
    try:
        df = pd.read_csv(path, dtype={"ID": str, "Label": str, "split": str})
    except FileNotFoundError:
        raise InputError(f"{path}: ground-truth cell labels not found") from None
    missing = {"ID", "cell_id", "Label"} - set(df.columns)
    if missing:
        raise InputError(f"{path}: missing column(s) {sorted(missing)}")
    if split is not None and "split" in df.columns:
        df = df[df["split"] == split]
    out: dict[str, dict[int, list[int]]] = {}
    for i, (image_id, cid, label) in enumerate(zip(df["ID"], df["cell_id"], df["Label"])):
        out.setdefault(image_id, {})[int(cid)] = parse_label_string(label, f"{path} row {i + 2}")
    return out


def read_gt_mask(data_dir: str | Path, image_id: str) -> np.ndarray:
    return read_mask(Path(data_dir) / "gt" / f"{image_id}_cellmask.png")


def transfer_labels(pred_mask: np.ndarray, gt_mask: np.ndarray, gt_labels: dict[int, list[int]],
                    threshold: float = IOU_THRESHOLD) -> dict[int, list[int]]:
    """True classes of predicted cells: ``{pred_id: classes}`` for cells matched one-to-one
    at IoU >= ``threshold`` to a true cell; unmatched predicted cells are absent."""
    res = match_cells(pred_mask, gt_mask, threshold)
    return {p: gt_labels[t] for p, t, _ in res.pairs if t in gt_labels}
