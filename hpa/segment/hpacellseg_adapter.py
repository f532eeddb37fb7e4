"""Adapter for HPA-Cell-Segmentation (``hpacellseg`` 0.1.8, CellProfiling), the reference tool.

Install (not a dependency of this project)::

    pip install https://github.com/CellProfiling/HPA-Cell-Segmentation/archive/master.zip

and put its two model files somewhere local (``dpn_unet_nuclei_v1.pth`` and
``dpn_unet_cell_3ch_v1.pth``, or ``dpn_unet_cell_v2.pth`` for the 2-channel model, from
the project's Zenodo record 4665863); pass their paths as ``nuclei_model`` /
``cell_model`` (config ``segment.nuclei_model`` / ``segment.cell_model``, or the stage's
``--nuclei-model`` / ``--cell-model``). Nothing is ever downloaded: the files are checked
before the package is asked to build anything (its constructor downloads when a path is
missing) and loaded here, so the package only ever sees loaded models.

The network step is the package's own (``CellSegmentator.pred_nuclei`` /
``pred_cells``); the adapter guards the known traps of 0.1.8 around it:

* ``label_cell``'s area thresholds are absolute pixels for 2048-px fields (empty masks
  at 512 px, its issue #20): fields smaller than ``reference_size`` are enlarged to it
  first, and the default labelling step (``labeler="relative"``, :func:`label_predictions`)
  scales every area with the field instead;
* its resize back to the input size swaps height and width (right only for square
  images): fields are padded to a square and cropped back;
* network inputs must be multiples of 32 px after scaling (non-square 1728-px fields
  fail without ``padding=True``, its issue #16): the square side is rounded up so that
  the scaled side is a multiple of 32, and ``padding`` is switched on where that cannot be;
* ``label_cell`` casts labels to uint8, wrapping labels above 255 (cells lost or
  merged): with ``labeler="hpacellseg"`` a field with more than 255 nucleus seeds is
  labelled by :func:`label_predictions` instead, with a warning;
* it uses ``np.bool`` (missing from NumPy 1.24-1.26): shimmed as ``bool`` only when absent;
* it calls ``skimage.transform.rescale(..., multichannel=True)``, a keyword removed from
  scikit-image 0.19+: the package module's ``transform`` is given a shim translating it
  to ``channel_axis=-1`` (only inside ``hpacellseg.cellsegmentator``);
* its model files are whole pickled modules, which ``torch.load`` refuses by default
  from torch 2.6: they are loaded here with ``weights_only=False`` (trusted files only).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

from hpa.io.fields import to_uint8
from hpa.segment.common import check_field, empty_masks, finalize_masks

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install HPA-Cell-Segmentation with\n"
    "    pip install https://github.com/CellProfiling/HPA-Cell-Segmentation/archive/master.zip\n"
    "(it also needs pytorch_zoo: pip install https://github.com/haoxusci/pytorch_zoo/archive/master.zip)"
)
WEIGHTS_HINT = (
    "download the model files once, by hand, from https://zenodo.org/record/4665863 "
    "(dpn_unet_nuclei_v1.pth, and dpn_unet_cell_3ch_v1.pth or dpn_unet_cell_v2.pth for "
    "multi_channel_model=False), keep them locally (for example models/hpacellseg/) and pass "
    "--nuclei-model PATH --cell-model PATH (config segment.nuclei_model / segment.cell_model); "
    "this project never downloads weights"
)

#: Areas of label_cell at a 2048-px field, as fractions of the field's area.
_REF_SIDE = 2048
_NUC_SEED_MIN = 500 / _REF_SIDE**2
_NUC_MIN = 2500 / _REF_SIDE**2
_CELL_MIN = 5500 / _REF_SIDE**2
_HOLE_MAX = 1000 / _REF_SIDE**2


def check_weights(nuclei_model, cell_model) -> tuple[Path, Path]:
    """Both weight paths as :class:`Path`; ``FileNotFoundError`` (with instructions) when absent."""
    out = []
    for what, p in (("nuclei_model", nuclei_model), ("cell_model", cell_model)):
        if p is None or str(p) == "":
            raise FileNotFoundError(f"segmenter 'hpacellseg' needs {what}: no path given; {WEIGHTS_HINT}")
        p = Path(os.path.expanduser(str(p)))
        if not p.is_file():
            raise FileNotFoundError(f"segmenter 'hpacellseg': {what} file {p} does not exist; {WEIGHTS_HINT}")
        out.append(p)
    return out[0], out[1]


def import_hpacellseg():
    """``(cellsegmentator, utils)`` modules of hpacellseg, with the NumPy/scikit-image shims applied."""
    if not hasattr(np, "bool"):  # hpacellseg 0.1.8 uses np.bool (removed in NumPy 1.24, back in 2.0)
        np.bool = bool
    try:
        from hpacellseg import cellsegmentator, utils
    except ImportError as exc:
        raise ImportError(f"segmenter 'hpacellseg' needs the hpacellseg package ({exc}); {INSTALL_HINT}") from exc
    patch_rescale(cellsegmentator)
    return cellsegmentator, utils


class _TransformShim:
    """Stands for ``skimage.transform`` inside hpacellseg: ``multichannel=`` -> ``channel_axis=``."""

    def __init__(self, module):
        self._module = module

    def rescale(self, image, scale, *args, multichannel=None, **kw):
        if multichannel:
            kw.setdefault("channel_axis", -1)
        return self._module.rescale(image, scale, *args, **kw)

    def __getattr__(self, name):
        return getattr(self._module, name)


def patch_rescale(module) -> None:
    """Give ``module.transform`` the shim when scikit-image's rescale lacks ``multichannel``."""
    transform = getattr(module, "transform", None)
    if transform is None or isinstance(transform, _TransformShim):
        return
    if "multichannel" not in inspect.signature(transform.rescale).parameters:
        module.transform = _TransformShim(transform)


def _load_model(path: Path, device: str):
    import torch

    try:
        model = torch.load(str(path), map_location=torch.device(device), weights_only=False)
    except Exception as exc:
        raise RuntimeError(f"segmenter 'hpacellseg': cannot load model file {path} ({type(exc).__name__}: {exc}); "
                           f"{WEIGHTS_HINT}") from exc
    if isinstance(model, torch.nn.DataParallel):
        model = model.module
    if hasattr(model, "eval"):
        model.eval()
    return model


def padded_side(side: int, scale_factor: float, multiple: int = 32) -> tuple[int, bool]:
    """Square side >= ``side`` whose scaled size is a multiple of ``multiple``.

    Returns ``(new_side, needs_padding)``: ``needs_padding`` is True when no such side
    exists at this scale factor (``multiple / scale_factor`` not an integer), so the
    package's own padding must be used.
    """
    unit = multiple / scale_factor
    if abs(unit - round(unit)) > 1e-6:
        return side, True
    unit = int(round(unit))
    return int(math.ceil(side / unit) * unit), False


class HPACellSegmenter:
    """``segment(field)`` with HPA-Cell-Segmentation's networks; see the module docstring.

    Args:
        nuclei_model, cell_model: local paths of the model files (required).
        scale_factor: network scale of a ``reference_size`` field (0.25: 512 px).
        device: ``cpu`` | ``cuda`` | ``cuda:N`` | ``auto``.
        padding: ask the package to pad (switched on by itself where sizes need it).
        multi_channel_model: 3-channel cell model (red, yellow, blue) or 2-channel (red, blue).
        labeler: ``relative`` (:func:`label_predictions`) or ``hpacellseg`` (its ``label_cell``).
        reference_size: smaller fields are enlarged to this side before the networks.
    """

    name = "hpacellseg"

    def __init__(self, nuclei_model=None, cell_model=None, scale_factor: float = 0.25, device: str = "cpu",
                 padding: bool = False, multi_channel_model: bool = True, labeler: str = "relative",
                 reference_size: int = 2048):
        if labeler not in ("relative", "hpacellseg"):
            raise ValueError(f"unknown labeler {labeler!r}; valid: relative, hpacellseg")
        if not 0 < scale_factor <= 1:
            raise ValueError(f"scale_factor must lie in (0, 1], got {scale_factor}")
        nuc_path, cell_path = check_weights(nuclei_model, cell_model)  # before anything can download
        cellsegmentator, self._utils = import_hpacellseg()
        if device == "auto":
            from hpa.config import resolve_device

            device = resolve_device(device)
        self.scale_factor = float(scale_factor)
        self.padding = bool(padding)
        self.multi_channel_model = bool(multi_channel_model)
        self.labeler = labeler
        self.reference_size = int(reference_size)
        self._seg = cellsegmentator.CellSegmentator(
            nuclei_model=_load_model(nuc_path, device),
            cell_model=_load_model(cell_path, device),
            scale_factor=self.scale_factor,
            device=device,
            padding=self.padding,
            multi_channel_model=self.multi_channel_model,
        )

    def predict(self, field: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """Network outputs for a field, guarded against the package's size traps.

        Returns ``(nuclei_pred, cell_pred, (h, w))``: uint8 ``(S, S, 3)`` probability maps
        of the enlarged, square-padded field and the size ``(h, w)`` of the field's
        region in them (top-left corner).
        """
        field = to_uint8(check_field(field))
        _, H, W = field.shape
        up = max(1.0, self.reference_size / max(H, W))
        h, w = int(round(H * up)), int(round(W * up))
        red, _, blue, yellow = (cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) if up > 1 else c for c in field)
        side, need_pad = padded_side(max(h, w), self.scale_factor)
        sq = [np.pad(c, ((0, side - h), (0, side - w))) for c in (red, yellow, blue)]
        self._seg.padding = self.padding or need_pad
        nuc_pred = self._seg.pred_nuclei([sq[2]])[0]
        er = [sq[1]] if self.multi_channel_model else None
        cell_pred = self._seg.pred_cells([[sq[0]], er, [sq[2]]])[0]
        for name, pred in (("pred_nuclei", nuc_pred), ("pred_cells", cell_pred)):
            if pred.shape[:2] != (side, side):
                raise RuntimeError(f"hpacellseg {name} returned shape {pred.shape} for a {side}x{side} input")
        return nuc_pred, cell_pred, (h, w)

    def segment(self, field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, H, W = np.shape(field)
        nuc_pred, cell_pred, (h, w) = self.predict(field)
        if self.labeler == "hpacellseg" and count_seeds(nuc_pred) <= 255:
            nuclei, cells = self._utils.label_cell(nuc_pred, cell_pred)
        else:
            if self.labeler == "hpacellseg":
                log.warning("more than 255 nuclei: hpacellseg's label_cell would wrap labels (uint8); "
                            "using the relative labelling step for this field")
            nuclei, cells = label_predictions(nuc_pred, cell_pred)
        cells = np.asarray(cells)[:h, :w].astype(np.int32)
        nuclei = np.asarray(nuclei)[:h, :w].astype(np.int32)
        if (h, w) != (H, W):
            cells = cv2.resize(cells, (W, H), interpolation=cv2.INTER_NEAREST)
            nuclei = cv2.resize(nuclei, (W, H), interpolation=cv2.INTER_NEAREST)
        cells, nuclei = finalize_masks(cells, nuclei)
        if cells.max() == 0:
            log.warning("hpacellseg found no cells in a %dx%d field: returning empty masks", W, H)
            return empty_masks((H, W))
        return cells, nuclei


def count_seeds(nuc_pred: np.ndarray, threshold: float = 0.4) -> int:
    """Number of nucleus blobs (probability > threshold, area >= label_cell's minimum) in a prediction."""
    side2 = nuc_pred.shape[0] * nuc_pred.shape[1]
    n, comp = cv2.connectedComponents((nuc_pred[..., 2] > threshold * 255).astype(np.uint8), connectivity=4)
    if n <= 1:
        return 0
    areas = np.bincount(comp.ravel())[1:]
    return int((areas >= _NUC_MIN * side2).sum())


def label_predictions(nuc_pred: np.ndarray, cell_pred: np.ndarray, nuc_threshold: float = 0.4,
                      border_threshold: float = 0.05, cell_threshold_min: float = 0.22) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei and cell labels from hpacellseg's network outputs, with relative sizes and int32.

    Same idea as the package's ``label_cell`` (nucleus seeds away from predicted borders,
    a watershed over the cell probability seeded by the nuclei), written independently:
    every area threshold is the reference one as a fraction of the field's area, and
    labels are never narrowed to uint8.

    Args:
        nuc_pred, cell_pred: uint8 (H, W, 3) outputs of ``pred_nuclei`` / ``pred_cells``
            (channel 1: borders, channel 2: object interior; 0..255).
    Returns:
        ``(nuclei, cells)`` int32 (H, W); nucleus labels equal their cell's label.
    """
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    if nuc_pred.shape != cell_pred.shape or nuc_pred.ndim != 3:
        raise ValueError(f"expected two (H, W, 3) predictions of one shape, got {nuc_pred.shape} and {cell_pred.shape}")
    area = nuc_pred.shape[0] * nuc_pred.shape[1]
    nuc = nuc_pred[..., 2].astype(np.float32) / 255
    border = (nuc_pred[..., 1].astype(np.float32) + cell_pred[..., 1]) / 255
    cell = cell_pred[..., 2].astype(np.float32) / 255
    # nuclei: seeds inside confident nuclei away from borders, grown over the nucleus mask
    seeds = cv2.connectedComponents(((nuc > nuc_threshold) & (border < border_threshold)).astype(np.uint8), connectivity=4)[1]
    seeds = _drop_small(seeds, _NUC_SEED_MIN * area)
    nuc_mask = _fill_small_holes(nuc > nuc_threshold, _HOLE_MAX * area)
    nuclei = watershed(-nuc, seeds, mask=nuc_mask, watershed_line=True).astype(np.int32)
    nuclei = _drop_small(nuclei, _NUC_MIN * area)
    if nuclei.max() == 0:
        return np.zeros(nuc.shape, np.int32), np.zeros(nuc.shape, np.int32)
    # cells: nucleus-seeded watershed over the cell probability, inside the confident cell region
    t = max(cell_threshold_min, 0.5 * float(threshold_otsu(cell))) if cell.max() > cell.min() else cell_threshold_min
    region = ((cell > t) & (cell_pred[..., 1] <= border_threshold * 255)) | (nuclei > 0)
    cells = watershed(-np.maximum(cell, t), nuclei, mask=region).astype(np.int32)
    cells = _drop_small(cells, _CELL_MIN * area)
    nuclei = np.where(cells == nuclei, nuclei, 0)
    return nuclei, cells


def _drop_small(labels: np.ndarray, min_area: float) -> np.ndarray:
    if labels.max() == 0:
        return labels
    areas = np.bincount(labels.ravel())
    small = areas < min_area
    small[0] = False
    return np.where(small[labels], 0, labels) if small.any() else labels


def _fill_small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    holes = ndi.binary_fill_holes(mask) & ~mask
    if not holes.any():
        return mask
    n, comp = cv2.connectedComponents(holes.astype(np.uint8), connectivity=4)
    areas = np.bincount(comp.ravel())
    small = areas <= max_area
    small[0] = False
    return mask | small[comp]
