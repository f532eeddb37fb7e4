"""Classical cell segmentation: nuclei by threshold + core/distance watershed, cells by seeded watershed.

Runs everywhere (NumPy, SciPy, OpenCV, scikit-image; no weights, no GPU). Every size
parameter is relative: to the working image side or to the *measured* median nucleus
size of the field, so the same settings serve 128/256-px synthetic fields and 2048/3072-px
HPA fields. The field is segmented at a reduced scale (longest side ``work_size``) and
the labels are upsampled (nearest) to the field's size.

Steps (at working scale):

1. Channels are normalised by a high percentile, so thresholds do not depend on
   bit depth or exposure.
2. Nuclei: the blue channel is smoothed and thresholded (Otsu on the log intensity,
   so dim nuclei next to bright ones survive) and holes are filled. *Cores* are the
   pixels brighter than a fraction of the brightest pixel within a nucleus radius, so
   the dim gap between two touching nuclei separates their cores whatever their
   brightness; cores touching by shape alone are split at the h-maxima of their
   distance transform (h relative to the measured nucleus radius), and a watershed
   grows the markers back over the nucleus mask. Fragments smaller than a fraction
   of the median nucleus are dropped; this also drops cells at the border whose
   nucleus is almost entirely out of frame, as HPA's reference segmentation does.
3. Cells: the cytoplasm signal (microtubules + ER, optionally + protein) is smoothed,
   a foreground mask is thresholded on its log intensity, and a watershed seeded by
   the nuclei floods the inverted signal inside the foreground, so touching cells
   part along the dim valley between them.
4. Cells are hole-filled, fragments are dropped, and labels are renumbered 1..K with
   nucleus k inside cell k.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from hpa.segment.common import check_field, empty_masks, finalize_masks, remove_small_labels

log = logging.getLogger(__name__)


@dataclass
class ClassicalParams:
    """Settings of :class:`ClassicalSegmenter`; sizes are relative (see each comment)."""

    work_size: int = 512  # longest side of the working image (fields smaller than this are not enlarged)
    norm_percentile: float = 99.9  # channels are divided by this percentile of their brightness
    nuc_sigma: float = 0.002  # nucleus smoothing, fraction of the working side
    nuc_threshold_scale: float = 1.0  # multiplies the automatic nucleus threshold (log-Otsu)
    core_window: float = 1.0  # window of the local brightness maximum, x nucleus radius
    core_frac: float = 0.4  # nucleus cores: pixels brighter than this x the local maximum
    split_h: float = 0.15  # touching nuclei split where the distance map has maxima this high (x nucleus radius)
    split_radius_px: float = 8.0  # touching nuclei are split on a grid where a nucleus radius is >= this (speed)
    min_nucleus: float = 0.10  # nuclei (or in-frame parts) smaller than this x median nucleus area are dropped
    cell_sigma: float = 0.10  # cytoplasm smoothing, x nucleus radius
    fg_sigma: float = 0.10  # smoothing of the signal the foreground is thresholded on, x nucleus radius
    cell_threshold_scale: float = 0.7  # multiplies the automatic cell-foreground threshold (log-Otsu)
    green_weight: float = 0.0  # weight of the protein channel in the cytoplasm signal (red + yellow weigh 1)
    min_cell: float = 0.35  # cells smaller than this x median nucleus area are dropped
    fill_holes: float = 1.0  # holes inside a cell smaller than this x median nucleus area are filled

    @classmethod
    def from_dict(cls, d: dict | None) -> "ClassicalParams":
        valid = {f.name for f in fields(cls)}
        bad = sorted(set(d or {}) - valid)
        if bad:
            raise ValueError(f"unknown classical segmenter setting(s) {bad}; valid: {sorted(valid)}")
        return cls(**(d or {}))


def _norm(ch: np.ndarray, pct: float) -> np.ndarray:
    ch = ch.astype(np.float32, copy=False)
    hi = float(np.percentile(ch, pct))
    if hi <= 0:
        hi = float(ch.max()) or 1.0
    return np.minimum(ch / hi, 1.5)


def _log_otsu(x: np.ndarray, eps: float) -> float:
    """Otsu threshold of ``log(x + eps)``, returned on the linear scale."""
    lx = np.log(x + eps)
    if float(lx.max() - lx.min()) < 1e-6:
        return float("inf")
    return float(np.exp(threshold_otsu(lx)) - eps)


def segment_nuclei(blue: np.ndarray, p: ClassicalParams) -> tuple[np.ndarray, float]:
    """Nucleus instance labels of a normalised blue channel at working scale.

    Args:
        blue: float32 (h, w), roughly in [0, 1.5].
        p: settings.
    Returns:
        ``(labels, median_area)``: int32 (h, w) labels 1..n (not necessarily
        consecutive) and the median nucleus area in working pixels (0.0 when none).
    """
    side = max(blue.shape)
    b = cv2.GaussianBlur(blue, (0, 0), max(p.nuc_sigma * side, 0.5))
    if float(b.max()) <= 0:
        return np.zeros(blue.shape, np.int32), 0.0
    t = _log_otsu(b, eps=0.01) * p.nuc_threshold_scale
    mask = b > t
    mask = ndi.binary_fill_holes(mask)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)).astype(bool)
    n, comp = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
    if n <= 1:
        return np.zeros(blue.shape, np.int32), 0.0
    areas = np.bincount(comp.ravel())[1:]
    big = areas[areas >= 1e-4 * blue.size]
    if big.size == 0:
        return np.zeros(blue.shape, np.int32), 0.0
    med = float(np.median(big))
    r = np.sqrt(med / np.pi)
    # cores: pixels at least `core_frac` of the local brightest nucleus around them, so that
    # the dim gap between two touching nuclei separates them whatever their brightness
    k = max(3, int(round(p.core_window * r)) | 1)
    local_max = cv2.dilate(b, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    core = mask & (b > p.core_frac * local_max)
    core = ndi.binary_fill_holes(core)
    # split touching cores: h-maxima of the (smoothed) distance transform
    # (found on a grid where a nucleus radius is about `split_radius_px`, enough to split them)
    dist = cv2.distanceTransform(core.astype(np.uint8), cv2.DIST_L2, 5)
    dist = cv2.GaussianBlur(dist, (0, 0), max(0.1 * r, 0.5))
    f = max(1, int(r // p.split_radius_px))
    if f > 1:
        small = dist[f // 2::f, f // 2::f] / f
        peaks_s = h_maxima(small, max(p.split_h * r / f, 0.5)).astype(np.uint8)
        peaks = cv2.resize(peaks_s, (blue.shape[1], blue.shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
    else:
        peaks = h_maxima(dist, max(p.split_h * r, 0.5)).astype(bool)
    markers = cv2.connectedComponents((peaks & core).astype(np.uint8), connectivity=8)[1]
    dist_full = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    labels = watershed(-(dist + 0.5 * dist_full), markers, mask=mask).astype(np.int32)
    # components that got no marker (tiny, flat) keep their own label
    missing = mask & (labels == 0)
    if missing.any():
        extra = cv2.connectedComponents(missing.astype(np.uint8), connectivity=4)[1]
        labels[missing] = extra[missing] + labels.max()
    labels = remove_small_labels(labels, p.min_nucleus * med)
    kept = np.bincount(labels.ravel())[1:]
    kept = kept[kept > 0]
    return labels, float(np.median(kept)) if kept.size else 0.0


def segment_cells(cyto: np.ndarray, nuclei: np.ndarray, nuc_area: float, p: ClassicalParams) -> np.ndarray:
    """Whole-cell labels by a nucleus-seeded watershed over the cytoplasm signal.

    Args:
        cyto: float32 (h, w) normalised cytoplasm signal.
        nuclei: int32 (h, w) nucleus labels (seeds).
        nuc_area: median nucleus area in working pixels.
    Returns:
        int32 (h, w) cell labels, each carrying its seed's label.
    """
    r = np.sqrt(nuc_area / np.pi)
    s = cv2.GaussianBlur(cyto, (0, 0), max(p.cell_sigma * r, 0.5))
    sf = cv2.GaussianBlur(cyto, (0, 0), max(p.fg_sigma * r, 0.5))
    t = _log_otsu(sf, eps=0.01) * p.cell_threshold_scale
    fg = (sf > t) | (nuclei > 0)
    landscape = -s
    landscape[nuclei > 0] = -s.max() - 1.0
    cells = watershed(landscape, nuclei, mask=fg).astype(np.int32)
    return cells


class ClassicalSegmenter:
    """Nucleus-seeded watershed segmenter; see the module docstring.

    ``segment(field)`` takes a uint8/uint16 ``(4, H, W)`` field (red, green, blue,
    yellow) and returns ``(cell_mask, nuclei_mask)``, int32 ``(H, W)``: cells 1..K,
    nucleus k inside cell k, every cell with exactly one nucleus.
    """

    name = "classical"

    def __init__(self, **kw):
        self.params = ClassicalParams.from_dict(kw)

    def segment(self, field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        field = check_field(field)
        p = self.params
        _, H, W = field.shape
        scale = min(1.0, p.work_size / max(H, W))
        h, w = max(1, round(H * scale)), max(1, round(W * scale))
        chans = [field[c] for c in (0, 1, 2, 3)]
        if (h, w) != (H, W):
            chans = [cv2.resize(c, (w, h), interpolation=cv2.INTER_AREA) for c in chans]
        red, green, blue, yellow = (_norm(c, p.norm_percentile) for c in chans)
        nuclei, nuc_area = segment_nuclei(blue, p)
        if nuc_area <= 0:
            log.warning("no nuclei found in a %dx%d field: returning empty masks", W, H)
            return empty_masks((H, W))
        cyto = (red + yellow + p.green_weight * green) / (2.0 + p.green_weight)
        cells = segment_cells(cyto, nuclei, nuc_area, p)
        cells = _fill_label_holes(cells, p.fill_holes * nuc_area)
        cells = remove_small_labels(cells, p.min_cell * nuc_area)
        nuclei = np.where(cells == nuclei, nuclei, 0)
        cells, nuclei = finalize_masks(cells, nuclei)
        if (h, w) != (H, W):  # nearest upsampling keeps every label and nucleus k inside cell k
            cells = cv2.resize(cells, (W, H), interpolation=cv2.INTER_NEAREST)
            nuclei = cv2.resize(nuclei, (W, H), interpolation=cv2.INTER_NEAREST)
        return cells, nuclei


def _fill_label_holes(labels: np.ndarray, max_hole: float) -> np.ndarray:
    """Give background holes (area <= max_hole, not touching the image border) that are
    enclosed by a single cell to that cell. int32 (h, w) in and out."""
    n, comp = cv2.connectedComponents((labels == 0).astype(np.uint8), connectivity=4)
    if n <= 2:
        return labels
    areas = np.bincount(comp.ravel(), minlength=n)
    cand = areas <= max_hole
    cand[np.unique(np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]]))] = False
    cand[0] = False  # 0: the cells themselves
    if not cand.any():
        return labels
    # (hole, neighbouring cell) pairs over the four neighbour directions
    pairs = []
    for a, b in (((slice(1, None), slice(None)), (slice(None, -1), slice(None))),
                 ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
                 ((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
                 ((slice(None), slice(None, -1)), (slice(None), slice(1, None)))):
        h, c = comp[a], labels[b]
        sel = cand[h] & (c > 0)
        pairs.append(np.stack([h[sel], c[sel]], 1))
    pairs = np.unique(np.concatenate(pairs), axis=0)
    holes, counts = np.unique(pairs[:, 0], return_counts=True)
    single = holes[counts == 1]
    if single.size == 0:
        return labels
    owner = np.zeros(n, np.int64)
    first = pairs[np.isin(pairs[:, 0], single)]
    owner[first[:, 0]] = first[:, 1]
    fill = owner[comp]
    return np.where((labels == 0) & (fill > 0), fill, labels).astype(labels.dtype)
