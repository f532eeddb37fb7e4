"""Cell pseudo-labels from class activation maps (and, in cycle 2, a cell model).

Evidence. For cell i of an image with labels L (classes 0..17), the evidence for class
c in L is ``E_ic = (1 - v) x score_ic x p_c + v x V_ic`` where ``score_ic`` is the cell's
CAM score (mean or top-k mean of the normalised CAM inside the mask, in [0, 1]), ``p_c``
the image-level probability (when ``times_image_prob``), ``V_ic`` the image model's
probability for the cell on its own (:mod:`hpa.cells.view`) and ``v`` the setting
``view_weight`` (0: CAM only). Classes outside L have no evidence: a cell can only take a
class its image was labelled with. In cycle 2 the cycle-1 cell model joins in:
``E_ic = (1 - w) x E_ic + w x C_ic`` with ``C`` from its softmax ``P``
(:func:`cell_model_evidence`): ``membership`` (default) ``C_ic = (1 - P_i,18) x P_ic /
max_c' P_ic'`` (c, c' < 18), or ``softmax`` ``C = P``.

Rule (per cell, best class b = argmax_c E_ic):

- positive: ``E_ib >= t_b`` with ``t_b = max(pos_min, quantile_q of E_ib over cells whose
  best class is b)``: per-class thresholds from the score distribution, so rare or dim
  classes are not starved by a global cut;
- Negative (18): the cell shows nothing: cycle 1: ``E_ib < neg_threshold``; cycle 2:
  ``(1 - w) x [E_ib(CAM) < neg_threshold] + w x P_i,18 >= 0.5`` and not positive;
- otherwise left out of training (ambiguous).

Images labelled Negative (18) only: every cell is Negative.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hpa.cells.table import CAM_MEAN_COLS, CAM_TOPK_COLS, IMG_COLS, VIEW_COLS
from hpa.constants import NEGATIVE, NUM_CLASSES

SCORES = {"mean": CAM_MEAN_COLS, "topk_mean": CAM_TOPK_COLS}


def cam_evidence(table: pd.DataFrame, image_labels: np.ndarray, score: str = "topk_mean",
                 times_image_prob: bool = True, view_weight: float = 0.0) -> np.ndarray:
    """Evidence ``E`` float32 (N, 19) in [0, 1] for the cells of ``table``.

    ``image_labels``: multi-hot (N, 19) labels of each cell's image. Entries of classes the
    image does not have, of Negative, and missing CAMs are 0. ``view_weight`` > 0 needs the
    table's ``view_p*`` columns (isolated-cell probabilities).
    """
    if not 0.0 <= view_weight <= 1.0:
        raise ValueError(f"view_weight must lie in [0, 1], got {view_weight}")
    if score not in SCORES:
        raise ValueError(f"unknown cell score {score!r}; valid: {sorted(SCORES)}")
    image_labels = np.asarray(image_labels, bool)
    if image_labels.shape != (len(table), NUM_CLASSES):
        raise ValueError(f"image_labels must be ({len(table)}, {NUM_CLASSES}), got {image_labels.shape}")
    e = np.nan_to_num(table[SCORES[score]].to_numpy(np.float32), nan=0.0)
    if times_image_prob:
        e = e * table[IMG_COLS].to_numpy(np.float32)
    if view_weight > 0:
        if not set(VIEW_COLS) <= set(table.columns):
            raise ValueError("view_weight > 0 needs isolated-cell probabilities (view_p* columns) in the cell table: "
                             "rebuild it with the image model present (stage 04 --force), or set pseudo.view_weight=0")
        e = (1 - view_weight) * e + view_weight * np.nan_to_num(table[VIEW_COLS].to_numpy(np.float32), nan=0.0)
    allowed = image_labels.copy()
    allowed[:, NEGATIVE] = False
    return np.where(allowed, np.clip(e, 0, 1), 0.0).astype(np.float32)


#: How the cycle-1 cell model's softmax becomes per-class evidence (:func:`cell_model_evidence`).
CELL_EVIDENCE = ("membership", "softmax")


def cell_model_evidence(cell_probs: np.ndarray, kind: str = "membership") -> np.ndarray:
    """Per-class evidence float32 (N, 19) in [0, 1] from a cell model's softmax ``P`` (N, 19).

    ``softmax``: ``P`` itself. ``membership``: for c < 18, ``(1 - P_18) x P_c / max_c' P_c'``
    (the cell is positive, times how close class c comes to the cell's top class); column 18
    stays ``P_18``. The cell model learns uniform targets over a cell's classes, so a cell
    showing two classes ideally gets 0.5 each: its softmax halves the evidence for both and
    lets a rarely learnt class lose to the model's favourite. Relative to the top class,
    both count fully (docs/pseudo_labels.md has the measured effect).
    """
    if kind not in CELL_EVIDENCE:
        raise ValueError(f"unknown cell-model evidence {kind!r}; valid: {', '.join(CELL_EVIDENCE)}")
    p = np.asarray(cell_probs, np.float32)
    if p.ndim != 2 or p.shape[1] != NUM_CLASSES:
        raise ValueError(f"cell probabilities must be (N, {NUM_CLASSES}), got {p.shape}")
    if kind == "softmax":
        return p.copy()
    out = p.copy()
    top = np.maximum(p[:, :NEGATIVE].max(1, keepdims=True), 1e-12)
    out[:, :NEGATIVE] = (1.0 - p[:, NEGATIVE:]) * p[:, :NEGATIVE] / top
    return np.clip(out, 0.0, 1.0)


def mixed_evidence(evidence: np.ndarray, cell_evidence: np.ndarray | None, weight: float) -> np.ndarray:
    """Cycle-2 evidence: ``(1 - w) E + w C`` where ``E > 0`` (the image's classes), else 0; ``E`` without ``C``."""
    if cell_evidence is None:
        return evidence
    w = float(weight)
    return np.where(evidence > 0, (1 - w) * evidence + w * cell_evidence, 0.0).astype(np.float32)


def class_thresholds(evidence: np.ndarray, pos_quantile: float, pos_min: float) -> np.ndarray:
    """Per-class positive thresholds (19,) from the best-class evidence distribution."""
    best = evidence.argmax(1)
    best_val = evidence.max(1)
    thr = np.full(NUM_CLASSES, pos_min, np.float32)
    for c in range(NUM_CLASSES):
        vals = best_val[(best == c) & (best_val > 0)]
        if vals.size:
            thr[c] = max(pos_min, float(np.quantile(vals, pos_quantile)))
    return thr


def assign_labels(evidence: np.ndarray, negative_image: np.ndarray, pos_quantile: float = 0.5,
                  pos_min: float = 0.3, neg_threshold: float = 0.1, cell_probs: np.ndarray | None = None,
                  cycle2_weight: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pseudo-labels of cells.

    Args:
        evidence: float (N, 19) CAM evidence from :func:`cam_evidence`.
        negative_image: bool (N,), the cell's image is labelled Negative only.
        cell_probs: cycle 2 only: float (N, 19) evidence of the cycle-1 cell model
            (:func:`cell_model_evidence`; column 18 its Negative probability).
    Returns:
        ``(label, confidence, thresholds)``: int64 (N,) in 0..18 or -1 (left out), float32 (N,)
        the evidence behind the label, float32 (19,) the per-class positive thresholds used.
    """
    n = len(evidence)
    cam_best = evidence.max(1) if n else np.zeros(0, np.float32)
    ev = evidence
    neg_vote = (cam_best < neg_threshold).astype(np.float32)
    if cell_probs is not None:
        w = float(cycle2_weight)
        ev = mixed_evidence(evidence, cell_probs, w)
        neg_vote = (1 - w) * neg_vote + w * cell_probs[:, NEGATIVE]
    thr = class_thresholds(ev, pos_quantile, pos_min)
    best = ev.argmax(1) if n else np.zeros(0, np.int64)
    best_val = ev.max(1) if n else np.zeros(0, np.float32)
    label = np.full(n, -1, np.int64)
    conf = np.zeros(n, np.float32)
    pos = best_val >= thr[best]
    label[pos] = best[pos]
    conf[pos] = best_val[pos]
    neg = ~pos & (neg_vote >= 0.5)
    label[neg] = NEGATIVE
    conf[neg] = neg_vote[neg]
    negative_image = np.asarray(negative_image, bool)
    label[negative_image] = NEGATIVE
    conf[negative_image] = 1.0
    return label, conf, thr


def label_sets(evidence: np.ndarray, label: np.ndarray, thresholds: np.ndarray,
               also: tuple[np.ndarray, np.ndarray] | None = None, relative: float = 0.0) -> list[list[int]]:
    """Every class a positive cell passes: ``[label] + [c != label with E_c >= t_c]`` per cell.

    Cells left out (-1) or Negative (18) keep their single label. Used for soft multi-class
    targets (``pseudo.multi_label``): about a third of positive HPA cells show two or more
    of their image's classes, and a single label teaches the cell model to suppress the others.
    ``also``: a second ``(evidence, thresholds)`` rule; a class passing either joins. Cycle 2
    passes cycle 1's evidence and thresholds here: the cycle-1 cell model, trained mostly on
    single labels, gives a cell's second class little probability, so the mixed evidence alone
    would drop secondary classes cycle 1 had found (on the default benchmark, most cells
    showing nucleoplasm and nucleoli lost their nucleoli label in cycle 2).
    ``relative`` > 0: a class also joins when its evidence is at least this fraction of the
    evidence for the cell's label (``pseudo.cycle2_secondary_rel``).
    """
    passes = (evidence >= thresholds[None, :]) & (evidence > 0)
    if relative > 0:
        lab = np.clip(np.asarray(label), 0, evidence.shape[1] - 1)
        best = evidence[np.arange(len(lab)), lab] if len(lab) else np.zeros(0, np.float32)
        passes |= (evidence >= relative * best[:, None]) & (evidence > 0)
    if also is not None:
        ev2, thr2 = also
        passes |= (ev2 >= thr2[None, :]) & (ev2 > 0)
    sets = []
    for i, lab in enumerate(np.asarray(label)):
        if lab < 0 or lab == NEGATIVE:
            sets.append([int(lab)])
            continue
        sets.append([int(lab)] + [int(c) for c in np.flatnonzero(passes[i]) if c != lab and c != NEGATIVE])
    return sets


def top_cell_per_label(label: np.ndarray, evidence: np.ndarray, image_index: np.ndarray) -> list[tuple[int, int]]:
    """The multiple-instance guarantee: each class of an image is shown by at least one of its cells.

    For every image (cells grouped by ``image_index``) and every class c < 18 with evidence in
    it (the image's classes) that no cell of the image is labelled with, the cell with the
    highest evidence for c. Returns ``[(cell row, c), ...]``; the caller gives a cell left out
    or Negative the label c and adds c to a positive cell's label set
    (``pseudo.top_cell_per_label``). The per-class thresholds of :func:`assign_labels` leave
    classes whose evidence is weak everywhere (a rare class the image model barely knows, a
    class one cell of a 50-cell field shows) with no label at all, so the cell model never
    sees them; within its own image the top cell is usually right even then
    (docs/pseudo_labels.md has the measured precision).
    """
    label = np.asarray(label)
    ev = np.asarray(evidence, np.float32)
    idx = np.asarray(image_index)
    if not (len(label) == len(ev) == len(idx)):
        raise ValueError(f"labels {label.shape}, evidence {ev.shape} and image index {idx.shape} disagree")
    out = []
    for rows in pd.Series(idx).groupby(idx, sort=False).indices.values():
        e = ev[rows, :NEGATIVE]
        for c in np.flatnonzero(e.max(0) > 0):
            if not (label[rows] == c).any():
                out.append((int(rows[int(np.argmax(e[:, c]))]), int(c)))
    return out


def _fill_allowed(cell_probs: np.ndarray, image_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(P, allowed)``: the cell model's softmax and the classes a filled cell may take (its image's and Negative)."""
    p = np.asarray(cell_probs, np.float32)
    allowed = np.asarray(image_labels).astype(bool).copy()
    if p.shape != allowed.shape:
        raise ValueError(f"cell probabilities {p.shape} and image labels {allowed.shape} disagree")
    allowed[:, NEGATIVE] = True
    return p, allowed


def fill_labels(label: np.ndarray, cell_probs: np.ndarray, image_labels: np.ndarray) -> np.ndarray:
    """Cycle 2's labels for the cells the rule left out (-1): the cell model's best allowed class.

    ``cell_probs``: (N, 19) softmax of the previous cycle's cell model; ``image_labels``:
    (N, 19) 0/1 labels of each cell's image. A left-out cell takes the most probable class
    among its image's classes and Negative; labelled cells keep theirs. These are the cells no
    rule is sure of: stage 04 draws them at ``pseudo.cycle2_fill_weight`` and keeps them out of
    the coverage figures. Without them the hard cells are never seen by any cycle's cell model
    (docs/pseudo_labels.md).
    """
    label = np.asarray(label)
    p, allowed = _fill_allowed(cell_probs, image_labels)
    if p.shape[:1] != label.shape:
        raise ValueError(f"labels {label.shape}, cell probabilities {p.shape} and image labels {allowed.shape} disagree")
    best = np.where(allowed, p, -1.0).argmax(1) if len(p) else np.zeros(0, np.int64)
    return np.where(label < 0, best, label).astype(np.int64)


def fill_targets(cell_probs: np.ndarray, image_labels: np.ndarray) -> np.ndarray:
    """Soft targets float32 (N, 19) for filled cells: the cell model's softmax over the image's
    classes and Negative, renormalised to sum to 1 (the soft counterpart of :func:`fill_labels`)."""
    p, allowed = _fill_allowed(cell_probs, image_labels)
    t = np.where(allowed, np.clip(p.astype(np.float64), 0, None), 0.0)
    s = t.sum(1, keepdims=True)
    t = np.where(s > 0, t / np.maximum(s, 1e-12), allowed / allowed.sum(1, keepdims=True))
    return t.astype(np.float32)


def coverage(labels: np.ndarray) -> dict:
    """Share of cells labelled, and the count per class."""
    labels = np.asarray(labels)
    counts = np.bincount(labels[labels >= 0], minlength=NUM_CLASSES)
    return {"n_cells": int(labels.size), "labelled": float((labels >= 0).mean()) if labels.size else 0.0,
            "per_class": counts.tolist()}


def diagnostics(labels: np.ndarray, true_sets: list[list[int] | None], sets: list[list[int]] | None = None) -> dict:
    """Pseudo-label precision and recall per class against true cell labels (diagnostic only).

    ``true_sets[i]``: the true classes of cell i (matched to a true cell), or None when the
    cell has no true partner. Precision of class c: share of cells labelled c whose true set
    holds c; recall: share of matched cells whose true set holds c that were labelled c.
    ``sets``: the label sets of :func:`label_sets`; adds ``set_precision`` / ``set_recall``
    (per class, over every class of every set) and their pooled ``set_precision_all``.
    """
    labels = np.asarray(labels)
    prec, rec, n_lab, n_true = [], [], [], []
    for c in range(NUM_CLASSES):
        has_c = np.array([t is not None and c in t for t in true_sets], bool)
        lab_c = labels == c
        matched_lab = lab_c & np.array([t is not None for t in true_sets], bool)
        prec.append(float(has_c[matched_lab].mean()) if matched_lab.any() else float("nan"))
        rec.append(float(lab_c[has_c].mean()) if has_c.any() else float("nan"))
        n_lab.append(int(lab_c.sum()))
        n_true.append(int(has_c.sum()))
    matched = np.array([t is not None for t in true_sets], bool)
    correct = np.array([t is not None and l >= 0 and l in t for l, t in zip(labels, true_sets)], bool)
    lab = (labels >= 0) & matched
    out = {"precision": prec, "recall": rec, "n_labelled": n_lab, "n_true": n_true,
           "overall_precision": float(correct[lab].mean()) if lab.any() else float("nan"),
           "matched_cells": int(matched.sum())}
    if sets is not None:
        given = np.zeros((len(sets), NUM_CLASSES), bool)
        for i, s in enumerate(sets):
            given[i, [c for c in s if c >= 0]] = True
        truth = np.zeros_like(given)
        for i, t in enumerate(true_sets):
            if t is not None:
                truth[i, list(t)] = True
        given &= matched[:, None]
        hit = given & truth
        out["set_precision"] = [float(hit[:, c].sum() / given[:, c].sum()) if given[:, c].any() else float("nan")
                                for c in range(NUM_CLASSES)]
        out["set_recall"] = [float(hit[:, c].sum() / truth[:, c].sum()) if truth[:, c].any() else float("nan")
                             for c in range(NUM_CLASSES)]
        out["set_precision_all"] = float(hit.sum() / given.sum()) if given.any() else float("nan")
    return out
