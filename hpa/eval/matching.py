"""One-to-one matching of predicted and true cell instance masks by IoU.

Used by the segmentation benchmark, the evaluation stage and the metric. Because
IoU >= 0.5 between two masks of one partition can hold for at most one partner, a
threshold of 0.6 (the competition's) makes the matching unique; for thresholds below
0.5 pairs are taken greedily by decreasing IoU, so the result is always one-to-one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpa.constants import IOU_THRESHOLD


def iou_matrix(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every predicted instance against every true instance.

    Args:
        pred, true: integer instance masks (H, W) of the same shape, 0 = background.
    Returns:
        ``(iou, pred_ids, true_ids)``: float64 ``(P, T)`` IoU matrix and the instance ids
        (sorted, background excluded) its rows and columns refer to.
    """
    pred = np.asarray(pred)
    true = np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"mask shapes differ: predicted {pred.shape}, true {true.shape}")
    if pred.size and pred.min() >= 0 and true.min() >= 0 and (int(pred.max()) + 1) * (int(true.max()) + 1) <= 1 << 22:
        # small non-negative labels (every instance mask here): one bincount, no sorting
        n_t_all = int(true.max()) + 1
        joint_all = np.bincount((pred.astype(np.int64) * n_t_all + true).ravel(),
                                minlength=(int(pred.max()) + 1) * n_t_all).reshape(-1, n_t_all)
        pred_ids = np.flatnonzero(joint_all.sum(1))
        true_ids = np.flatnonzero(joint_all.sum(0))
        p_inv = t_inv = None
        joint_sel = joint_all[np.ix_(pred_ids, true_ids)]
    else:
        pred_ids, p_inv = np.unique(pred, return_inverse=True)
        true_ids, t_inv = np.unique(true, return_inverse=True)
        joint_sel = None
    n_p, n_t = len(pred_ids), len(true_ids)
    if joint_sel is not None:
        joint = joint_sel
    else:
        joint = np.bincount(p_inv.ravel() * n_t + t_inv.ravel(), minlength=n_p * n_t).reshape(n_p, n_t)
    area_p = joint.sum(1)
    area_t = joint.sum(0)
    union = area_p[:, None] + area_t[None, :] - joint
    iou = np.where(union > 0, joint / np.maximum(union, 1), 0.0)
    keep_p = pred_ids != 0
    keep_t = true_ids != 0
    return iou[np.ix_(keep_p, keep_t)], pred_ids[keep_p], true_ids[keep_t]


def match_from_iou(iou: np.ndarray, threshold: float = IOU_THRESHOLD) -> list[tuple[int, int, float]]:
    """One-to-one pairs ``(row, col, iou)`` with IoU >= threshold, greedy by decreasing IoU."""
    rows, cols = np.nonzero(iou >= threshold)
    order = np.argsort(-iou[rows, cols], kind="stable")
    used_r, used_c, pairs = set(), set(), []
    for k in order:
        r, c = int(rows[k]), int(cols[k])
        if r in used_r or c in used_c:
            continue
        used_r.add(r)
        used_c.add(c)
        pairs.append((r, c, float(iou[r, c])))
    return pairs


@dataclass
class MatchResult:
    """Outcome of :func:`match_cells` for one image."""

    pairs: list[tuple[int, int, float]]  # (pred_id, true_id, iou)
    n_pred: int
    n_true: int

    @property
    def n_matched(self) -> int:
        return len(self.pairs)

    @property
    def recall(self) -> float:
        """Share of true cells matched (1.0 when there are none)."""
        return self.n_matched / self.n_true if self.n_true else 1.0

    @property
    def unmatched_pred_frac(self) -> float:
        """Share of predicted cells without a true partner (0.0 when none predicted)."""
        return 1 - self.n_matched / self.n_pred if self.n_pred else 0.0


def match_cells(pred: np.ndarray, true: np.ndarray, threshold: float = IOU_THRESHOLD) -> MatchResult:
    """Match predicted to true cells one-to-one at IoU >= ``threshold`` (default 0.6)."""
    iou, pred_ids, true_ids = iou_matrix(pred, true)
    pairs = [(int(pred_ids[r]), int(true_ids[c]), v) for r, c, v in match_from_iou(iou, threshold)]
    return MatchResult(pairs=pairs, n_pred=len(pred_ids), n_true=len(true_ids))
