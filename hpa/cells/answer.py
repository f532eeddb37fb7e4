"""Per-cell answers for one field from a trained run's models: what the combination rule needs, nothing more.

:class:`FieldPredictor` takes a decoded field and its cell mask (segmentation is the caller's
part, :mod:`hpa.segment`) and gives every cell a confidence for each of the 19 classes, the
way stage 06 gives them to the run's own test cells:

1. geometry of every cell (:func:`hpa.cells.table.cell_geometry`: bounding box, area,
   border contact, area relative to the field's median cell);
2. the image model's probabilities for the field, only when the rule reads them
   (:func:`hpa.cells.combine.needs_image_probs`): the field resized to the model's input
   size as the field cache stores it (:func:`hpa.data.cache.build_field_cache`: area
   interpolation, uint8), then :func:`hpa.engine.inference.field_probs` (tiles of the
   training crop, flips when the run's CAMs used them), the arithmetic of stage 02;
3. the cell model's softmax for every cell, only when the rule reads it: crops as stage 05
   caches them (:func:`hpa.cells.crops.crop_image_cells` with the crop settings stored in the
   cell model's meta), all cells of the field in batches of ``batch_size``;
4. :func:`hpa.cells.combine.rule_confidences` with the run's ``predict`` settings; with
   ``rank_combine`` also the ranking confidences (``predict.rank_combine``: comparable between
   fields, for ranking cells by one class; stage 06's ``rank*`` columns).

No class activation maps and no isolated-cell view are computed: the submitted rule reads
neither. Every step's wall-clock and CPU seconds are returned with the answers (the speed
benchmark and stage 08's per-field records use them).
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from hpa.cells.combine import needs_cell_probs, needs_image_probs, rule_confidences
from hpa.cells.crops import OUTSIDE, crop_image_cells
from hpa.cells.table import cell_geometry
from hpa.constants import NUM_CLASSES
from hpa.io.fields import resize_field, to_uint8
from hpa.utils.timing import StepTimer

#: Steps timed by :meth:`FieldPredictor.predict`, in order.
STEPS = ("geometry", "image_model", "crops", "cell_model", "combine")


@dataclass
class CropSpec:
    """How the cell model's crops were cut (:func:`hpa.cells.crops.crop_cell`)."""

    crop_size: int
    margin: float
    outside: str
    dim_factor: float

    @classmethod
    def from_meta(cls, meta: dict, source: str = "cell model") -> "CropSpec":
        """The crop settings stage 05 stored in the cell model's meta; an error naming ``source`` when absent."""
        missing = [k for k in ("crop_size", "margin", "outside", "dim_factor") if k not in meta]
        if missing:
            raise ValueError(f"{source}: no crop settings {missing} in its meta (not a stage-05 cell model?)")
        spec = cls(int(meta["crop_size"]), float(meta["margin"]), str(meta["outside"]), float(meta["dim_factor"]))
        if spec.outside not in OUTSIDE:
            raise ValueError(f"{source}: unknown crop outside mode {spec.outside!r}")
        return spec


@dataclass
class FieldAnswers:
    """The answers for one field.

    ``cells``: one row per cell of the mask (:func:`hpa.cells.table.cell_geometry` columns:
    ``cell_id, x0, y0, x1, y1, area, touches_border, height, width, rel_area``; x1/y1 exclusive);
    ``conf`` float32 (N, 19) in [0, 1]; ``image_probs`` float32 (19,) or None when the rule does
    not read them; ``cell_probs`` float32 (N, 19) or None; ``timer``: wall-clock and CPU seconds
    per step of :data:`STEPS` (0 for a step the rule does not need); ``rank`` float32 (N, 19): the
    ranking confidences (``rank_combine``), or None.
    """

    cells: pd.DataFrame
    conf: np.ndarray
    image_probs: np.ndarray | None
    cell_probs: np.ndarray | None
    timer: StepTimer = dc_field(default_factory=StepTimer)
    rank: np.ndarray | None = None

    @property
    def seconds(self) -> dict[str, float]:
        """Wall-clock seconds per step."""
        return self.timer.wall


class FieldPredictor:
    """A run's image and cell models and its combination rule, applied to one field at a time.

    Args:
        cell_model, cell_meta: the cell model and its meta (:func:`hpa.engine.checkpoint.load_model`);
            may be None when ``combine`` is ``image``.
        image_model, image_meta: the image model and its meta; may be None when the rule does
            not read image probabilities.
        combine, negative, small_cell_penalty: the run's ``predict`` settings.
        rank_combine: the run's ``predict.rank_combine`` (None: no ranking confidences).
        image_tta_flip: the run's ``cam.tta_flip`` (how its image probabilities were made).
        cell_tta_flip, batch_size, amp: the run's ``cell_model.tta_flip``, ``predict_batch_size``, ``amp``.
        device: where the models run.
    """

    def __init__(self, cell_model: nn.Module | None, cell_meta: dict | None, image_model: nn.Module | None = None,
                 image_meta: dict | None = None, *, combine: str = "cell", negative: str = "max",
                 small_cell_penalty: bool = True, image_tta_flip: bool = False, cell_tta_flip: bool = False,
                 batch_size: int = 256, amp: str = "auto", device: str = "cpu", rank_combine: str | None = None):
        self.combine, self.negative, self.penalty = combine, negative, bool(small_cell_penalty)
        self.rank_combine = rank_combine
        rules = [combine] + ([rank_combine] if rank_combine else [])
        self.uses_image = any(needs_image_probs(r, negative) for r in rules)
        self.uses_cells = any(needs_cell_probs(r) for r in rules)
        if self.uses_image and image_model is None:
            raise ValueError(f"predict.combine={combine} (rank_combine={rank_combine}) with predict.negative={negative} "
                             "needs the image model")
        if self.uses_cells and cell_model is None:
            raise ValueError(f"predict.combine={combine} (rank_combine={rank_combine}) needs a cell model")
        self.device = device
        self.image_model = image_model.to(device).eval() if self.uses_image else None
        self.image_meta = image_meta
        self.cell_model = cell_model.to(device).eval() if self.uses_cells else None
        self.cell_meta = cell_meta
        self.crop = CropSpec.from_meta(cell_meta) if self.uses_cells else None
        self.image_tta_flip, self.cell_tta_flip = bool(image_tta_flip), bool(cell_tta_flip)
        self.batch_size, self.amp = int(batch_size), amp
        if self.uses_cells and (cell_meta.get("task") != "multiclass" or cell_meta.get("num_classes") != NUM_CLASSES):
            raise ValueError(f"expected a {NUM_CLASSES}-class multiclass cell model, got task {cell_meta.get('task')!r} "
                             f"with {cell_meta.get('num_classes')} classes")

    @classmethod
    def from_files(cls, cell_model_path: str | Path | None, image_model_path: str | Path | None, **kw) -> "FieldPredictor":
        """Load the models from ``model.pt`` files (None for a model the rule does not need); ``kw`` as the constructor."""
        from hpa.engine.checkpoint import load_model

        device = kw.get("device", "cpu")
        cell = load_model(cell_model_path, device) if cell_model_path is not None else (None, None)
        image = load_model(image_model_path, device) if image_model_path is not None else (None, None)
        return cls(cell[0], cell[1], image[0], image[1], **kw)

    # ------------------------------------------------------------------ steps
    def image_probs(self, field: np.ndarray) -> np.ndarray:
        """The image model's probabilities float32 (19,) for a ``(4, H, W)`` uint8/uint16 field."""
        from hpa.engine.amp import prepare_batch
        from hpa.engine.inference import field_probs

        meta = self.image_meta
        size = int(meta["image_size"])
        small = to_uint8(resize_field(field, size))  # the bytes of the field cache's row
        mean = std = None
        if meta.get("mean") is not None and meta.get("normalize", True):
            mean = torch.tensor(meta["mean"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
            std = torch.tensor(meta["std"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        x = prepare_batch(torch.from_numpy(np.ascontiguousarray(small))[None].to(self.device), mean, std)
        return field_probs(self.image_model, x, meta.get("tile"), self.image_tta_flip)[0]

    def crops(self, field: np.ndarray, mask: np.ndarray, cells: pd.DataFrame) -> np.ndarray:
        """uint8 ``(N, 4, s, s)`` crops of the rows of ``cells`` (as stage 05's crop cache holds them)."""
        c = self.crop
        return crop_image_cells(field, mask, cells, c.crop_size, c.margin, c.outside, c.dim_factor)

    def cell_probs(self, crops: np.ndarray) -> np.ndarray:
        """The cell model's softmax float32 (N, 19) for uint8 crops ``(N, 4, s, s)``."""
        from hpa.engine.inference import predict

        if len(crops) == 0:
            return np.zeros((0, NUM_CLASSES), np.float32)
        return predict(self.cell_model, self.cell_meta, crops, batch_size=self.batch_size, device=self.device,
                       tta_flip=self.cell_tta_flip, amp=self.amp)

    def predict(self, field: np.ndarray, mask: np.ndarray) -> FieldAnswers:
        """Answers for every cell of ``mask`` (int (H, W), cells 1..K) in ``field`` (uint8/uint16 (4, H, W))."""
        field, mask = np.asarray(field), np.asarray(mask)
        if field.ndim != 3 or field.shape[0] != 4 or field.shape[1:] != mask.shape:
            raise ValueError(f"expected a (4, H, W) field and an (H, W) mask of the same size, got {field.shape} "
                             f"and {mask.shape}")
        timer = StepTimer(STEPS)
        with timer.step("geometry"):
            cells = cell_geometry(mask)
        img = cell = None
        if self.uses_image:
            with timer.step("image_model"):
                img = self.image_probs(field)
        if self.uses_cells:
            with timer.step("crops"):
                crops = self.crops(field, mask, cells)
            with timer.step("cell_model"):
                cell = self.cell_probs(crops)
        with timer.step("combine"):
            n = len(cells)
            img_rows = None if img is None else np.repeat(img[None], n, 0)
            geo = (cells["rel_area"].to_numpy(), cells["touches_border"].to_numpy())
            one_image = np.zeros(n, int)
            conf = rule_confidences(img_rows, cell, *geo, self.combine, self.negative, self.penalty, one_image)
            rank = None
            if self.rank_combine:
                rank = rule_confidences(img_rows, cell, *geo, self.rank_combine, self.negative, self.penalty,
                                        one_image).astype(np.float32)
        return FieldAnswers(cells, conf.astype(np.float32), img, cell, timer, rank)
