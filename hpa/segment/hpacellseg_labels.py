"""The labelling rules of HPA-Cell-Segmentation 0.1.8's ``label_cell``, with wide labels.

Written for this project from a description of the package's behaviour (not copied from
it). The adapter uses it in two places:

* :func:`package_nuclei` is the package's nucleus step (step A below). Its count tells
  whether ``label_cell`` would wrap: ``label_cell`` narrows the first cell labels, which
  are still the nucleus ids, to uint8, so with 256 or more nuclei a cell whose id is a
  multiple of 256 is lost and cells whose ids differ by 256 share a label (merged where
  they touch). The package's behaviour is that of a bug, so fields with more than 255
  nuclei are labelled by :func:`label_cell_wide` instead;
* :func:`label_cell_wide` runs every step of ``label_cell`` with int32 labels: on a field
  with at most 255 nuclei its output equals the package's pixel for pixel.

Inputs are the uint8 ``(H, W, 3)`` outputs of ``CellSegmentator.pred_nuclei`` /
``pred_cells`` (channel 1: border probability x 255, channel 2: interior probability
x 255). N1, N2, C1, C2 below are channels 1 and 2 of the nuclei and of the cell
prediction. Every area is in pixels of the arrays given (the package was tuned on
2048-px fields at ``scale_factor`` 0.25, labelled at full resolution).

A. nuclei: seeds = N2/255 > 0.15 where the border is not certain (``(N1 + C1) mod 256``
   <= 242: the package adds the two uint8 channels, which wraps); 4-connected seed
   components under 500 px dropped, the rest numbered (4-connected). Mask = N2/255 > 0.4,
   background components (4-connected, image edge included) under 1000 px filled,
   components under 8 px dropped. Watershed of the flat mask from the seeds with 1-px
   lines where nuclei meet; nuclei under 2500 px dropped; renumbered 8-connected.
B. cell threshold t = max(0.22, Otsu(C2/255) / 2).
C. watershed of -C2 from the nuclei inside C2/255 > t (nuclei outside it get no cell);
   cells under 5500 px dropped (here the package narrows to uint8).
D. grey closing of the labels with a disk of radius 6.
E. boundaries off: every pixel with a 4-neighbour of another label (background
   included) is cleared, holes filled, components renumbered (4-connected); touching
   cells end 2 px apart and every cell loses its outer pixel ring.
F. the cells grow (watershed of -C2) into the predicted cell borders (C1 >= 13), then E again.
G. 8-connected components, under 5500 px dropped, renumbered 1..K.
H. nuclei = nuclear pixels (of A) inside cells, 8-connected pieces under 2500 px
   dropped, each labelled with the id of the cell it lies in; a cell may have no nucleus.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

#: label_cell's constants (pixels, probabilities in [0, 1]).
SEED_MIN = 500
HOLE_MAX = 1000
SPECK_MIN = 8
NUCLEUS_MIN = 2500
CELL_MIN = 5500
CLOSING_RADIUS = 6
NUCLEUS_THRESHOLD = 0.4
SEED_THRESHOLD = 0.4 - 0.25  # 0.15000000000000002, as the package computes it
BORDER_THRESHOLD = 0.05
CELL_THRESHOLD_MIN = 0.22
#: Largest label id that survives label_cell's uint8 cast.
MAX_NARROW_ID = 255


def _probe_inclusive_bounds() -> bool:
    """Whether scikit-image's ``remove_small_objects(x, n)`` also removes objects of exactly n px.

    The package passes its areas positionally (``min_size``, "smaller than n"). scikit-image
    0.26 deprecated that parameter and forwards its value as ``max_size`` ("n or fewer"),
    so on 0.26 every area bound of ``label_cell`` includes its value; on earlier versions
    (the competition's, 2021) it excludes it. Probed rather than read from the version.
    """
    import warnings

    from skimage.morphology import remove_small_objects

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return not remove_small_objects(np.array([[True, True, False]]), 2).any()


#: True when the installed scikit-image makes label_cell's area bounds inclusive (see above).
AREA_BOUNDS_INCLUSIVE = _probe_inclusive_bounds()


def _too_small(areas: np.ndarray, bound: int) -> np.ndarray:
    return areas <= bound if AREA_BOUNDS_INCLUSIVE else areas < bound


def _check(nuc_pred: np.ndarray, cell_pred: np.ndarray) -> None:
    for name, a in (("nuclei prediction", nuc_pred), ("cell prediction", cell_pred)):
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"{name}: expected uint8 (H, W, 3) as hpacellseg's pred_* return, got {a.dtype} {a.shape}")
    if nuc_pred.shape != cell_pred.shape:
        raise ValueError(f"nuclei and cell predictions differ in shape: {nuc_pred.shape} vs {cell_pred.shape}")


def _drop_small_labels(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Labels (per id) smaller than ``min_area`` px (or equal, see :data:`AREA_BOUNDS_INCLUSIVE`) set to 0."""
    if labels.max() <= 0:
        return labels
    small = _too_small(np.bincount(labels.ravel()), min_area)
    small[0] = False
    return np.where(small[labels], 0, labels) if small.any() else labels


def _drop_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    """4-connected components of a bool mask smaller than ``min_area`` px (or equal) removed."""
    comp, n = ndi.label(mask)
    if n == 0:
        return mask
    small = _too_small(np.bincount(comp.ravel()), min_area)
    small[0] = False
    return mask & ~small[comp]


def _fill_small_holes(mask: np.ndarray, max_area: int) -> np.ndarray:
    """Background components (4-connected, touching the image edge or not) under ``max_area`` px (or equal) filled."""
    return ~_drop_small_components(~mask, max_area)


def _cut_and_fill(labels: np.ndarray) -> np.ndarray:
    """Step E: clear every pixel next to another label, fill holes, renumber 4-connected."""
    from skimage.segmentation import find_boundaries

    kept = (labels > 0) & ~find_boundaries(labels, connectivity=1, mode="thick")
    return ndi.label(ndi.binary_fill_holes(kept))[0].astype(np.int32)


def package_nuclei(nuc_pred: np.ndarray, cell_pred: np.ndarray) -> np.ndarray:
    """Step A: nucleus labels, int32 ``(H, W)`` numbered 1..K (8-connected, raster order)."""
    from skimage.measure import label
    from skimage.segmentation import watershed

    _check(nuc_pred, cell_pred)
    n2 = nuc_pred[..., 2] / 255.0
    border_sum = nuc_pred[..., 1] + cell_pred[..., 1]  # uint8 + uint8: wraps mod 256, as in the package
    not_border = 1 - border_sum / 255.0 > BORDER_THRESHOLD
    seeds = _drop_small_components(n2 * not_border > SEED_THRESHOLD, SEED_MIN)
    markers = ndi.label(seeds)[0]
    mask = _drop_small_components(_fill_small_holes(n2 > NUCLEUS_THRESHOLD, HOLE_MAX), SPECK_MIN)
    flat = mask.astype(np.uint8)
    nuclei = watershed(flat, markers, mask=mask, watershed_line=True)
    nuclei = _drop_small_labels(nuclei, NUCLEUS_MIN)
    return label(nuclei, connectivity=2).astype(np.int32)


def cell_threshold(cell_pred: np.ndarray) -> float:
    """Step B: ``max(0.22, Otsu(C2/255) / 2)``; 0.22 for a constant C2."""
    from skimage.filters import threshold_otsu

    c2 = cell_pred[..., 2] / 255.0
    if c2.min() == c2.max():
        return CELL_THRESHOLD_MIN
    return max(CELL_THRESHOLD_MIN, float(threshold_otsu(c2)) * 0.5)


def label_cell_wide(nuc_pred: np.ndarray, cell_pred: np.ndarray,
                    nuclei: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Steps A-H of ``label_cell`` without the uint8 narrowing.

    Args:
        nuc_pred, cell_pred: uint8 ``(H, W, 3)`` predictions.
        nuclei: the result of :func:`package_nuclei` when already computed.
    Returns:
        ``(nuclei, cells)``, int32 ``(H, W)``: cells 1..K, nuclear pixels labelled with
        the id of their cell (0 elsewhere); a cell may have no nuclear pixels.
    """
    from skimage.measure import label
    from skimage.morphology import closing, disk
    from skimage.segmentation import watershed

    _check(nuc_pred, cell_pred)
    if nuclei is None:
        nuclei = package_nuclei(nuc_pred, cell_pred)
    c2 = cell_pred[..., 2]
    t = cell_threshold(cell_pred)
    depth = -c2.astype(np.float64)
    cells = watershed(depth, nuclei, mask=c2 / 255.0 > t)
    cells = _drop_small_labels(cells.astype(np.int32), CELL_MIN)
    cells = closing(cells, disk(CLOSING_RADIUS))
    cells = _cut_and_fill(cells)
    grow = (cells > 0) | (cell_pred[..., 1] / 255.0 > BORDER_THRESHOLD)
    cells = _cut_and_fill(watershed(depth, cells, mask=grow))
    cells = _drop_small_labels(label(cells > 0, connectivity=2), CELL_MIN)
    cells = label(cells, connectivity=2).astype(np.int32)
    pieces = _drop_small_labels(label((cells > 0) & (nuclei > 0), connectivity=2), NUCLEUS_MIN)
    return np.where(pieces > 0, cells, 0).astype(np.int32), cells
