"""Cell-level mean average precision of the Kaggle HPA Single Cell competition.

For each class c, the predictions of class c from all images are sorted by confidence
(descending; ties keep their input order: images in the order given, then cells, then
classes) and taken one by one: a prediction is a true positive when its mask has
IoU >= ``iou_threshold`` (0.6) with a not-yet-matched true cell of class c in the same
image, otherwise a false positive; so a second prediction of an already matched cell is a
false positive. The candidate true cell of a prediction is the class-c cell of its image
with the highest IoU (the organisers' rule, Open Images ``per_image_evaluation``): when that
cell is already taken the prediction is a false positive, with no fall-back to another
cell. AP is the all-point interpolated area under the precision/recall curve (Open Images:
precision made monotone non-increasing from the right, then the sum over recall steps of
delta-recall x precision, which equals the sum of that precision over the true positives
divided by the number of true cells of class c). The score is the mean AP over the
classes that have true cells; classes without any get AP = NaN.

A true cell may carry several labels and is a true instance of each of them. An image of
the ground truth may have no true cell at all (``(mask without cells, {})``): its
predictions are false positives in ``strict`` mode and ignored in ``oid`` mode (it has no
class; the organisers' evaluator never adds an image that has no ground-truth row).

Modes (what happens to a prediction of a class that no true cell of its image has):
- ``oid`` (default; the competition's rule, the Open Images challenge evaluator that the
  organisers' scoring code runs): ignored, neither true nor false positive.
- ``strict``: a false positive. This measures confidences that mean the same in every
  image (ranking all cells of a data set by one class), which ``oid`` does not.

IoU types (``iou_type``):
- ``mask`` (default): IoU of the pixel masks.
- ``box``: IoU of the masks' tight bounding boxes ``[ymin, xmin, ymax + 1, xmax + 1]``
  (area = height x width), which is what the organisers' stored evaluation script
  compares (``is_instance_segmentation_eval = False``; docs/metric.md). Two neighbouring
  cells' boxes overlap, so box IoU can reach the threshold where mask IoU does not, and a
  predicted box can reach it with two true boxes; the argmax rule above then decides.

For masks at thresholds of 0.5 and below the greedy loop instead takes the best
*unmatched* class-c cell (a fall-back the organisers do not have; at the competition's
0.6 two disjoint true masks can never both reach the threshold, so the rules agree).

Two entry points share one core:
- :func:`cell_map`: predictions as instance masks plus a (K, 19) confidence matrix
  (the evaluation stage); one IoU matrix per image (:func:`hpa.eval.matching.iou_matrix`
  or :func:`box_iou_matrix`).
- :func:`submission_map`: predictions read from a submission
  (:func:`hpa.eval.submission.read_submission`), each distinct mask compared with the true
  cells on its run-length encoding (no pixels decoded).
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
IOU_TYPES = ("mask", "box")

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
    iou_type: str = "mask"
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
            "iou_type": self.iou_type,
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

    iou: np.ndarray  # float64 (M, T): mask or box IoU (``iou_type``)
    gt_labels: np.ndarray  # bool (T, 19)
    mask_index: np.ndarray  # int64 (N,) row of ``iou`` of each prediction
    classes: np.ndarray  # int64 (N,) in 0..18
    conf: np.ndarray  # float64 (N,) finite
    image_id: str = field(default="")
    iou_type: str = "mask"
    candidates: dict = field(default_factory=dict, repr=False)  # :func:`_candidates`, :func:`_true_positives` (reuse)


# --------------------------------------------------------------------------- inputs
def _check_args(mode: str, iou_threshold: float, iou_type: str = "mask") -> None:
    if mode not in MODES:
        raise ValueError(f"unknown metric mode {mode!r}; valid: {', '.join(MODES)}")
    if iou_type not in IOU_TYPES:
        raise ValueError(f"unknown IoU type {iou_type!r}; valid: {', '.join(IOU_TYPES)}")
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


# --------------------------------------------------------------------------- boxes
def instance_boxes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tight bounding box of every instance of an integer mask.

    Args:
        mask: int (H, W), 0 = background, instance ids >= 1.
    Returns:
        ``(ids, boxes)``: sorted int64 ids (K,) and float64 (K, 4) boxes
        ``[ymin, xmin, ymax + 1, xmax + 1]`` in pixels (the organisers' box of a mask, before
        their division by the image size, which leaves every IoU unchanged).
    """
    from scipy import ndimage

    mask = np.asarray(mask)
    if mask.size == 0 or mask.max() <= 0:
        return np.zeros(0, np.int64), np.zeros((0, 4))
    if mask.min() < 0:
        raise ValueError(f"instance ids must be >= 0, got {mask.min()}")
    slices = ndimage.find_objects(mask.astype(np.int64, copy=False))
    ids = np.array([k + 1 for k, s in enumerate(slices) if s is not None], np.int64)
    boxes = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in slices if s is not None], np.float64)
    return ids, boxes


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU float64 (M, T) of boxes ``a`` (M, 4) and ``b`` (T, 4), each ``[y0, x0, y1, x1]``.

    Area = (y1 - y0) x (x1 - x0), as the Open Images box operations compute it; a box of
    zero area (an empty mask) has IoU 0 with everything.
    """
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    dy = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    dx = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(dy, 0, None) * np.clip(dx, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def box_iou_matrix(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`hpa.eval.matching.iou_matrix` with the instances' tight boxes instead of their pixels.

    Returns ``(iou float64 (P, T), pred_ids (P,), true_ids (T,))``, ids sorted, background excluded.
    """
    if np.shape(pred) != np.shape(true):
        raise ValueError(f"mask shapes differ: predicted {np.shape(pred)}, true {np.shape(true)}")
    p_ids, p_box = instance_boxes(pred)
    t_ids, t_box = instance_boxes(true)
    return box_iou(p_box, t_box), p_ids, t_ids


def rle_boxes(rles: list[dict]) -> np.ndarray:
    """Tight boxes float64 (K, 4) ``[y0, x0, y1, x1]`` of COCO RLE masks (zeros for an empty mask)."""
    if not rles:
        return np.zeros((0, 4))
    xywh = np.asarray(mask_util.toBbox(rles), np.float64).reshape(-1, 4)
    return np.stack([xywh[:, 1], xywh[:, 0], xywh[:, 1] + xywh[:, 3], xywh[:, 0] + xywh[:, 2]], 1)


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


def _candidates(im: _ImageEval, iou_threshold: float) -> np.ndarray:
    """Per prediction of one image (N,): the index of its class's true cell with the highest IoU
    when that IoU reaches the threshold, else -1 (ties: the lowest cell id)."""
    if iou_threshold in im.candidates:
        return im.candidates[iou_threshold]
    n, t = len(im.classes), im.iou.shape[1]
    if n and t:
        masked = np.where(im.gt_labels[:, im.classes].T, im.iou[im.mask_index], -1.0)  # (N, T): class-c cells only
        best = masked.argmax(1)
        g = np.where(masked[np.arange(n), best] >= iou_threshold, best, -1).astype(np.int64)
    else:
        g = np.full(n, -1, np.int64)
    im.candidates[iou_threshold] = g
    return g


def _true_positives(im: _ImageEval, iou_threshold: float, sequential: bool, fallback: bool) -> np.ndarray:
    """bool (N,): whether each prediction of one image (input order) is a true positive.

    Matching never crosses images: a prediction can only take a true cell of its own image
    and class, and the predictions of one image and class meet in the order of the global
    ranking (confidence descending, then input order), which is their order within the
    image. So an image's flags are the same in any list it is scored in, a bootstrap
    resample included, and are computed once per threshold (cached on the image).
    """
    key = ("tp", float(iou_threshold), bool(sequential), bool(fallback))
    if key in im.candidates:
        return im.candidates[key]
    n = len(im.classes)
    tp = np.zeros(n, bool)
    order = np.lexsort((np.arange(n), -np.asarray(im.conf, np.float64), im.classes))
    if not sequential:
        g = _candidates(im, iou_threshold)[order]
        valid = np.flatnonzero(g >= 0)
        t = max(im.iou.shape[1], 1)
        _, first = np.unique(im.classes[order][valid] * t + g[valid], return_index=True)
        tp[order[valid[first]]] = True
    else:
        taken_by_class: dict[int, np.ndarray] = {}  # class -> its true cells already taken
        for p in order.tolist():
            c = int(im.classes[p])
            cols = np.flatnonzero(im.gt_labels[:, c])
            if not cols.size:
                continue
            taken = taken_by_class.setdefault(c, np.zeros(len(cols), bool))
            ious = im.iou[im.mask_index[p], cols]
            if fallback:  # the best cell among those not yet taken
                ok = (ious >= iou_threshold) & ~taken
            else:  # the best cell, and a false positive when it is taken
                ok = np.zeros(len(cols), bool)
                j = int(np.argmax(ious))
                ok[j] = ious[j] >= iou_threshold and not taken[j]
            if ok.any():
                taken[np.argmax(np.where(ok, ious, -np.inf))] = True
                tp[p] = True
    im.candidates[key] = tp
    return tp


def _score(
    images: list[_ImageEval],
    n_gt: np.ndarray,
    mode: str,
    iou_threshold: float,
    n_images: int,
    sequential: bool | None = None,
    iou_type: str | None = None,
) -> MetricResult:
    """Match, then AP per class (:func:`_score_modes` for one mode)."""
    return _score_modes(images, n_gt, (mode,), iou_threshold, n_images, sequential, iou_type)[mode]


def _matching_rule(images: list[_ImageEval], iou_threshold: float, sequential: bool | None = None,
                   iou_type: str | None = None) -> tuple[str, bool, bool]:
    """``(iou_type, fallback, sequential)`` of images scored together (:func:`_score_modes`' rule)."""
    kinds = {im.iou_type for im in images}
    if len(kinds) > 1 or (iou_type is not None and kinds - {iou_type}):
        raise ValueError(f"images scored together must share one IoU type, got {sorted(kinds | {iou_type} - {None})}")
    iou_type = iou_type or (kinds.pop() if kinds else "mask")
    fallback = iou_type == "mask"
    if sequential is None:
        sequential = fallback and not iou_threshold > 0.5
    return iou_type, fallback, sequential


def _ranked_aps(cls_all: np.ndarray, tp_all: np.ndarray, has_all: np.ndarray, n_gt: np.ndarray, mode: str):
    """AP per class of predictions already ranked (class, then confidence descending).

    Returns ``(ap (19,), tp, bounds, keep)``: oid keeps only predictions whose image has a
    true cell of their class; ``bounds[c]:bounds[c + 1]`` is class c's slice of the kept ``tp``.
    """
    keep = has_all if mode == "oid" else np.ones(len(cls_all), bool)
    cls_s, tp = cls_all[keep], tp_all[keep]
    bounds = np.searchsorted(cls_s, np.arange(NUM_CLASSES + 1))
    ap = np.array([_average_precision(tp[bounds[c] : bounds[c + 1]], int(n_gt[c])) for c in range(NUM_CLASSES)])
    return ap, tp, bounds, keep


def _score_modes(
    images: list[_ImageEval],
    n_gt: np.ndarray,
    modes: Sequence[str],
    iou_threshold: float,
    n_images: int,
    sequential: bool | None = None,
    iou_type: str | None = None,
) -> dict[str, MetricResult]:
    """Match once, then AP per class in each mode: ``{mode: MetricResult}``.

    Matching does not depend on the mode: a prediction the oid rule ignores is in an image
    without a true cell of its class, so it can never be a true positive nor take a cell from
    another prediction; oid scores the same ranked list without those predictions.
    ``sequential=None`` picks the vectorised pass except for mask IoU at thresholds <= 0.5,
    where the greedy loop's fall-back to the best unmatched cell can differ from it.
    ``iou_type``: how the images' IoU was computed (read from them when None).
    """
    iou_type, fallback, sequential = _matching_rule(images, iou_threshold, sequential, iou_type)
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt, copy=False) if xs else np.zeros(0, dt))
    cls = cat([im.classes for im in images], np.int64)
    conf = cat([im.conf for im in images], np.float64)
    has = cat([im.gt_labels.any(0)[im.classes] for im in images], bool)
    tp_in = cat([_true_positives(im, iou_threshold, sequential, fallback) for im in images], bool)
    order = np.lexsort((np.arange(len(cls)), -conf, cls))  # by class, then confidence desc, then input order
    cls_all = cls[order]
    tp_all = tp_in[order]
    has_gt = n_gt > 0
    out = {}
    for mode in modes:
        ap, tp, bounds, keep = _ranked_aps(cls_all, tp_all, has[order], n_gt, mode)
        n_tp = np.array([tp[bounds[c] : bounds[c + 1]].sum() for c in range(NUM_CLASSES)], np.int64)
        out[mode] = MetricResult(
            map=float(np.mean(ap[has_gt])) if has_gt.any() else float("nan"),
            ap_per_class=ap,
            n_gt_per_class=n_gt.astype(np.int64),
            n_pred_per_class=np.diff(bounds).astype(np.int64),
            n_tp_per_class=n_tp,
            mode=mode,
            iou_threshold=float(iou_threshold),
            iou_type=iou_type,
            n_images=n_images,
            n_images_predicted=len(images),
            n_ignored=int((~keep).sum()),
        )
    return out


# --------------------------------------------------------------------------- entry points
def cell_map(
    gt: GroundTruth,
    pred: Mapping[str, tuple],
    mode: str = "oid",
    iou_threshold: float = IOU_THRESHOLD,
    iou_type: str = "mask",
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
        iou_type: ``mask`` (pixel IoU) or ``box`` (IoU of the tight boxes, the organisers' script).
    Returns:
        :class:`MetricResult`.
    """
    _check_args(mode, iou_threshold, iou_type)
    return _score(cell_images(gt, pred, iou_type=iou_type), _n_gt(gt), mode, iou_threshold, len(gt), iou_type=iou_type)


def cell_images(gt: GroundTruth, pred: Mapping[str, tuple], iou_cache: dict | None = None,
                iou_type: str = "mask") -> list[_ImageEval]:
    """The per-image inputs of the core for :func:`cell_map`'s arguments (checked as there).

    ``iou_cache``: a dict shared by calls whose predictions use the same masks (several
    confidence sets of one segmentation): each image's IoU matrix is computed once (per
    ``iou_type``).
    """
    _check_args("oid", IOU_THRESHOLD, iou_type)
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
        key = image_id if iou_type == "mask" else (iou_type, image_id)
        if iou_cache is not None and key in iou_cache:
            iou, p_ids, t_ids = iou_cache[key]
        else:
            iou, p_ids, t_ids = (iou_matrix if iou_type == "mask" else box_iou_matrix)(pmask, gmask)
            if iou_cache is not None:
                iou_cache[key] = (iou, p_ids, t_ids)
        label_ids, labels = _label_matrix(image_id, gt[image_id][1])
        _check_same_cells(image_id, t_ids, label_ids)
        rows = np.searchsorted(p_ids, pids)
        present = rows < len(p_ids)
        present[present] = p_ids[rows[present]] == pids[present]
        if not present.all():
            iou = np.vstack([iou, np.zeros((1, iou.shape[1]))])  # empty mask: IoU 0 with everything
            rows[~present] = len(p_ids)
        k, c = np.nonzero(np.isfinite(conf) & (conf >= 0))  # cell order, then class order
        images.append(_ImageEval(iou, labels, rows[k], c.astype(np.int64), conf[k, c], image_id, iou_type))
    return images


def score_images(gt: GroundTruth, images: list[_ImageEval], mode: str | Sequence[str] = "oid",
                 iou_threshold: float = IOU_THRESHOLD):
    """:func:`cell_map` of inputs already built by :func:`cell_images` (their IoU type).

    One ``mode``: a :class:`MetricResult`; a list of modes: ``{mode: MetricResult}`` (matched once).
    """
    modes = [mode] if isinstance(mode, str) else list(mode)
    for m in modes:
        _check_args(m, iou_threshold)
    res = _score_modes(images, _n_gt(gt), modes, iou_threshold, len(gt))
    return res[mode] if isinstance(mode, str) else res


def bootstrap_maps(gt: GroundTruth, images: Mapping[str, list[_ImageEval]], n_boot: int = 200, seed: int = 0,
                   mode: str | Sequence[str] = "oid", iou_threshold: float = IOU_THRESHOLD) -> dict:
    """mAP of several prediction sets on the same ``n_boot`` resamples of the ground-truth images.

    Each resample draws ``len(gt)`` images with replacement (a drawn image counts as often as
    it is drawn, with its true cells); every set is scored on the same draws, so differences
    between sets are paired. ``images``: ``{name: cell_images(gt, pred)}``. Returns
    ``{name: float64 (n_boot,)}`` for one ``mode``, ``{mode: {name: float64 (n_boot,)}}`` for a
    list of modes (every mode on the same draws); a resample with no true cell of some class
    scores the mean over the classes it has, as :func:`cell_map` does.
    """
    modes = [mode] if isinstance(mode, str) else list(mode)
    for m in modes:
        _check_args(m, iou_threshold)
    ids = list(gt)
    n_per = np.stack([_label_matrix(i, gt[i][1])[1].sum(0) for i in ids]) if ids else np.zeros((0, NUM_CLASSES))
    tables = {name: _bootstrap_table(ims, iou_threshold) for name, ims in images.items()}
    rng = np.random.default_rng(seed)
    out = {m: {name: np.empty(n_boot) for name in images} for m in modes}
    for b in range(n_boot):
        draw = rng.integers(0, len(ids), len(ids))
        n_gt = n_per[draw].sum(0).astype(np.int64)
        has_gt = n_gt > 0
        for name, table in tables.items():
            parts = [table[ids[j]] for j in draw if ids[j] in table]
            cls, rank, tp, has = (np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, dt)
                                  for k, dt in enumerate((np.int64, np.int64, bool, bool)))
            # rank (class, then confidence) first, then the position in this resample's input order, which
            # breaks ties as _score_modes does; every image's rows are pre-sorted so the keys form sorted runs
            order = np.argsort(rank * (len(rank) + 1) + np.arange(len(rank)), kind="stable")
            for m in modes:
                ap = _ranked_aps(cls[order], tp[order], has[order], n_gt, m)[0]
                out[m][name][b] = float(np.mean(ap[has_gt])) if has_gt.any() else float("nan")
    return out[mode] if isinstance(mode, str) else out


def _bootstrap_table(images: list[_ImageEval], iou_threshold: float) -> dict[str, tuple]:
    """Per image id: ``(classes, rank, true positive, image has the class)`` of its predictions,
    sorted by rank, where rank orders (class, confidence descending) over the whole set with equal
    pairs sharing a rank: a resample is scored from these without matching again
    (:func:`_true_positives`) and its ranking is a merge of sorted runs."""
    if not images:
        return {}
    _, fallback, sequential = _matching_rule(images, iou_threshold)
    cls = np.concatenate([im.classes for im in images]).astype(np.int64, copy=False)
    conf = np.concatenate([im.conf for im in images]).astype(np.float64, copy=False)
    order = np.lexsort((-conf, cls))
    new = np.ones(len(order), bool)
    new[1:] = (cls[order][1:] != cls[order][:-1]) | (conf[order][1:] != conf[order][:-1])
    rank = np.empty(len(order), np.int64)
    rank[order] = np.cumsum(new) - 1
    table, start = {}, 0
    for im in images:
        n = len(im.classes)
        r = rank[start:start + n]
        start += n
        perm = np.lexsort((np.arange(n), r))
        tp = _true_positives(im, iou_threshold, sequential, fallback)
        table[im.image_id] = (np.asarray(im.classes, np.int64)[perm], r[perm], tp[perm],
                              im.gt_labels.any(0)[im.classes][perm])
    return table


def submission_map(
    gt: GroundTruth,
    submission: Mapping,
    mode: str = "oid",
    iou_threshold: float = IOU_THRESHOLD,
    iou_type: str = "mask",
) -> MetricResult:
    """Cell-level mAP of a submission read by :func:`hpa.eval.submission.read_submission`.

    Args:
        gt: as in :func:`cell_map` (masks may be paths: each is read once, when needed).
        submission: ``{image_id: SubmissionImage}``; every image_id must be in ``gt`` and its
            ImageHeight x ImageWidth must equal the true mask's size.
        mode, iou_threshold, iou_type: as in :func:`cell_map`.
    Raises:
        ValueError naming the image (and the submission row) for an unknown ID or a size mismatch.
    """
    from hpa.eval.rle import instance_rles

    _check_args(mode, iou_threshold, iou_type)
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
            images.append(_ImageEval(np.zeros((0, len(label_ids))), labels, sub.mask_index, sub.classes, sub.confidences,
                                     image_id, iou_type))
            continue
        if iou_type == "box":
            t_ids, t_boxes = instance_boxes(gmask)
            _check_same_cells(image_id, t_ids, label_ids)
            iou = box_iou(rle_boxes(sub.rles), t_boxes)
        else:
            t_ids, t_rles = instance_rles(gmask)
            _check_same_cells(image_id, t_ids, label_ids)
            if t_rles:
                iou = np.asarray(mask_util.iou(sub.rles, t_rles, [0] * len(t_rles)), np.float64).reshape(sub.n_masks, len(t_rles))
            else:
                iou = np.zeros((sub.n_masks, 0))
        images.append(_ImageEval(iou, labels, sub.mask_index, sub.classes, sub.confidences, image_id, iou_type))
    return _score(images, _n_gt(gt), mode, iou_threshold, len(gt), iou_type=iou_type)
