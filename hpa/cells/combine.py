"""How a cell's confidence for each class is formed from the models' outputs.

:func:`combine` is the one documented rule used for the submission and for every
row of the report, so the report measures exactly what is submitted:

- classes 0..17: ``cell`` (the default profile): the cell model alone; ``product`` (the
  ``full`` profile; what the top HPA teams found best): ``conf_c = P_cell,c x P_image,c``;
  ``mean``: their average; ``image``: the image probability broadcast to every cell;
  ``product_max``: ``P_cell,c x P_image,c x M_c`` with ``M_c`` the highest ``P_cell,c`` among
  the cells of the same image (two estimates of whether the image shows c at all). On the
  synthetic benchmark the cell model is the stronger of the two, and multiplying by the image
  probability adds the image model's errors: on the validation fold's held-out cells
  ``cell`` beat ``product`` for both cycles (docs/cell_model.md), and on the test split too.
  That holds for the competition's scoring, which ignores predictions of classes the image
  lacks; ranking all cells of a data set by one class (the ``strict`` mode) needs the
  image-level factors, and there ``product_max`` was best (the stage-06 ranking output,
  ``predict.rank_combine``; docs/cell_model.md).
- Negative (18): ``max`` (default): ``max(P_cell,18, P_image,18)``; ``min_complement``:
  ``min over c < 18 of (1 - conf_c)``; ``cell``: ``P_cell,18``.
- quality penalty (``small_cell_penalty``): every confidence of a cell is multiplied by
  ``min(1, rel_area / 0.5) ** 0.5`` (``rel_area`` = area / median cell area of the image)
  and by 0.8 when the cell touches the field border; such cells are often mis-segmented
  or cut, so their predictions are less likely to match a true cell.

Every cell gets a confidence for all 19 classes: under the competition's (Open Images)
scoring an extra low-confidence prediction of a class the image does not have is ignored.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hpa.cells.table import CAM_MEAN_COLS, CAM_TOPK_COLS, IMG_COLS, VIEW_COLS
from hpa.constants import NEGATIVE, NUM_CLASSES, PROB_COLS

COMBINE = ("product", "mean", "cell", "image", "product_max")
NEGATIVE_RULES = ("max", "min_complement", "cell")


def quality_factor(rel_area: np.ndarray, touches_border: np.ndarray) -> np.ndarray:
    """Confidence multiplier (N,) in (0, 1] for small cells and cells cut by the border."""
    f = np.minimum(1.0, np.asarray(rel_area, np.float64) / 0.5) ** 0.5
    return (f * np.where(np.asarray(touches_border, bool), 0.8, 1.0)).astype(np.float32)


def image_max(values: np.ndarray, image_ids) -> np.ndarray:
    """Per cell (N, K): the column-wise maximum of ``values`` (N, K) over the cells of its image."""
    values = np.asarray(values, np.float64)
    codes = pd.factorize(pd.Series(np.asarray(image_ids)), sort=False)[0]
    n = int(codes.max()) + 1 if len(codes) else 0
    agg = np.full((n, values.shape[1]), -np.inf)
    np.maximum.at(agg, codes, values)
    return agg[codes]


def combine(img_probs: np.ndarray, cell_probs: np.ndarray | None = None, method: str = "product",
            negative: str = "max", quality: np.ndarray | None = None, image_ids=None) -> np.ndarray:
    """Cell confidences float32 (N, 19) in [0, 1].

    Args:
        img_probs: (N, 19) image-level sigmoid probabilities of each cell's image.
        cell_probs: (N, 19) cell-level softmax probabilities (None only for ``image``).
        method: one of :data:`COMBINE`; negative: one of :data:`NEGATIVE_RULES`.
        quality: optional (N,) multiplier from :func:`quality_factor`.
        image_ids: (N,) each cell's image (``product_max`` only: which cells share an image).
    """
    if method not in COMBINE:
        raise ValueError(f"unknown combination {method!r}; valid: {', '.join(COMBINE)}")
    if negative not in NEGATIVE_RULES:
        raise ValueError(f"unknown negative rule {negative!r}; valid: {', '.join(NEGATIVE_RULES)}")
    img = np.asarray(img_probs, np.float32)
    if method != "image":
        if cell_probs is None:
            raise ValueError(f"combination {method!r} needs cell probabilities")
        cell = np.asarray(cell_probs, np.float32)
        if cell.shape != img.shape:
            raise ValueError(f"cell probabilities {cell.shape} and image probabilities {img.shape} differ in shape")
    conf = np.empty_like(img)
    if method == "product":
        conf[:, :NEGATIVE] = cell[:, :NEGATIVE] * img[:, :NEGATIVE]
    elif method == "mean":
        conf[:, :NEGATIVE] = 0.5 * (cell[:, :NEGATIVE] + img[:, :NEGATIVE])
    elif method == "cell":
        conf[:, :NEGATIVE] = cell[:, :NEGATIVE]
    elif method == "product_max":
        if image_ids is None or len(image_ids) != len(cell):
            raise ValueError(f"combination 'product_max' needs the image ID of each of the {len(cell)} cells")
        conf[:, :NEGATIVE] = cell[:, :NEGATIVE] * img[:, :NEGATIVE] * image_max(cell[:, :NEGATIVE], image_ids)
    else:
        conf[:] = img
    if method != "image":
        if negative == "max":
            conf[:, NEGATIVE] = np.maximum(cell[:, NEGATIVE], img[:, NEGATIVE])
        elif negative == "cell":
            conf[:, NEGATIVE] = cell[:, NEGATIVE]
    if negative == "min_complement":
        conf[:, NEGATIVE] = (1 - conf[:, :NEGATIVE]).min(1)
    if quality is not None:
        conf *= np.asarray(quality, np.float32)[:, None]
    return np.clip(conf, 0, 1)


def needs_image_probs(method: str, negative: str) -> bool:
    """Whether :func:`combine` with ``method`` / ``negative`` reads the image probabilities."""
    return method in ("product", "mean", "image") or negative == "max"


def needs_cell_probs(method: str) -> bool:
    """Whether :func:`combine` with ``method`` reads the cell model's probabilities."""
    return method != "image"


def rule_confidences(img_probs: np.ndarray | None, cell_probs: np.ndarray | None, rel_area: np.ndarray,
                     touches_border: np.ndarray, method: str, negative: str, penalty: bool,
                     image_ids=None) -> np.ndarray:
    """The submitted confidences (N, 19): :func:`combine` with the quality penalty when ``penalty``.

    What stage 06 submits for a cell model and stage 08 gives new fields, one rule for both.
    ``img_probs`` (N, 19) may be None when :func:`needs_image_probs` is False, ``cell_probs``
    (N, 19) when :func:`needs_cell_probs` is False; ``rel_area`` and ``touches_border`` (N,)
    are the cell table's columns (:func:`hpa.cells.table.cell_geometry`); ``image_ids`` (N,) each
    cell's image (read by ``product_max`` only).
    """
    n = len(rel_area)
    if img_probs is None:
        if needs_image_probs(method, negative):
            raise ValueError(f"combination {method!r} with negative rule {negative!r} needs image probabilities")
        img_probs = np.zeros((n, NUM_CLASSES), np.float32)  # never read by combine() for this rule
    quality = quality_factor(rel_area, touches_border) if penalty else None
    return combine(img_probs, cell_probs, method, negative, quality, image_ids)


def cam_confidences(table: pd.DataFrame, score: str = "topk_mean", quality: np.ndarray | None = None,
                    gamma: float = 1.0) -> np.ndarray:
    """The CAM baseline: ``conf_c = CAM score_c ** gamma x P_image,c`` (N, 19); Negative as
    ``min_complement`` of the classes (a cell with no CAM signal is Negative).

    The CAM score is relative to the image's own peak (1 for its strongest cell), so it orders
    cells within an image and says nothing about how sure the image is; ``gamma`` < 1 lets the
    image probability keep more of the order between images (0: broadcast, ties broken by
    nothing)."""
    cols = CAM_TOPK_COLS if score == "topk_mean" else CAM_MEAN_COLS
    cam = np.clip(np.nan_to_num(table[cols].to_numpy(np.float32), nan=0.0), 0, None)
    img = table[IMG_COLS].to_numpy(np.float32)
    conf = (cam ** np.float32(gamma) if gamma != 1 else cam) * img
    conf[:, NEGATIVE] = (1 - conf[:, :NEGATIVE]).min(1)
    if quality is not None:
        conf *= np.asarray(quality, np.float32)[:, None]
    return np.clip(conf, 0, 1)


def view_confidences(table: pd.DataFrame, quality: np.ndarray | None = None) -> np.ndarray:
    """The isolated-cell baseline: ``conf_c = V_c x P_image,c`` (N, 19) with ``V`` the image model's
    probabilities for the cell alone (``view_p*``, :mod:`hpa.cells.view`); Negative as
    ``min_complement``. No cell model involved."""
    view = np.nan_to_num(table[VIEW_COLS].to_numpy(np.float32), nan=0.0)
    conf = view * table[IMG_COLS].to_numpy(np.float32)
    conf[:, NEGATIVE] = (1 - conf[:, :NEGATIVE]).min(1)
    if quality is not None:
        conf *= np.asarray(quality, np.float32)[:, None]
    return np.clip(conf, 0, 1)


def aligned_cell_probs(table: pd.DataFrame, probs: pd.DataFrame, source: str = "cell probabilities") -> np.ndarray:
    """Rows of ``probs`` (ID, cell_id, p0..p18) in the order of ``table``; missing cells are an error."""
    merged = table[["ID", "cell_id"]].merge(probs, on=["ID", "cell_id"], how="left", validate="one_to_one")
    bad = merged[PROB_COLS[0]].isna()
    if bad.any():
        first = merged[bad].iloc[0]
        raise ValueError(f"{source}: no prediction for {int(bad.sum())} cells (first: image {first.ID} cell {first.cell_id})")
    return merged[PROB_COLS].to_numpy(np.float32)
