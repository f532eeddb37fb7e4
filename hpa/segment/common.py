"""Checks and clean-up shared by every segmenter (the mask contract lives here).

Contract of ``segment(field) -> (cell_mask, nuclei_mask)``: both int32 ``(H, W)``,
0 = background, cells numbered 1..K consecutively, nucleus k labelled k and lying
inside cell k, every cell with exactly one (non-empty) nucleus. One exception: the
hpacellseg adapter with its default labeler keeps the package's cells that have no
nucleus (``require_nucleus=False`` below), as the package's own masks do.
"""

from __future__ import annotations

import numpy as np

from hpa.io.errors import InputError


def check_field(field: np.ndarray) -> np.ndarray:
    """Check a field is a uint8/uint16 ``(4, H, W)`` array; return it as an ndarray.

    Raises :class:`hpa.io.fields.InputError` (a ``ValueError``) saying what arrived.
    """
    field = np.asarray(field)
    if field.ndim != 3 or field.shape[0] != 4:
        raise InputError(f"expected a field of shape (4, H, W) (red, green, blue, yellow), got shape {field.shape}")
    if field.dtype not in (np.uint8, np.uint16):
        raise InputError(f"expected a uint8 or uint16 field, got dtype {field.dtype}")
    if min(field.shape[1:]) < 8:
        raise InputError(f"field of {field.shape[2]}x{field.shape[1]} px is too small to segment (need >= 8 px a side)")
    return field


def empty_masks(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Two all-background int32 masks of ``shape``."""
    return np.zeros(shape, np.int32), np.zeros(shape, np.int32)


def finalize_masks(cells: np.ndarray, nuclei: np.ndarray,
                   require_nucleus: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Enforce the mask contract on raw labels.

    Args:
        cells: integer (H, W) cell labels (any ids, 0 = background).
        nuclei: integer (H, W) nucleus labels; a nucleus pixel belongs to the cell it
            lies in, whatever its own id (pixels outside every cell are dropped).
        require_nucleus: remove cells without nucleus pixels (False: keep them).
    Returns:
        ``(cell_mask, nuclei_mask)`` int32, cells renumbered 1..K in order of their old
        ids, nucleus k = nucleus pixels inside cell k.
    """
    cells = np.asarray(cells)
    nuclei = np.asarray(nuclei)
    if cells.shape != nuclei.shape or cells.ndim != 2:
        raise ValueError(f"cell and nuclei masks must be 2-D of one shape, got {cells.shape} and {nuclei.shape}")
    cells = cells.astype(np.int64, copy=False)
    nuc_in = (nuclei > 0) & (cells > 0)
    top = int(cells.max()) if cells.size else 0
    has_nuc = np.bincount(cells[nuc_in], minlength=top + 1) > 0
    has_nuc[0] = False
    present = np.bincount(cells.ravel(), minlength=top + 1) > 0
    keep = (has_nuc & present) if require_nucleus else present
    keep[0] = False
    lut = np.zeros(top + 1, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    cell_mask = lut[cells]
    nuclei_mask = np.where(nuc_in, cell_mask, 0).astype(np.int32)
    return cell_mask, nuclei_mask


def check_masks(cell_mask: np.ndarray, nuclei_mask: np.ndarray, require_nucleus: bool = True) -> None:
    """Raise ``AssertionError`` describing the first violation of the mask contract.

    ``require_nucleus=False``: cells without a nucleus are allowed (hpacellseg's labeler).
    """
    assert cell_mask.dtype == np.int32 and nuclei_mask.dtype == np.int32, (cell_mask.dtype, nuclei_mask.dtype)
    assert cell_mask.shape == nuclei_mask.shape, (cell_mask.shape, nuclei_mask.shape)
    ids = np.unique(cell_mask)
    ids = ids[ids > 0]
    assert np.array_equal(ids, np.arange(1, len(ids) + 1)), f"cell ids not 1..K: {ids[:10]}..."
    inside = nuclei_mask > 0
    assert np.array_equal(nuclei_mask[inside], cell_mask[inside]), "a nucleus lies outside its cell"
    nids = np.unique(nuclei_mask[inside])
    if require_nucleus:
        assert np.array_equal(nids, ids), f"cells without nucleus: {sorted(int(i) for i in set(ids) - set(nids))[:10]}"


def remove_small_labels(labels: np.ndarray, min_area: float) -> np.ndarray:
    """``labels`` (instance ids, 0 background) with every instance smaller than ``min_area`` pixels set to 0
    (ids are kept; a new array only when something is removed)."""
    if labels.max() == 0:
        return labels
    areas = np.bincount(labels.ravel())
    small = areas < min_area
    small[0] = False
    return np.where(small[labels], 0, labels) if small.any() else labels
