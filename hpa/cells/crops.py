"""Cell crops for the cell-level classifier, and their on-disk cache.

A *crop* is one cell cut from the full-resolution field: the cell's bounding box grown
by ``margin`` x its longest side on every side, made square around the box centre,
with the part of the window that lies outside the field filled with zeros (never
shifted, so the cell stays centred). Pixels of the window that do not belong to the
cell are kept, dimmed (x ``dim_factor``) or zeroed (``outside``), then the window is
resized to ``crop_size`` (area interpolation when shrinking, bilinear when enlarging)
and stored as uint8 ``(4, s, s)`` (16-bit fields are reduced to 8 bit by the whole field's own
range, :func:`hpa.io.fields.field_scale`, as the image cache does).

The crop is cut around the cell's own bounding box, so its size is already relative to the
cell: a cell fills about ``crop_size / (1 + 2 * margin)`` pixels of its crop whether the field
is 256 px with 60-px cells or 2048 px with 350-px cells.

The cache of a split is two files under ``out_dir``:

- ``{split}_{s}.npy``: uint8 ``(N, 4, s, s)``, opened as a read-only memmap;
- ``{split}_{s}.parquet``: the index, one row per crop in row order: ``ID, cell_id, row,
  area, x0, y0, x1, y1, touches_border`` (images in the order given, cells by id; box in
  field pixels, x1/y1 exclusive), exactly the cells of :func:`hpa.cells.table.cell_geometry`.

Building reads every mask twice (a cheap geometry pass that fixes N and each image's
rows, then the crop pass) and every field once, one image per worker process; workers
write their rows straight into the memmap, so memory holds one field per worker.
Progress is recorded per image in ``{split}_{s}.partial.txt``: an interrupted build
resumes where it stopped. The ``.npy`` and ``.parquet`` appear (by rename) only when
complete; a sidecar ``{split}_{s}.json`` records the settings, and a cache built with
other settings or other images is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from hpa.cells.table import cell_geometry
from hpa.io.fields import field_scale, read_field, read_mask, to_uint8
from hpa.utils.fs import check_space, gb, new_memmap, write_json, write_parquet
from hpa.utils.parallel import map_jobs

log = logging.getLogger(__name__)

OUTSIDE = ("zero", "dim", "keep")
#: Bumped whenever the bytes of a crop would change (2: 16-bit fields scaled by their own range).
CROP_VERSION = 2
INDEX_COLS = ["ID", "cell_id", "row", "area", "x0", "y0", "x1", "y1", "touches_border"]


# --------------------------------------------------------------------------- one crop
def crop_window(x0: int, y0: int, x1: int, y1: int, margin: float) -> tuple[int, int, int]:
    """Square window ``(wx0, wy0, side)`` around a box (x1/y1 exclusive).

    ``side = max(1, round(max(w, h) * (1 + 2 * margin)))``; the window is centred on the box
    (``wx0 = x0 + (w - side) // 2``) and may extend past the field (padded later).
    """
    w, h = x1 - x0, y1 - y0
    if w <= 0 or h <= 0:
        raise ValueError(f"empty bounding box x0={x0} y0={y0} x1={x1} y1={y1}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    side = max(1, int(round(max(w, h) * (1.0 + 2.0 * margin))))
    return x0 + (w - side) // 2, y0 + (h - side) // 2, side


def crop_cell(field: np.ndarray, mask: np.ndarray, cell_id: int, bbox: tuple[int, int, int, int],
              crop_size: int, margin: float = 0.1, outside: str = "dim", dim_factor: float = 0.25) -> np.ndarray:
    """Crop one cell from a full-resolution field.

    Args:
        field: uint8 or uint16 ``(4, H, W)`` (red, green, blue, yellow); a uint16 field is reduced
            to 8 bit by its whole range (:func:`hpa.io.fields.field_scale`, computed here: pass
            ``to_uint8(field)`` when cropping many cells of one field).
        mask: integer ``(H, W)`` instance mask; the cell's pixels equal ``cell_id``.
        bbox: ``(x0, y0, x1, y1)`` of the cell in field pixels, x1/y1 exclusive.
        crop_size: side ``s`` of the output in pixels.
        margin: window growth on each side as a fraction of the box's longest side (>= 0).
        outside: ``zero`` | ``dim`` | ``keep``: what happens to window pixels not in the cell.
        dim_factor: multiplier in [0, 1] for ``dim``.
    Returns:
        uint8 ``(4, s, s)``; window parts outside the field are 0.
    """
    lut = _outside_lut(outside, dim_factor)
    _check_pair(field, mask)
    h, w = mask.shape
    wx0, wy0, side = crop_window(*bbox, margin)
    sx0, sy0, sx1, sy1 = max(wx0, 0), max(wy0, 0), min(wx0 + side, w), min(wy0 + side, h)
    hwc = np.ascontiguousarray(to_uint8(field[:, sy0:sy1, sx0:sx1], field_scale(field)).transpose(1, 2, 0))
    return _crop_hwc(hwc, mask[sy0:sy1, sx0:sx1], (sx0, sy0), cell_id, bbox, crop_size, margin, lut)


def crop_image_cells(field: np.ndarray, mask: np.ndarray, geometry: pd.DataFrame, crop_size: int, margin: float,
                     outside: str, dim_factor: float) -> np.ndarray:
    """Crops of every row of ``geometry`` (columns cell_id, x0, y0, x1, y1): uint8 ``(n, 4, s, s)``,
    each equal to :func:`crop_cell`'s (the field is converted to 8-bit, pixel-interleaved form once)."""
    lut = _outside_lut(outside, dim_factor)
    _check_pair(field, mask)
    out = np.zeros((len(geometry), 4, crop_size, crop_size), np.uint8)
    if not len(geometry):
        return out
    hwc = np.ascontiguousarray(to_uint8(field).transpose(1, 2, 0))  # once, by the whole field's range; windows are row slices
    for i, (cid, x0, y0, x1, y1) in enumerate(geometry[["cell_id", "x0", "y0", "x1", "y1"]].itertuples(index=False)):
        out[i] = _crop_hwc(hwc, mask, (0, 0), int(cid), (int(x0), int(y0), int(x1), int(y1)), crop_size, margin, lut)
    return out


def _outside_lut(outside: str, dim_factor: float) -> np.ndarray | None:
    """uint8 (256,) value map of window pixels outside the cell: 0 (``zero``), ``rint(v * dim_factor)``
    (``dim``), None (``keep``)."""
    if outside not in OUTSIDE:
        raise ValueError(f"unknown outside mode {outside!r}; valid: {', '.join(OUTSIDE)}")
    if not 0.0 <= dim_factor <= 1.0:
        raise ValueError(f"dim_factor must lie in [0, 1], got {dim_factor}")
    if outside == "keep":
        return None
    factor = 0.0 if outside == "zero" else float(dim_factor)
    return np.rint(np.arange(256, dtype=np.float64) * factor).astype(np.uint8)


def _check_pair(field: np.ndarray, mask: np.ndarray) -> None:
    if field.ndim != 3 or field.shape[0] != 4 or field.shape[1:] != mask.shape:
        raise ValueError(f"expected a (4, H, W) field and an (H, W) mask of the same size, got {field.shape} and {mask.shape}")


def _crop_hwc(hwc: np.ndarray, mask: np.ndarray, origin: tuple[int, int], cell_id: int, bbox: tuple[int, int, int, int],
              crop_size: int, margin: float, lut: np.ndarray | None) -> np.ndarray:
    """One crop from uint8 ``(h, w, 4)`` pixels and their mask ``(h, w)``, which start at field pixel
    ``origin`` (x, y) and cover at least the part of the cell's window inside the field."""
    ox, oy = origin
    wx0, wy0, side = crop_window(*bbox, margin)
    sx0, sy0 = max(wx0, ox), max(wy0, oy)
    sx1, sy1 = min(wx0 + side, ox + mask.shape[1]), min(wy0 + side, oy + mask.shape[0])
    win = np.zeros((side, side, 4), np.uint8)  # parts outside the field stay 0 (lut[0] == 0)
    if sx1 > sx0 and sy1 > sy0:
        src = hwc[sy0 - oy:sy1 - oy, sx0 - ox:sx1 - ox]
        part = win[sy0 - wy0:sy1 - wy0, sx0 - wx0:sx1 - wx0]
        if lut is None:
            part[:] = src
        else:
            inside = (mask[sy0 - oy:sy1 - oy, sx0 - ox:sx1 - ox] == cell_id).view(np.uint8)
            mixed = cv2.LUT(src, lut)  # every pixel as outside the cell, then the cell's own pixels copied back
            cv2.copyTo(src, inside, mixed)
            part[:] = mixed
    if side != crop_size:
        interp = cv2.INTER_AREA if side > crop_size else cv2.INTER_LINEAR
        win = cv2.resize(win, (crop_size, crop_size), interpolation=interp)
    return np.ascontiguousarray(win.transpose(2, 0, 1))


# --------------------------------------------------------------------------- cache
def cache_paths(out_dir: str | os.PathLike, split: str, crop_size: int) -> dict[str, Path]:
    """The files of one cache: ``npy``, ``parquet``, ``json`` (settings) and the in-progress ones."""
    base = Path(out_dir) / f"{split}_{crop_size}"
    return {"npy": base.with_suffix(".npy"), "parquet": base.with_suffix(".parquet"), "json": base.with_suffix(".json"),
            "tmp_npy": Path(f"{base}.partial.npy"), "tmp_index": Path(f"{base}.partial.parquet"),
            "progress": Path(f"{base}.partial.txt")}


def _mask_path(masks_dir: Path, image_id: str) -> Path:
    return masks_dir / f"{image_id}_cellmask.png"


def _geometry_job(args) -> tuple[str, pd.DataFrame]:
    masks_dir, image_id = args
    geo = cell_geometry(read_mask(_mask_path(masks_dir, image_id)))
    geo.insert(0, "ID", image_id)
    return image_id, geo


def _crop_job(args) -> str:
    (data_split_dir, masks_dir, image_id, rows, geo, npy_path, shape, crop_size, margin, outside, dim_factor) = args
    mask = read_mask(_mask_path(masks_dir, image_id))
    field = read_field(data_split_dir, image_id)
    if field.shape[1:] != mask.shape:
        raise ValueError(f"image {image_id}: field is {field.shape[2]}x{field.shape[1]} px but its mask "
                         f"{_mask_path(masks_dir, image_id)} is {mask.shape[1]}x{mask.shape[0]}")
    crops = crop_image_cells(field, mask, geo, crop_size, margin, outside, dim_factor)
    mm = np.lib.format.open_memmap(npy_path, mode="r+")
    if mm.shape != shape:
        raise RuntimeError(f"{npy_path}: shape {mm.shape}, expected {shape}")
    mm[rows[0]:rows[1]] = crops
    mm.flush()
    del mm
    return image_id


def _settings(ids: list[str], crop_size: int, margin: float, outside: str, dim_factor: float) -> dict:
    digest = hashlib.sha1("\n".join(ids).encode()).hexdigest()
    return {"version": CROP_VERSION, "crop_size": int(crop_size), "margin": float(margin), "outside": outside,
            "dim_factor": float(dim_factor) if outside == "dim" else None, "n_images": len(ids), "ids_sha1": digest}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def open_crop_cache(out_dir: str | os.PathLike, split: str, crop_size: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Open a finished cache: read-only memmap uint8 ``(N, 4, s, s)`` and its index DataFrame."""
    p = cache_paths(out_dir, split, crop_size)
    if not (p["npy"].is_file() and p["parquet"].is_file()):
        raise FileNotFoundError(f"no crop cache {p['npy']} (+ .parquet): build it with build_crop_cache")
    index = pd.read_parquet(p["parquet"])
    mm = np.load(p["npy"], mmap_mode="r")
    if mm.ndim != 4 or mm.shape[1:] != (4, crop_size, crop_size) or mm.shape[0] != len(index):
        raise ValueError(f"{p['npy']}: shape {mm.shape} does not fit its index of {len(index)} rows at {crop_size} px")
    return mm, index


def build_crop_cache(data_dir: str | os.PathLike, masks_dir: str | os.PathLike, split: str, ids: list[str],
                     crop_size: int, margin: float, outside: str, dim_factor: float, out_dir: str | os.PathLike,
                     workers: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """Crops of every cell of ``ids``, cached at ``out_dir/{split}_{crop_size}.npy`` + ``.parquet``.

    Args:
        data_dir: the data folder; fields are read from ``data_dir/split`` by :func:`hpa.io.fields.read_field`.
        masks_dir: folder of ``{ID}_cellmask.png`` instance masks (``RUN/masks/{split}``).
        ids: image IDs in the order the index should have (unique).
        crop_size, margin, outside, dim_factor: see :func:`crop_cell`.
        workers: processes reading images in parallel (0: in this process).
    Returns:
        ``(crops, index)``: read-only memmap uint8 ``(N, 4, s, s)`` and the index DataFrame
        (columns :data:`INDEX_COLS`, row i describing ``crops[i]``). An existing cache with the
        same settings and images is reused; a partial one is resumed.
    """
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate image IDs given to build_crop_cache ({len(ids) - len(set(ids))} repeats)")
    if outside not in OUTSIDE:
        raise ValueError(f"unknown outside mode {outside!r}; valid: {', '.join(OUTSIDE)}")
    if int(crop_size) < 8:
        raise ValueError(f"crop_size must be >= 8 px, got {crop_size}")
    crop_size = int(crop_size)
    data_split, masks_dir, out_dir = Path(data_dir) / split, Path(masks_dir), Path(out_dir)
    missing = [i for i in ids if not _mask_path(masks_dir, i).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(ids)} {split} images have no cell mask in {masks_dir} "
                                f"(first: {_mask_path(masks_dir, missing[0]).name}); run stage 03 first")
    p = cache_paths(out_dir, split, crop_size)
    settings = _settings(ids, crop_size, margin, outside, dim_factor)
    if p["npy"].is_file() and p["parquet"].is_file() and _read_json(p["json"]) == settings:
        log.info("crop cache %s is complete; reusing it", p["npy"])
        # a build started since would have rewritten the sidecar: any in-progress file is this build's own,
        # left by an interruption between its last two steps
        for key in ("tmp_npy", "tmp_index", "progress"):
            p[key].unlink(missing_ok=True)
        return open_crop_cache(out_dir, split, crop_size)
    if p["npy"].is_file():
        log.warning("crop cache %s was built with other settings or images; rebuilding it", p["npy"])

    # geometry pass (or the saved plan of an interrupted build with the same settings)
    resume = (p["tmp_index"].is_file() and p["tmp_npy"].is_file() and p["progress"].is_file()
              and _read_json(p["json"]) == dict(settings, partial=True))
    if resume:
        index = pd.read_parquet(p["tmp_index"])
        done = set(p["progress"].read_text().split())
        log.info("resuming crop cache %s: %d of %d images done", p["npy"], len(done & set(ids)), len(ids))
    else:
        for key in ("npy", "parquet", "tmp_npy", "tmp_index", "progress"):
            p[key].unlink(missing_ok=True)
        geos = dict(map_jobs(_geometry_job, [(masks_dir, i) for i in ids], workers, desc=f"cell geometry {split}",
                             ordered=False))
        frames = [geos[i] for i in ids if len(geos[i])]
        index = (pd.concat(frames, ignore_index=True) if frames
                 else pd.DataFrame({c: pd.Series(dtype="int64") for c in INDEX_COLS}).assign(ID=pd.Series(dtype=str)))
        index["row"] = np.arange(len(index), dtype=np.int64)
        index = index[INDEX_COLS].astype({"ID": str, "cell_id": "int64", "row": "int64", "area": "int64", "x0": "int64",
                                          "y0": "int64", "x1": "int64", "y1": "int64", "touches_border": bool})
        out_dir.mkdir(parents=True, exist_ok=True)
        need = len(index) * 4 * crop_size * crop_size + 128
        log.info("crop cache %s: %d cells of %d images x 4 channels x %d x %d px = %s on disk", p["npy"], len(index),
                 len(ids), crop_size, crop_size, gb(need))
        check_space(out_dir, need, f"{len(index):,} cells of {len(ids):,} images at {crop_size} px",
                    "free some space, put the run on a larger disk (--run), or lower cell_model.crop_size")
        mm = new_memmap(p["tmp_npy"], (len(index), 4, crop_size, crop_size))  # space reserved: a full disk fails here
        del mm
        write_parquet(p["tmp_index"], index)
        write_json(p["json"], dict(settings, partial=True))
        p["progress"].write_text("")
        done = set()

    shape = (len(index), 4, crop_size, crop_size)
    spans = index.groupby("ID", sort=False)["row"].agg(["min", "max"])
    jobs = []
    for image_id in ids:
        if image_id in done or image_id not in spans.index:
            continue
        lo, hi = int(spans.at[image_id, "min"]), int(spans.at[image_id, "max"]) + 1
        geo = index.iloc[lo:hi][["cell_id", "x0", "y0", "x1", "y1"]].reset_index(drop=True)
        jobs.append((data_split, masks_dir, image_id, (lo, hi), geo, p["tmp_npy"], shape, crop_size, margin, outside,
                     dim_factor))
    with open(p["progress"], "a") as progress:
        for image_id in map_jobs(_crop_job, jobs, workers, desc=f"cell crops {split}", ordered=False):
            progress.write(image_id + "\n")
            progress.flush()
    os.replace(p["tmp_npy"], p["npy"])
    os.replace(p["tmp_index"], p["parquet"])
    write_json(p["json"], settings)
    p["progress"].unlink(missing_ok=True)
    log.info("crop cache %s: %d cells of %d images at %d px", p["npy"], len(index), len(ids), crop_size)
    return open_crop_cache(out_dir, split, crop_size)
