"""Ground truth of a benchmark data set (``DATA/gt/``), read only by evaluation,
diagnostics and the explicit oracle mode; never by training on pseudo-labels.

``DATA/gt/{ID}_cellmask.png``: uint16 instance labels; ``DATA/gt/cell_labels.csv``:
``ID,cell_id,Label,split`` with ``Label`` the cell's classes joined by ``|`` (18 = Negative).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpa.constants import IOU_THRESHOLD
from hpa.eval.matching import match_cells
from hpa.io.fields import read_mask


def has_gt(data_dir: str | Path) -> bool:
    """True when ``DATA/gt/cell_labels.csv`` exists."""
    return (Path(data_dir) / "gt" / "cell_labels.csv").is_file()


def read_cell_labels(data_dir: str | Path, split: str = "all") -> dict[str, dict[int, list[int]]]:
    """``{ID: {cell_id: [classes]}}`` from ``DATA/gt/cell_labels.csv`` (one split, or ``all``);
    checked row by row (:func:`hpa.eval.score.read_cell_labels`)."""
    from hpa.eval.score import read_cell_labels as read_labels_csv

    return read_labels_csv(Path(data_dir) / "gt" / "cell_labels.csv", split)


def read_gt_mask(data_dir: str | Path, image_id: str) -> np.ndarray:
    return read_mask(Path(data_dir) / "gt" / f"{image_id}_cellmask.png")


def transfer_labels(pred_mask: np.ndarray, gt_mask: np.ndarray, gt_labels: dict[int, list[int]],
                    threshold: float = IOU_THRESHOLD) -> dict[int, list[int]]:
    """True classes of predicted cells: ``{pred_id: classes}`` for cells matched one-to-one
    at IoU >= ``threshold`` to a true cell; unmatched predicted cells are absent."""
    res = match_cells(pred_mask, gt_mask, threshold)
    return {p: gt_labels[t] for p, t, _ in res.pairs if t in gt_labels}
