"""Validation metrics: mAP, F1 at tuned per-class thresholds, accuracy.
"""

from __future__ import annotations

import numpy as np


def tune_thresholds(probs: np.ndarray, targets: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
    """Per-class threshold (K,) maximising F1 on ``(probs, targets)`` (0.5 for classes without positives)."""
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2) if grid is None else grid
    y = targets > 0.5
    thr = np.full(probs.shape[1], 0.5, np.float32)
    for k in range(probs.shape[1]):
        if not y[:, k].any():
            continue
        pred = probs[:, k][:, None] >= grid[None, :]
        tp = (pred & y[:, k][:, None]).sum(0)
        f1 = 2 * tp / np.maximum(pred.sum(0) + y[:, k].sum(), 1)
        thr[k] = grid[int(np.argmax(f1))]
    return thr


def compute_metrics(task: str, probs: np.ndarray, targets: np.ndarray,
                    thresholds: np.ndarray | None = None) -> dict[str, float]:
    """Validation metrics.

    multilabel: ``mAP`` (sklearn average precision, macro over classes with at least one
    positive), ``f1`` (macro F1 over those classes at per-class ``thresholds``; tuned here
    when None). multiclass: ``mAP`` (one-vs-rest, same rule), ``acc`` and ``f1`` (macro F1
    of the arg-max over the classes present). Targets of multiclass may be indices or
    probabilities (their arg-max is used).
    """
    from sklearn.metrics import average_precision_score, f1_score

    probs = np.asarray(probs, np.float64)
    k = probs.shape[1]
    if task == "multiclass":
        t = np.asarray(targets)
        y_idx = t.argmax(1) if t.ndim == 2 else t.astype(int)
        y = np.eye(k, dtype=bool)[y_idx]
    else:
        y = np.asarray(targets) > 0.5
    present = np.flatnonzero(y.any(0) & (~y).any(0))
    out = {"mAP": float("nan"), "f1": float("nan")}
    if present.size:
        out["mAP"] = float(np.mean([average_precision_score(y[:, c], probs[:, c]) for c in present]))
    if task == "multiclass":
        pred = probs.argmax(1)
        out["acc"] = float((pred == y_idx).mean())
        labels = np.flatnonzero(y.any(0))
        out["f1"] = float(f1_score(y_idx, pred, labels=labels, average="macro", zero_division=0))
    elif present.size:
        thr = tune_thresholds(probs, y) if thresholds is None else np.asarray(thresholds)
        pred = probs >= thr[None, :]
        out["f1"] = float(np.mean([f1_score(y[:, c], pred[:, c], zero_division=0) for c in present]))
    return out
