"""The image model's working resolution, from the size of the cells (stage 01).

A cell should reach the image model at about the same number of pixels whatever the data:
a 256-px synthetic field with 14 cells of 55 px and a 2048-px HPA field with 30 cells of
350 px. So the field cache's side ``S`` is not a fixed number but follows from the cells:

    S = field side x cell_px / cell diameter        (to a multiple of 32, within image_size_range)

with ``cell_px`` (setting ``image_model.cell_px``, default 28) the cell diameter wanted in the
network's pixels. Everything measured is relative to the field side (``rel = diameter /
side``), because the cache squashes every field to ``S x S``: ``S = cell_px / rel``. The
cell diameter is the diameter of the circle with the median cell's area (the median over
fields of each field's median), taken from, in this order:

1. the setting ``cell_diameter`` (pixels of the fields), divided by the median side of a
   sample of training fields (headers only);
2. stage 03's table of the train split (``RUN/masks/train/cells.csv``, ``median_cell_area``
   per field), when it exists (``run_all.sh`` segments the train split before stage 01);
3. the classical segmenter (the run's ``segment.classical`` settings) on
   :data:`SAMPLE_FIELDS` training fields spread evenly over the split.

The training crop keeps its fraction of the field: ``train_crop`` is given for a cache of
``image_size`` px and becomes ``train_crop x S / image_size`` (a multiple of 16), so a crop
holds as many cells as on the reference data and carries its image label as often; the
validation tiles are the crop (:mod:`hpa.engine.tiling`). ``image_size`` is therefore the
cache side for data whose cells span ``cell_px / image_size`` of the field (28 / 128: 22%,
the default synthetic benchmark and about HPA's 2048-px fields), and with ``cell_px`` null
the side of every cache, as before.

One side per run: fields of other sizes in the same data set are squashed to ``S`` too, so
where their cells have the same size in pixels (a 3072-px HPA field holds the same 350-px
cells as a 2048-px one) they reach the network 2048 / 3072 as wide. The test split uses the
training split's ``S`` (the model's ``image_size``).

The resolution is written to ``RUN/image_model/scale.json`` and into the model's meta
(``meta["scale"]``); a resumed stage 01 reuses it, so the cache and the checkpoint keep
their size even when masks appear in between.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hpa.config import ClassicalSegmenterSettings, ConfigError, ImageModelSettings
from hpa.io.errors import InputError
from hpa.utils.fs import write_json
from hpa.utils.parallel import map_jobs

log = logging.getLogger(__name__)

#: Training fields the classical segmenter measures when stage 03 has not run (spread over the split).
SAMPLE_FIELDS = 24
#: Fields whose headers give the median field side when the cell diameter is a setting.
SIDE_SAMPLE = 200


@dataclass
class ImageScale:
    """The resolved working resolution of a run's image model (``RUN/image_model/scale.json``).

    image_size: the cache side ``S`` (px). train_crop: the training crop and validation tile
    side in cache pixels (None: whole fields). The rest says where ``S`` came from:
    cell_px (setting), cell_rel (median cell diameter / field side), cell_diameter (median
    cell diameter in field pixels), field_side (median field side in pixels), cell_px_net
    (the median cell's diameter in the cache: ``cell_rel x S``), source (in words), n_fields
    (fields measured), settings (the inputs, to tell when a saved scale no longer applies).
    """

    image_size: int
    train_crop: int | None
    cell_px: float | None = None
    cell_rel: float | None = None
    cell_diameter: float | None = None
    field_side: float | None = None
    cell_px_net: float | None = None
    source: str = ""
    n_fields: int = 0
    settings: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for the log."""
        if self.cell_rel is None:
            return f"field cache {self.image_size} px, train crop {self.train_crop} ({self.source})"
        return (f"cells {self.cell_diameter:.1f} px in {self.field_side:.0f}-px fields ({100 * self.cell_rel:.1f}% of "
                f"the side, {self.source}) -> field cache {self.image_size} px, cells {self.cell_px_net:.1f} px in "
                f"the network (target {self.cell_px:g}), train crop {self.train_crop}")


# --------------------------------------------------------------------------- arithmetic
def working_size(cell_rel: float, cell_px: float, size_range: tuple[int, int] | list[int]) -> int:
    """Cache side ``cell_px / cell_rel`` rounded to a multiple of 32 and clipped to ``size_range``.

    ``cell_rel``: median cell diameter as a fraction of the field side (0 < rel <= 1).
    """
    if not 0 < cell_rel <= 1:
        raise ValueError(f"relative cell diameter must lie in (0, 1], got {cell_rel}")
    lo, hi = (int(v) for v in size_range)
    if lo > hi:
        raise ValueError(f"image_size_range must be [min, max] with min <= max, got {list(size_range)}")
    side = int(math.floor(cell_px / cell_rel / 32.0 + 0.5)) * 32
    return int(min(max(side, lo, 32), hi))


def scaled_crop(train_crop: int | None, size: int, image_size: int) -> int | None:
    """``train_crop`` (given for an ``image_size`` cache) for a cache of ``size`` px: the same
    fraction of the field, to a multiple of 16, at least 16 and at most ``size``; None stays None."""
    if train_crop is None:
        return None
    if size == image_size:
        return int(train_crop)
    crop = int(math.floor(train_crop * size / image_size / 16.0 + 0.5)) * 16
    return int(min(max(crop, 16), size))


def equivalent_diameter(area: float | np.ndarray) -> float | np.ndarray:
    """Diameter of the circle of ``area`` (pixels)."""
    return 2.0 * np.sqrt(np.asarray(area, np.float64) / np.pi)


def mask_cell_rel(cell_mask: np.ndarray) -> float:
    """Median cell's equivalent diameter / field side (``sqrt(H x W)``) of an instance mask; NaN without cells."""
    areas = np.bincount(np.asarray(cell_mask).ravel())[1:]
    areas = areas[areas > 0]
    if not areas.size:
        return float("nan")
    return float(equivalent_diameter(np.median(areas)) / math.sqrt(cell_mask.shape[0] * cell_mask.shape[1]))


def table_cell_rel(table: pd.DataFrame) -> np.ndarray:
    """Per-field relative cell diameters from stage 03's table (``median_cell_area``, ``height``, ``width``,
    ``n_cells``); fields without cells are left out."""
    t = table[table["n_cells"] > 0]
    return (equivalent_diameter(t["median_cell_area"].to_numpy(np.float64))
            / np.sqrt(t["height"].to_numpy(np.float64) * t["width"].to_numpy(np.float64)))


def spread(ids: list[str], n: int) -> list[str]:
    """Up to ``n`` IDs spread evenly over ``ids`` (first and last included), in order."""
    if len(ids) <= n:
        return list(ids)
    return [ids[i] for i in sorted(set(np.linspace(0, len(ids) - 1, n).round().astype(int).tolist()))]


# --------------------------------------------------------------------------- measuring
def _measure_job(args) -> tuple[float, float]:
    """Worker: (relative cell diameter, field side) of one field by the classical segmenter; NaNs for a field
    that cannot be read (the field cache reports it, or leaves it out with ``on_bad_image=skip``)."""
    folder, image_id, kw = args
    import cv2

    from hpa.io.fields import read_field
    from hpa.segment import get_segmenter

    cv2.setNumThreads(1)
    try:
        field = read_field(folder, image_id)
    except InputError:
        return float("nan"), float("nan")
    cells, _ = get_segmenter("classical", **kw).segment(field)
    return mask_cell_rel(cells), math.sqrt(field.shape[1] * field.shape[2])


def measure_cells(folder: str | os.PathLike, ids: list[str], classical: ClassicalSegmenterSettings,
                  n: int = SAMPLE_FIELDS, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(relative diameters, field sides)`` of up to ``n`` fields spread over ``ids``, segmented by the
    classical segmenter with ``classical``'s settings; fields without cells give NaN diameters."""
    jobs = [(str(folder), i, dataclasses.asdict(classical)) for i in spread(ids, n)]
    res = list(map_jobs(_measure_job, jobs, workers, desc="cell size", progress=False))
    return np.array([r[0] for r in res], np.float64), np.array([r[1] for r in res], np.float64)


def median_side(folder: str | os.PathLike, ids: list[str], n: int = SIDE_SAMPLE) -> float:
    """Median ``sqrt(H x W)`` of up to ``n`` fields spread over ``ids``, from their file headers."""
    from hpa.io.fields import field_size

    sides = [math.sqrt(h * w) for h, w in (field_size(folder, i) for i in spread(ids, n))]
    return float(np.median(sides))


# --------------------------------------------------------------------------- resolving
def _inputs(s: ImageModelSettings, cell_diameter: float | None) -> dict:
    return {"cell_px": s.cell_px, "image_size": s.image_size, "image_size_range": list(s.image_size_range),
            "train_crop": s.train_crop, "cell_diameter": cell_diameter}


def resolve_scale(s: ImageModelSettings, folder: str | os.PathLike, ids: list[str], *,
                  cell_diameter: float | None = None, masks_table: str | os.PathLike | None = None,
                  classical: ClassicalSegmenterSettings | None = None, workers: int = 0) -> ImageScale:
    """The working resolution for the training fields ``ids`` in ``folder`` (module docstring).

    Args:
        s: the ``image_model`` settings (``cell_px``, ``image_size``, ``image_size_range``, ``train_crop``).
        cell_diameter: the setting ``cell_diameter`` (field pixels) or None (measure).
        masks_table: stage 03's ``cells.csv`` of the train split, used when it exists.
        classical: segmenter settings for the sampled measurement (needed only without the two above).
        workers: processes for the sampled measurement.
    Raises:
        InputError when the cells cannot be measured (no cell in any sampled field).
    """
    inputs = _inputs(s, cell_diameter)
    if s.cell_px is None:
        return ImageScale(s.image_size, s.train_crop, source="image_model.cell_px is null: fixed image_size",
                          settings=inputs)
    n_fields, diameter = 0, None
    if cell_diameter is not None:
        side = median_side(folder, ids)
        rel = float(cell_diameter) / side
        source, n_fields = "setting cell_diameter", len(spread(ids, SIDE_SAMPLE))
        diameter = float(cell_diameter)
        if not 0 < rel <= 1:
            raise ConfigError(f"setting 'cell_diameter' ({cell_diameter} px) must be smaller than the fields "
                              f"(median side {side:.0f} px)")
    else:
        rels = sides = None
        if masks_table is not None and Path(masks_table).is_file():
            table = pd.read_csv(masks_table, dtype={"ID": str})
            table = table[table["ID"].isin(set(ids))]
            t = table[table["n_cells"] > 0]
            if len(t):
                rels = table_cell_rel(t)
                sides = np.sqrt(t["height"].to_numpy(np.float64) * t["width"].to_numpy(np.float64))
                source = f"stage 03 masks, {masks_table}"
        if rels is None:
            if classical is None:
                raise ValueError("resolve_scale needs classical segmenter settings to measure the cells")
            rels, sides = measure_cells(folder, ids, classical, workers=workers)
            source = f"classical segmenter on {len(rels)} training fields"
        ok = np.isfinite(rels)
        if not ok.any():
            raise InputError(f"could not measure the cell size: no cell found in {len(rels)} training fields of "
                             f"{folder} ({source}); set cell_diameter=PIXELS or image_model.cell_px=null")
        rel, side, n_fields = float(np.median(rels[ok])), float(np.median(sides[ok])), int(ok.sum())
    diameter = rel * side if diameter is None else diameter
    size = working_size(rel, float(s.cell_px), s.image_size_range)
    return ImageScale(size, scaled_crop(s.train_crop, size, s.image_size), cell_px=float(s.cell_px), cell_rel=rel,
                      cell_diameter=float(diameter), field_side=float(side), cell_px_net=float(rel * size),
                      source=source, n_fields=n_fields, settings=inputs)


def scale_path(run: str | os.PathLike) -> Path:
    """``RUN/image_model/scale.json``."""
    return Path(run) / "image_model" / "scale.json"


def load_scale(run: str | os.PathLike) -> ImageScale | None:
    """The saved resolution of a run, or None."""
    path = scale_path(run)
    if not path.is_file():
        return None
    return ImageScale(**json.loads(path.read_text()))


def run_scale(run: str | os.PathLike, s: ImageModelSettings, folder: str | os.PathLike, ids: list[str], *,
              cell_diameter: float | None = None, classical: ClassicalSegmenterSettings | None = None,
              workers: int = 0, force: bool = False) -> ImageScale:
    """The run's resolution: the saved one when its settings still apply (and not ``force``), else resolved
    (:func:`resolve_scale`, measuring on stage 03's ``RUN/masks/train/cells.csv`` when it exists) and saved.

    A saved resolution whose settings differ while the run already holds image-model weights is an
    error (the weights and the cache were made at the old size): retrain with ``--force``.
    """
    run = Path(run)
    old = None if force else load_scale(run)
    if old is not None and old.settings == _inputs(s, cell_diameter):
        log.info("working resolution (saved in %s): %s", scale_path(run), old.describe())
        return old
    if old is not None and any((run / "image_model" / f).is_file() for f in ("last.pt", "model.pt")):
        raise ConfigError(f"{scale_path(run)} was resolved from other settings ({old.settings}) and the image model "
                          f"in {run / 'image_model'} was trained at {old.image_size} px; pass --force to retrain")
    scale = resolve_scale(s, folder, ids, cell_diameter=cell_diameter,
                          masks_table=run / "masks" / "train" / "cells.csv", classical=classical, workers=workers)
    write_json(scale_path(run), scale.to_dict())
    log.info("working resolution: %s", scale.describe())
    return scale
