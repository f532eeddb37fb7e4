"""Adapter for HPA-Cell-Segmentation (``hpacellseg`` 0.1.8, CellProfiling), the reference tool.

Install (not a dependency of this project)::

    pip install https://github.com/CellProfiling/HPA-Cell-Segmentation/archive/master.zip

and put its two model files somewhere local (``dpn_unet_nuclei_v1.pth`` and
``dpn_unet_cell_3ch_v1.pth``, or ``dpn_unet_cell_v2.pth`` for the 2-channel model, from
the project's Zenodo record 4665863); pass their paths as ``nuclei_model`` /
``cell_model`` (config ``segment.hpacellseg.nuclei_weights`` / ``cell_weights``, or the
stage's ``--nuclei-model`` / ``--cell-model``). Nothing is ever downloaded: the files are
checked before the package is asked to build anything (its constructor downloads when a
path is missing) and loaded here, so the package only ever sees loaded models.

What runs is the package's own: ``CellSegmentator.pred_nuclei`` / ``pred_cells`` and, by
default (``labeler="hpacellseg"``), ``utils.label_cell``, the step that made the masks the
competition was scored against. Around them the adapter changes only what the package
gets wrong or cannot do (docs/segmentation.md has the reasons):

* ``label_cell``'s areas are absolute pixels of a full-resolution field (empty masks at
  512 px, its issue #20): fields smaller than ``min(reference_size, native_min_size)``
  (default: below 1728 px, the smallest HPA field) are enlarged to ``reference_size``
  first and their labels shrunk back; HPA fields (1728, 2048, 3072 px) run as they are;
* its resize back to the input size swaps height and width (right only for square
  images): a non-square field is zero-padded to a square for the networks and both
  predictions are cropped back before labelling, so the labelling step sees the field only;
* network inputs must be multiples of 32 px after scaling (1728-px fields fail without
  ``padding=True``, its issue #16): the package's own padding is switched on for such sizes;
* ``label_cell`` narrows labels to uint8, so with 256 or more nuclei a cell whose id is a
  multiple of 256 is lost and cells 256 ids apart merge where they touch: fields with
  more than 255 nuclei (counted exactly, with the package's nucleus rules) are labelled by
  :func:`hpa.segment.hpacellseg_labels.label_cell_wide`, the same rules with int32 labels;
* it uses ``np.bool`` (missing from NumPy 1.24-1.26): shimmed as ``bool`` only when absent;
* it calls ``skimage.transform.rescale(..., multichannel=True)``, a keyword removed from
  scikit-image 0.19+: the package module's ``transform`` is given a shim translating it
  to ``channel_axis=-1`` (only inside ``hpacellseg.cellsegmentator``);
* its model files are whole pickled modules, which ``torch.load`` refuses by default
  from torch 2.6: they are loaded here with ``weights_only=False`` (trusted files only).
  Models are used in the train/eval mode they were saved in, as the package does (it
  never calls ``eval()``).

As the package, 16-bit fields go in as they are (it scales uint16 by 1/65535); cells
without a nucleus are kept with ``labeler="hpacellseg"`` (the package keeps them) and
dropped with ``labeler="relative"`` (this project's own step, :func:`label_predictions`).
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

from hpa.segment.common import check_field, empty_masks, finalize_masks, remove_small_labels
from hpa.segment.hpacellseg_labels import MAX_NARROW_ID, label_cell_wide, package_nuclei

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
    "--nuclei-model PATH --cell-model PATH (config segment.hpacellseg.nuclei_weights / cell_weights); "
    "this project never downloads weights"
)

#: Smallest HPA field side: fields at least this large are segmented at their own size.
NATIVE_MIN_SIZE = 1728
#: Network inputs must be multiples of this after scaling (the U-Net's total stride).
NET_MULTIPLE = 32

#: Areas of label_cell at a 2048-px field, as fractions of the field's area (labeler="relative").
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
    """The pickled module in ``path`` on ``device``, in the train/eval mode it was saved in.

    ``DataParallel`` wrappers are removed (a single-device forward through the wrapper is
    the wrapped module's forward). ``eval()`` is not called: the package never calls it,
    so the competition's masks came from the mode stored in the file.
    """
    import torch

    try:
        model = torch.load(str(path), map_location=torch.device(device), weights_only=False)
    except Exception as exc:
        raise RuntimeError(f"segmenter 'hpacellseg': cannot load model file {path} ({type(exc).__name__}: {exc}); "
                           f"{WEIGHTS_HINT}") from exc
    if isinstance(model, torch.nn.DataParallel):
        model = model.module
    if getattr(model, "training", False):
        log.warning("hpacellseg model %s was saved in train mode; it is run that way, as the package runs it "
                    "(batch normalisation then uses each image's own statistics)", path.name)
    return model


@dataclass(frozen=True)
class NetworkPlan:
    """How a field of ``field_size`` ``(H, W)`` px goes through the package's networks.

    ``size``: ``(h, w)`` after enlargement (the labelling resolution); ``net_shape``: the
    array given to ``pred_nuclei`` / ``pred_cells`` (``size``, or a zero-padded square
    when the package would swap height and width); ``padding``: the package's own
    reflect padding (on when the scaled input is not a multiple of 32, or asked for).
    """

    field_size: tuple[int, int]
    size: tuple[int, int]
    net_shape: tuple[int, int]
    padding: bool

    @property
    def enlarged(self) -> bool:
        return self.size != self.field_size


def network_plan(H: int, W: int, scale_factor: float = 0.25, reference_size: int = 2048,
                 native_min_size: int = NATIVE_MIN_SIZE, padding: bool = False) -> NetworkPlan:
    """The :class:`NetworkPlan` of an ``H x W`` field (pure; see the module docstring).

    Examples (scale 0.25, defaults): 2048 -> as is, no padding (512 scaled); 3072 -> as is
    (768); 1728 -> as is, package padding (432 is no multiple of 32); 512 -> 2048;
    96 x 160 -> 1229 x 2048 labelled, a 2048 square for the networks.
    """
    up = reference_size / max(H, W) if max(H, W) < min(reference_size, native_min_size) else 1.0
    h, w = (int(round(H * up)), int(round(W * up))) if up != 1.0 else (H, W)
    net = (max(h, w),) * 2 if h != w and scale_factor != 1 else (h, w)
    scaled = np.maximum(np.round(np.array(net) * scale_factor), 1).astype(int)  # as skimage's rescale
    need = bool(np.any(scaled % NET_MULTIPLE))
    return NetworkPlan(field_size=(H, W), size=(h, w), net_shape=net, padding=bool(padding) or need)


class HPACellSegmenter:
    """``segment(field)`` with HPA-Cell-Segmentation's networks; see the module docstring.

    Args:
        nuclei_model, cell_model: local paths of the model files (required).
        scale_factor: the package's network scale (0.25: a 2048-px field runs at 512 px).
        device: ``cpu`` | ``cuda`` | ``cuda:N`` | ``auto``.
        padding: ask the package to pad (switched on by itself where sizes need it).
        multi_channel_model: 3-channel cell model (red, yellow, blue) or 2-channel (red, blue).
        labeler: ``hpacellseg`` (its ``label_cell``, the competition's masks) or
            ``relative`` (:func:`label_predictions`: areas scale with the field).
        reference_size: fields smaller than ``min(reference_size, native_min_size)`` are
            enlarged to this side before the networks.
        native_min_size: fields at least this large run at their own size (1728: every
            HPA field size).
    """

    name = "hpacellseg"

    def __init__(self, nuclei_model=None, cell_model=None, scale_factor: float = 0.25, device: str = "cpu",
                 padding: bool = False, multi_channel_model: bool = True, labeler: str = "hpacellseg",
                 reference_size: int = 2048, native_min_size: int = NATIVE_MIN_SIZE):
        if labeler not in ("hpacellseg", "relative"):
            raise ValueError(f"unknown labeler {labeler!r}; valid: hpacellseg, relative")
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
        self.native_min_size = int(native_min_size)
        self._seg = cellsegmentator.CellSegmentator(
            nuclei_model=_load_model(nuc_path, device),
            cell_model=_load_model(cell_path, device),
            scale_factor=self.scale_factor,
            device=device,
            padding=self.padding,
            multi_channel_model=self.multi_channel_model,
        )

    def plan(self, H: int, W: int) -> NetworkPlan:
        return network_plan(H, W, self.scale_factor, self.reference_size, self.native_min_size, self.padding)

    def predict(self, field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The package's network outputs for a field, at the labelling resolution.

        Returns ``(nuclei_pred, cell_pred)``: uint8 ``(h, w, 3)`` (channel 1 border,
        channel 2 interior probability x 255), ``(h, w)`` = ``self.plan(H, W).size``.
        uint8 and uint16 fields go to the package unconverted.
        """
        field = check_field(field)
        _, H, W = field.shape
        plan = self.plan(H, W)
        (h, w), (rows, cols) = plan.size, plan.net_shape
        chans = [field[i] for i in (0, 3, 2)]  # red (microtubules), yellow (ER), blue (nuclei)
        if plan.enlarged:
            chans = [cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in chans]
        if (rows, cols) != (h, w):
            chans = [np.pad(c, ((0, rows - h), (0, cols - w))) for c in chans]
        red, yellow, blue = chans
        self._seg.padding = plan.padding
        nuc_pred = self._seg.pred_nuclei([blue])[0]
        er = [yellow] if self.multi_channel_model else None
        cell_pred = self._seg.pred_cells([[red], er, [blue]])[0]
        for name, pred in (("pred_nuclei", nuc_pred), ("pred_cells", cell_pred)):
            if pred.shape != (rows, cols, 3) or pred.dtype != np.uint8:
                raise RuntimeError(f"hpacellseg {name} returned {pred.dtype} {pred.shape} for a {rows}x{cols} input "
                                   f"(expected uint8 ({rows}, {cols}, 3))")
        return nuc_pred[:h, :w], cell_pred[:h, :w]

    def label(self, nuc_pred: np.ndarray, cell_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(nuclei, cells)`` integer labels from the two predictions, with the chosen labeler.

        ``hpacellseg``: the package's ``label_cell``, unless the field has more than 255
        nuclei (where it would wrap): then :func:`label_cell_wide`, with a warning.
        """
        if self.labeler == "relative":
            return label_predictions(nuc_pred, cell_pred)
        nuclei = package_nuclei(nuc_pred, cell_pred)
        if nuclei.max() > MAX_NARROW_ID:
            log.warning("%d nuclei: hpacellseg's label_cell would narrow the cell labels to uint8 (cells lost or "
                        "merged); labelling this field with the same rules and int32 labels", int(nuclei.max()))
            return label_cell_wide(nuc_pred, cell_pred, nuclei=nuclei)
        return self._utils.label_cell(np.ascontiguousarray(nuc_pred), np.ascontiguousarray(cell_pred))

    def segment(self, field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, H, W = np.shape(field)
        nuc_pred, cell_pred = self.predict(field)
        nuclei, cells = self.label(nuc_pred, cell_pred)
        cells = np.asarray(cells).astype(np.int32)
        nuclei = np.asarray(nuclei).astype(np.int32)
        if cells.shape != (H, W):
            cells = cv2.resize(cells, (W, H), interpolation=cv2.INTER_NEAREST)
            nuclei = cv2.resize(nuclei, (W, H), interpolation=cv2.INTER_NEAREST)
        cells, nuclei = finalize_masks(cells, nuclei, require_nucleus=self.labeler == "relative")
        if cells.max() == 0:
            log.warning("hpacellseg found no cells in a %dx%d field: returning empty masks", W, H)
            return empty_masks((H, W))
        return cells, nuclei


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
    seeds = remove_small_labels(seeds, _NUC_SEED_MIN * area)
    nuc_mask = _fill_small_holes(nuc > nuc_threshold, _HOLE_MAX * area)
    nuclei = watershed(-nuc, seeds, mask=nuc_mask, watershed_line=True).astype(np.int32)
    nuclei = remove_small_labels(nuclei, _NUC_MIN * area)
    if nuclei.max() == 0:
        return np.zeros(nuc.shape, np.int32), np.zeros(nuc.shape, np.int32)
    # cells: nucleus-seeded watershed over the cell probability, inside the confident cell region
    t = max(cell_threshold_min, 0.5 * float(threshold_otsu(cell))) if cell.max() > cell.min() else cell_threshold_min
    region = ((cell > t) & (cell_pred[..., 1] <= border_threshold * 255)) | (nuclei > 0)
    cells = watershed(-np.maximum(cell, t), nuclei, mask=region).astype(np.int32)
    cells = remove_small_labels(cells, _CELL_MIN * area)
    nuclei = np.where(cells == nuclei, nuclei, 0)
    return nuclei, cells


def _fill_small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    holes = ndi.binary_fill_holes(mask) & ~mask
    if not holes.any():
        return mask
    n, comp = cv2.connectedComponents(holes.astype(np.uint8), connectivity=4)
    areas = np.bincount(comp.ravel())
    small = areas <= max_area
    small[0] = False
    return mask | small[comp]
