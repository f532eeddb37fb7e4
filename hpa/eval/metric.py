"""Cell-level mean average precision of the Kaggle HPA Single Cell competition.

For each class c, the predictions of class c from all images are sorted by confidence
(descending; ties keep their input order: images in the order given, then cells, then
classes) and taken one by one: a prediction is a true positive when its mask has
IoU >= ``iou_threshold`` (0.6) with a not-yet-matched true cell of class c in the same
image (the unmatched one with the best IoU), otherwise a false positive; so a second
prediction of an already matched cell is a false positive. AP is the all-point
interpolated area under the precision/recall curve (Open Images: precision made
monotone non-increasing from the right, then the sum over recall steps of
delta-recall x precision, which equals the sum of that precision over the true
positives divided by the number of true cells of class c). The score is the mean AP
over the classes that have true cells; classes without any get AP = NaN.

A true cell may carry several labels and is a true instance of each of them.

Modes:
- ``oid`` (default; the host's scorer, built on the Open Images evaluator): predictions
  of a class that no true cell of that image has are ignored.
- ``strict``: such predictions are false positives.

Two entry points share one core:
- :func:`cell_map`: predictions as instance masks plus a (K, 19) confidence matrix
  (the evaluation stage); one IoU matrix per image (:func:`hpa.eval.matching.iou_matrix`).
- :func:`submission_map`: predictions read from a submission
  (:func:`hpa.eval.submission.read_submission`), each distinct mask compared with the true
  cells on its run-length encoding (no pixels decoded).

True cells of one image never overlap, so for thresholds above 0.5 a predicted mask can
reach the threshold with at most one true cell; the core then matches all classes in
one vectorised pass. For thresholds of 0.5 and below it falls back to the greedy loop.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_util

from hpa.constants import CLASS_NAMES, IOU_THRESHOLD, NUM_CLASSES
from hpa.eval.matching import iou_matrix

log = logging.getLogger(__name__)

MODES = ("oid", "strict")

#: gt[image_id] = (instance mask int (H, W) or a path to its PNG, {cell_id: [class, ...]})
GroundTruth = Mapping[str, tuple]


@dataclass
class MetricResult:
    """Cell-level mAP and its per-class parts (arrays of length 19, indexed by class)."""

    map: float  # mean AP over classes with ground truth (NaN when no class has any)
    ap_per_class: np.ndarray  # float64 (19,), NaN for classes without ground truth
    n_gt_per_class: np.ndarray  # int64 (19,): true cell instances per class (all images)
    n_pred_per_class: np.ndarray  # int64 (19,): predictions scored (after oid ignoring)
    n_tp_per_class: np.ndarray  # int64 (19,): of those, true positives
    mode: str = "oid"
    iou_threshold: float = IOU_THRESHOLD
    n_images: int = 0  # ground-truth images
    n_images_predicted: int = 0  # of those, images with a prediction entry
    n_ignored: int = 0  # predictions ignored by the oid rule

    def table(self) -> str:
        """Per-class table: class index, name, n_gt, n_pred, n_tp, AP (``-`` without ground truth)."""
        width = max(len(n) for n in CLASS_NAMES)
        lines = [f"{'class':>5}  {'name':<{width}}  {'n_gt':>6}  {'n_pred':>7}  {'n_tp':>6}  {'AP':>6}"]
        for c in range(NUM_CLASSES):
            ap = self.ap_per_class[c]
            ap_txt = "-" if np.isnan(ap) else f"{ap:.4f}"
            lines.append(
                f"{c:>5}  {CLASS_NAMES[c]:<{width}}  {self.n_gt_per_class[c]:>6}  "
                f"{self.n_pred_per_class[c]:>7}  {self.n_tp_per_class[c]:>6}  {ap_txt:>6}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (NaN APs become None)."""
        return {
            "map": None if np.isnan(self.map) else float(self.map),
            "mode": self.mode,
            "iou_threshold": self.iou_threshold,
            "n_images": self.n_images,
            "n_images_predicted": self.n_images_predicted,
            "n_ignored": self.n_ignored,
            "per_class": [
                {
                    "class": c,
                    "name": CLASS_NAMES[c],
                    "ap": None if np.isnan(self.ap_per_class[c]) else float(self.ap_per_class[c]),
                    "n_gt": int(self.n_gt_per_class[c]),
                    "n_pred": int(self.n_pred_per_class[c]),
                    "n_tp": int(self.n_tp_per_class[c]),
                }
                for c in range(NUM_CLASSES)
            ],
        }


@dataclass
class _ImageEval:
    """One image's input to the core: M prediction masks, T true cells, N predictions."""

    iou: np.ndarray  # float64 (M, T)
    gt_labels: np.ndarray  # bool (T, 19)
    mask_index: np.ndarray  # int64 (N,) row of ``iou`` of each prediction
    classes: np.ndarray  # int64 (N,) in 0..18
    conf: np.ndarray  # float64 (N,) finite
    image_id: str = field(default="")


# --------------------------------------------------------------------------- inputs
def _check_args(mode: str, iou_threshold: float) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown metric mode {mode!r}; valid: {', '.join(MODES)}")
    if not 0 < float(iou_threshold) <= 1:
        raise ValueError(f"iou_threshold must lie in (0, 1], got {iou_threshold}")


def _load_gt_mask(image_id: str, mask) -> np.ndarray:
    if isinstance(mask, (str, os.PathLike)):
        from hpa.io.fields import read_mask

        mask = read_mask(mask)
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"image {image_id!r}: expected an integer true cell mask (H, W), got {mask.dtype} {mask.shape}")
    return mask


def _label_matrix(image_id: str, labels: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """``{cell_id: [classes]}`` -> (sorted cell ids int64 (T,), bool (T, 19))."""
    if not isinstance(labels, Mapping):
        raise ValueError(f"image {image_id!r}: true labels must be a dict cell_id -> list of classes, got {type(labels).__name__}")
    items = sorted(((int(k), v) for k, v in labels.items()), key=lambda kv: kv[0])
    ids = np.array([k for k, _ in items], np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"image {image_id!r}: a cell id appears twice in the true labels")
    if ids.size and ids.min() < 1:
        raise ValueError(f"image {image_id!r}: true cell ids must be >= 1 (0 is background), got {ids.min()}")
    mat = np.zeros((len(ids), NUM_CLASSES), bool)
    for r, (cid, cls) in enumerate(items):
        cls = [cls] if np.isscalar(cls) else list(cls)
        for c in cls:
            if not (isinstance(c, (int, np.integer)) and 0 <= c < NUM_CLASSES):
                raise ValueError(f"image {image_id!r} cell {cid}: class {c!r} outside 0..{NUM_CLASSES - 1}")
            mat[r, int(c)] = True
    return ids, mat


def _check_same_cells(image_id: str, mask_ids: np.ndarray, label_ids: np.ndarray) -> None:
    if np.array_equal(mask_ids, label_ids):
        return
    no_label = np.setdiff1d(mask_ids, label_ids)
    no_cell = np.setdiff1d(label_ids, mask_ids)
    parts = []
    if no_label.size:
        parts.append(f"cells {no_label[:5].tolist()} of the mask have no labels")
    if no_cell.size:
        parts.append(f"labelled cells {no_cell[:5].tolist()} are not in the mask")
    raise ValueError(f"image {image_id!r}: true mask and true labels disagree: " + "; ".join(parts))


def _n_gt(gt: GroundTruth) -> np.ndarray:
    n = np.zeros(NUM_CLASSES, np.int64)
    for image_id, entry in gt.items():
        if len(entry) != 2:
            raise ValueError(f"image {image_id!r}: ground truth must be (mask, {{cell_id: [classes]}})")
        n += _label_matrix(image_id, entry[1])[1].sum(0)
    return n


def _unknown_ids(pred_ids: Sequence[str], gt: GroundTruth) -> None:
    unknown = [i for i in pred_ids if i not in gt]
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ValueError(f"{len(unknown)} predicted image ID(s) not in the ground truth: {unknown[:5]}{more}")


# --------------------------------------------------------------------------- core
def _average_precision(tp: np.ndarray, n_gt: int) -> float:
    """All-point interpolated AP of predictions in decreasing confidence order."""
    if n_gt == 0:
        return float("nan")
    if tp.size == 0:
        return 0.0
    precision = np.cumsum(tp) / np.arange(1, tp.size + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(precision[tp].sum() / n_gt)


def _score(
    images: list[_ImageEval],
    n_gt: np.ndarray,
    mode: str,
    iou_threshold: float,
    n_images: int,
    sequential: bool | None = None,
) -> MetricResult:
    """Match, then AP per class. ``sequential=None`` picks the vectorised pass when threshold > 0.5."""
    if sequential is None:
        sequential = not iou_threshold > 0.5
    img_l, midx_l, cls_l, conf_l, gid_l, has_l = [], [], [], [], [], []
    offset = 0
    for i, im in enumerate(images):
        m, t = im.iou.shape
        cls = im.classes
        img_has = im.gt_labels.any(0)[cls]
        if not sequential:
            cand = np.full(m, -1, np.int64)
            if t and m:
                best = im.iou.argmax(1)
                cand = np.where(im.iou[np.arange(m), best] >= iou_threshold, best, -1)
            g = cand[im.mask_index]
            ok = g >= 0
            ok[ok] = im.gt_labels[g[ok], cls[ok]]
            gid_l.append(np.where(ok, offset + g, -1))
        img_l.append(np.full(len(cls), i, np.int64))
        midx_l.append(im.mask_index)
        cls_l.append(cls)
        conf_l.append(im.conf)
        has_l.append(img_has)
        offset += t
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt, copy=False) if xs else np.zeros(0, dt))
    img, midx, cls, conf, has = (
        cat(img_l, np.int64), cat(midx_l, np.int64), cat(cls_l, np.int64), cat(conf_l, np.float64), cat(has_l, bool)
    )
    keep = has if mode == "oid" else np.ones(len(cls), bool)
    n_ignored = int((~keep).sum())
    sel = np.flatnonzero(keep)
    order = sel[np.lexsort((sel, -conf[sel], cls[sel]))]  # by class, then confidence desc, then input order
    cls_s = cls[order]
    tp = np.zeros(len(order), bool)
    if not sequential:
        gid_s = cat(gid_l, np.int64)[order]
        valid = np.flatnonzero(gid_s >= 0)
        _, first = np.unique(cls_s[valid] * max(offset, 1) + gid_s[valid], return_index=True)
        tp[valid[first]] = True
    else:
        matched: dict[tuple[int, int], np.ndarray] = {}  # (image, class) -> true cells already taken
        for k, p in enumerate(order.tolist()):
            i, c = int(img[p]), int(cls_s[k])
            cols = np.flatnonzero(images[i].gt_labels[:, c])
            if not cols.size:
                continue
            taken = matched.setdefault((i, c), np.zeros(len(cols), bool))
            ious = images[i].iou[midx[p], cols]
            ok = (ious >= iou_threshold) & ~taken
            if ok.any():
                taken[np.argmax(np.where(ok, ious, -np.inf))] = True
                tp[k] = True
    bounds = np.searchsorted(cls_s, np.arange(NUM_CLASSES + 1))
    ap = np.full(NUM_CLASSES, np.nan)
    n_pred = np.diff(bounds).astype(np.int64)
    n_tp = np.array([tp[bounds[c] : bounds[c + 1]].sum() for c in range(NUM_CLASSES)], np.int64)
    for c in range(NUM_CLASSES):
        ap[c] = _average_precision(tp[bounds[c] : bounds[c + 1]], int(n_gt[c]))
    has_gt = n_gt > 0
    score = float(np.mean(ap[has_gt])) if has_gt.any() else float("nan")
    return MetricResult(
        map=score,
        ap_per_class=ap,
        n_gt_per_class=n_gt.astype(np.int64),
        n_pred_per_class=n_pred,
        n_tp_per_class=n_tp,
        mode=mode,
        iou_threshold=float(iou_threshold),
        n_images=n_images,
        n_images_predicted=len(images),
        n_ignored=n_ignored,
    )


# --------------------------------------------------------------------------- entry points
def cell_map(
    gt: GroundTruth,
    pred: Mapping[str, tuple],
    mode: str = "oid",
    iou_threshold: float = IOU_THRESHOLD,
) -> MetricResult:
    """Cell-level mAP of per-cell confidence matrices.

    Args:
        gt: ``{image_id: (true_mask, {cell_id: [class, ...]})}``; ``true_mask`` int (H, W)
            (0 = background) or a path to its PNG; every cell of the mask needs a labels entry
            and vice versa (checked for predicted images); a cell may carry several classes.
        pred: ``{image_id: (pred_mask, pred_ids, conf)}``: ``pred_mask`` int (H, W) of the same
            size as the true mask, ``pred_ids`` int (K,) cell ids (an id absent from the mask is
            an empty mask), ``conf`` float (K, 19), NaN or negative = no prediction. Every
            image_id must be in ``gt``; ground-truth images without predictions count as missed.
        mode: ``oid`` (ignore classes absent from the image's true cells) or ``strict``.
        iou_threshold: IoU for a match (competition: 0.6).
    Returns:
        :class:`MetricResult`.
    """
    _check_args(mode, iou_threshold)
    return _score(cell_images(gt, pred), _n_gt(gt), mode, iou_threshold, len(gt))


def cell_images(gt: GroundTruth, pred: Mapping[str, tuple], iou_cache: dict | None = None) -> list[_ImageEval]:
    """The per-image inputs of the core for :func:`cell_map`'s arguments (checked as there).

    ``iou_cache``: a dict shared by calls whose predictions use the same masks (several
    confidence sets of one segmentation): each image's IoU matrix is computed once.
    """
    _unknown_ids(list(pred), gt)
    images = []
    for image_id, entry in pred.items():
        if len(entry) != 3:
            raise ValueError(f"image {image_id!r}: prediction must be (pred_mask, pred_ids, conf), got {len(entry)} fields")
        pmask, pids, conf = entry
        gmask = _load_gt_mask(image_id, gt[image_id][0])
        pmask = np.asarray(pmask)
        if pmask.shape != gmask.shape:
            raise ValueError(f"image {image_id!r}: predicted mask {pmask.shape} and true mask {gmask.shape} differ in size")
        if not np.issubdtype(pmask.dtype, np.integer):
            raise ValueError(f"image {image_id!r}: expected an integer predicted mask, got {pmask.dtype}")
        pids = np.asarray(pids).astype(np.int64).reshape(-1)
        conf = np.asarray(conf, dtype=np.float64)
        if conf.shape != (len(pids), NUM_CLASSES):
            raise ValueError(f"image {image_id!r}: conf must be ({len(pids)}, {NUM_CLASSES}) for {len(pids)} ids, got {conf.shape}")
        if iou_cache is not None and image_id in iou_cache:
            iou, p_ids, t_ids = iou_cache[image_id]
        else:
            iou, p_ids, t_ids = iou_matrix(pmask, gmask)
            if iou_cache is not None:
                iou_cache[image_id] = (iou, p_ids, t_ids)
        label_ids, labels = _label_matrix(image_id, gt[image_id][1])
        _check_same_cells(image_id, t_ids, label_ids)
        rows = np.searchsorted(p_ids, pids)
        present = rows < len(p_ids)
        present[present] = p_ids[rows[present]] == pids[present]
        if not present.all():
            iou = np.vstack([iou, np.zeros((1, iou.shape[1]))])  # empty mask: IoU 0 with everything
            rows[~present] = len(p_ids)
        k, c = np.nonzero(np.isfinite(conf) & (conf >= 0))  # cell order, then class order
        images.append(_ImageEval(iou, labels, rows[k], c.astype(np.int64), conf[k, c], image_id))
    return images


def score_images(gt: GroundTruth, images: list[_ImageEval], mode: str = "oid",
                 iou_threshold: float = IOU_THRESHOLD) -> MetricResult:
    """:func:`cell_map` of inputs already built by :func:`cell_images`."""
    _check_args(mode, iou_threshold)
    return _score(images, _n_gt(gt), mode, iou_threshold, len(gt))


def bootstrap_maps(gt: GroundTruth, images: Mapping[str, list[_ImageEval]], n_boot: int = 200, seed: int = 0,
                   mode: str = "oid", iou_threshold: float = IOU_THRESHOLD) -> dict[str, np.ndarray]:
    """mAP of several prediction sets on the same ``n_boot`` resamples of the ground-truth images.

    Each resample draws ``len(gt)`` images with replacement (a drawn image counts as often as
    it is drawn, with its true cells); every set is scored on the same draws, so differences
    between sets are paired. ``images``: ``{name: cell_images(gt, pred)}``. Returns
    ``{name: float64 (n_boot,)}``; a resample with no true cell of some class scores the
    mean over the classes it has, as :func:`cell_map` does.
    """
    _check_args(mode, iou_threshold)
    ids = list(gt)
    n_per = np.stack([_label_matrix(i, gt[i][1])[1].sum(0) for i in ids]) if ids else np.zeros((0, NUM_CLASSES))
    by_id = {name: {im.image_id: im for im in ims} for name, ims in images.items()}
    rng = np.random.default_rng(seed)
    out = {name: np.empty(n_boot) for name in images}
    for b in range(n_boot):
        draw = rng.integers(0, len(ids), len(ids))
        n_gt = n_per[draw].sum(0).astype(np.int64)
        for name, table in by_id.items():
            ims = [table[ids[j]] for j in draw if ids[j] in table]
            out[name][b] = _score(ims, n_gt, mode, iou_threshold, len(draw)).map
    return out


def submission_map(
    gt: GroundTruth,
    submission: Mapping,
    mode: str = "oid",
    iou_threshold: float = IOU_THRESHOLD,
) -> MetricResult:
    """Cell-level mAP of a submission read by :func:`hpa.eval.submission.read_submission`.

    Args:
        gt: as in :func:`cell_map` (masks may be paths: each is read once, when needed).
        submission: ``{image_id: SubmissionImage}``; every image_id must be in ``gt`` and its
            ImageHeight x ImageWidth must equal the true mask's size.
        mode, iou_threshold: as in :func:`cell_map`.
    Raises:
        ValueError naming the image (and the submission row) for an unknown ID or a size mismatch.
    """
    from hpa.eval.rle import instance_rles

    _check_args(mode, iou_threshold)
    unknown = [s for s in submission.values() if s.image_id not in gt]
    if unknown:
        rows = ", ".join(f"row {s.row} ID {s.image_id!r}" for s in unknown[:5])
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ValueError(f"{len(unknown)} submission image(s) not in the ground truth: {rows}{more}")
    images = []
    for sub in submission.values():
        image_id = sub.image_id
        gmask = _load_gt_mask(image_id, gt[image_id][0])
        if gmask.shape != (sub.height, sub.width):
            raise ValueError(
                f"submission row {sub.row} (ID {image_id!r}): image size {sub.width} x {sub.height} (W x H) "
                f"but the true mask is {gmask.shape[1]} x {gmask.shape[0]}"
            )
        label_ids, labels = _label_matrix(image_id, gt[image_id][1])
        if sub.n_predictions == 0:
            images.append(_ImageEval(np.zeros((0, len(label_ids))), labels, sub.mask_index, sub.classes, sub.confidences, image_id))
            continue
        t_ids, t_rles = instance_rles(gmask)
        _check_same_cells(image_id, t_ids, label_ids)
        if t_rles:
            iou = np.asarray(mask_util.iou(sub.rles, t_rles, [0] * len(t_rles)), np.float64).reshape(sub.n_masks, len(t_rles))
        else:
            iou = np.zeros((sub.n_masks, 0))
        images.append(_ImageEval(iou, labels, sub.mask_index, sub.classes, sub.confidences, image_id))
    return _score(images, _n_gt(gt), mode, iou_threshold, len(gt))
