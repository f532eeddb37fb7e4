"""The per-image segmentation loop of stage 03: resumable, sharded, process-parallel.

For every image of a split it writes ``OUT/{ID}_cellmask.png`` and
``OUT/{ID}_nucleimask.png`` (uint16 instance masks, :func:`hpa.io.fields.write_mask`) and one
row of a per-image table (:data:`TABLE_COLUMNS`) to ``OUT/cells.csv``, or to
``OUT/cells.shard-i-of-N.csv`` for shard ``i`` of ``N`` (:func:`merge_tables` joins
the shards' tables into ``cells.csv`` once all exist). An image whose two mask files
exist is skipped unless ``force``; its row is kept from the earlier table or
recomputed from its masks. Unreadable images either stop the run (``on_bad_image =
"error"``, the message names the file; channel files are checked before any work)
or are recorded in ``OUT/skipped.csv`` (``ID,reason``) and left out (``"skip"``).
An image in which no cell is found (dark, no nuclear stain) keeps two empty masks and a
row with ``n_cells`` 0; the report lists such images (:func:`hpa.pipeline.evaluate.input_problems`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hpa.config import SegmentSettings
from hpa.io.errors import InputError
from hpa.io.fields import read_field, read_mask, write_mask
from hpa.io.layout import check_images_exist, list_split
from hpa.segment import resolve_segmenter
from hpa.utils.fs import write_csv, write_json
from hpa.utils.parallel import map_jobs
from hpa.utils.shards import merge_shard_tables, merge_when_complete, select_shard, shard_path

log = logging.getLogger(__name__)

TABLE_COLUMNS = ["ID", "height", "width", "n_cells", "mean_cell_area", "median_cell_area", "mean_nucleus_area", "seconds"]
SKIPPED_COLUMNS = ["ID", "reason"]


def mask_paths(out_dir: str | os.PathLike, image_id: str) -> tuple[Path, Path]:
    """``(cell mask, nuclei mask)`` paths of ``image_id`` in ``out_dir``."""
    out_dir = Path(out_dir)
    return out_dir / f"{image_id}_cellmask.png", out_dir / f"{image_id}_nucleimask.png"


def table_name(shard: tuple[int, int] = (0, 1), stem: str = "cells") -> str:
    """``cells.csv`` for an unsharded run, ``cells.shard-i-of-N.csv`` for shard i of N."""
    return shard_path(f"{stem}.csv", shard).name


def mask_stats(image_id: str, cells: np.ndarray, nuclei: np.ndarray, seconds: float = float("nan")) -> dict:
    """One table row: cell count and mean/median cell area, mean nucleus area (pixels)."""
    cell_areas = np.bincount(cells.ravel())[1:]
    cell_areas = cell_areas[cell_areas > 0]
    nuc_areas = np.bincount(nuclei.ravel())[1:]
    nuc_areas = nuc_areas[nuc_areas > 0]
    return {
        "ID": image_id,
        "height": int(cells.shape[0]),
        "width": int(cells.shape[1]),
        "n_cells": int(cell_areas.size),
        "mean_cell_area": float(cell_areas.mean()) if cell_areas.size else 0.0,
        "median_cell_area": float(np.median(cell_areas)) if cell_areas.size else 0.0,
        "mean_nucleus_area": float(nuc_areas.mean()) if nuc_areas.size else 0.0,
        "seconds": float(seconds),
    }


def segmenter_settings(section: SegmentSettings, device: str = "cpu") -> tuple[str, dict, str]:
    """``(name, kwargs, reason)`` for :func:`hpa.segment.get_segmenter` from the ``segment`` settings.

    ``auto`` resolves to ``hpacellseg`` when the package imports and both weight files exist, to
    ``classical`` otherwise (:func:`hpa.segment.resolve_segmenter`); ``reason`` says which and why.
    """
    h = section.hpacellseg
    name, reason = resolve_segmenter(section.segmenter, h.nuclei_weights, h.cell_weights)
    log.info("segmenter %s (%s)", name, reason)
    if name == "classical":
        return name, dataclasses.asdict(section.classical), reason
    return name, {"nuclei_model": h.nuclei_weights, "cell_model": h.cell_weights, "scale_factor": h.scale_factor,
                  "padding": h.padding, "multi_channel_model": h.multi_channel_model, "labeler": h.labeler,
                  "reference_size": h.reference_size, "device": device}, reason


def record_segmenter(out_dir: str | os.PathLike, name: str, kw: dict, reason: str) -> Path:
    """``{out_dir}/segmenter.json``: which segmenter made the masks, why, and its settings (for the report)."""
    settings = {k: v for k, v in kw.items() if k != "device"}
    return write_json(Path(out_dir) / "segmenter.json", {"segmenter": name, "reason": reason, "settings": settings})


# ------------------------------------------------------------------ worker side
_WORKER: dict = {}


def _init_worker(name: str, kw: dict, image_dir: str, out_dir: str, skip_bad: bool) -> None:
    """Build the segmenter once per process; keep OpenCV single-threaded so processes scale."""
    import cv2

    from hpa.segment import get_segmenter

    cv2.setNumThreads(1)
    _WORKER.update(segmenter=get_segmenter(name, **kw), image_dir=image_dir, out_dir=out_dir, skip_bad=skip_bad)


def _process(image_id: str) -> dict:
    """Segment one image and write its masks; returns a table row or ``{"ID", "reason"}``."""
    t0 = time.perf_counter()
    try:
        field = read_field(_WORKER["image_dir"], image_id)
        cells, nuclei = _WORKER["segmenter"].segment(field)
    except InputError as exc:
        if _WORKER["skip_bad"]:
            return {"ID": image_id, "reason": str(exc)}
        raise
    cell_path, nuc_path = mask_paths(_WORKER["out_dir"], image_id)
    write_mask(nuc_path, nuclei)  # the cell mask last: it marks the image as finished
    write_mask(cell_path, cells)
    return mask_stats(image_id, cells, nuclei, time.perf_counter() - t0)


# ------------------------------------------------------------------ driver side
def segment_images(ids: list[str], image_dir: str | os.PathLike, out_dir: str | os.PathLike, segmenter: str = "classical",
                   segmenter_kw: dict | None = None, shard: tuple[int, int] = (0, 1), workers: int = 1,
                   force: bool = False, on_bad_image: str = "error", desc: str = "segment") -> pd.DataFrame:
    """Segment the images of one shard of ``ids`` and write masks and the shard's table.

    Args:
        ids: image IDs in a fixed order (the whole split; the shard is selected here).
        image_dir: folder of the channel files ``{ID}_{red,green,blue,yellow}.*``.
        out_dir: output folder (``RUN/masks/{split}``).
        segmenter, segmenter_kw: registry name and settings (:func:`hpa.segment.get_segmenter`).
        shard: ``(i, N)``: every N-th image from i (:func:`hpa.utils.shards.select_shard`).
        workers: processes (<= 1: in this process).
        force: re-segment images whose masks exist.
        on_bad_image: ``"error"`` (raise, naming the file) or ``"skip"`` (record in skipped.csv).
    Returns:
        The shard's table (:data:`TABLE_COLUMNS`), in the order of ``ids``; also written
        to ``out_dir / table_name(shard)``.
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = select_shard(list(ids), shard)
    if on_bad_image == "error":
        check_images_exist(image_dir, mine)  # fail before long work
    table_path = out_dir / table_name(shard)
    old = _read_table(table_path)
    done = [] if force else [i for i in mine if all(p.is_file() for p in mask_paths(out_dir, i))]
    todo = [i for i in mine if i not in set(done)]
    log.info("%s: %d image(s) in shard %d/%d, %d already done, %d to segment with %r", desc, len(mine), shard[0],
             shard[1], len(done), len(todo), segmenter)
    rows: dict[str, dict] = {}
    for image_id in done:
        rows[image_id] = old.get(image_id) or _stats_from_files(out_dir, image_id)
    skipped: list[dict] = []
    init_args = (segmenter, dict(segmenter_kw or {}), str(image_dir), str(out_dir), on_bad_image == "skip")
    try:
        for res in map_jobs(_process, todo, workers, desc=desc, initializer=_init_worker, initargs=init_args,
                            ordered=False):
            if "reason" in res:
                log.warning("skipping image %s: %s", res["ID"], res["reason"])
                skipped.append(res)
            else:
                rows[res["ID"]] = res
    finally:
        _WORKER.clear()  # the in-process segmenter (workers <= 1) is not kept between calls
    table = pd.DataFrame([rows[i] for i in mine if i in rows], columns=TABLE_COLUMNS)
    write_csv(table_path, table)
    skip_path = out_dir / table_name(shard, "skipped")
    if skipped or skip_path.is_file():
        write_csv(skip_path, pd.DataFrame(skipped, columns=SKIPPED_COLUMNS))
    if skipped:
        log.warning("%d image(s) skipped, listed in %s", len(skipped), skip_path)
    empty = table.loc[table["n_cells"] == 0, "ID"].tolist()
    if empty:  # kept with empty masks (n_cells 0 in the table); later stages give them no cells
        log.warning("%d image(s) without any cell (empty masks, n_cells 0 in %s): %s", len(empty), table_path,
                    ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else ""))
    return table


def segment_split(data_dir: str | os.PathLike, split: str, out_dir: str | os.PathLike, **kw) -> pd.DataFrame:
    """:func:`segment_images` over a split of a Kaggle-layout folder (``DATA/{split}/``).

    With ``shard=(i, N)``, N > 1, the shards' tables are merged into ``cells.csv`` (and
    ``skipped.csv``) as soon as every shard's table exists.
    """
    ids, _ = list_split(data_dir, split)
    table = segment_images(ids, Path(data_dir) / split, out_dir, desc=f"segment {split}", **kw)
    merge_when_complete(Path(out_dir) / "cells.csv", kw.get("shard", (0, 1)), lambda n: merge_tables(out_dir, n, ids))
    return table


def merge_tables(out_dir: str | os.PathLike, n_shards: int, ids: list[str] | None = None) -> pd.DataFrame:
    """Join ``cells.shard-i-of-N.csv`` (i = 0..N-1) into ``cells.csv`` (and the skipped lists).

    Args:
        out_dir: folder holding the shard tables.
        n_shards: N.
        ids: the split's IDs; rows follow this order (default: sorted by ID).
    Raises:
        FileNotFoundError listing the shards whose table is missing.
    """
    out_dir = Path(out_dir)
    table = merge_shard_tables(out_dir / "cells.csv", n_shards, ids if ids is not None else _sorted_ids(out_dir, n_shards),
                               _read_csv, _write_table, "segmentation table")
    skip_paths = [out_dir / table_name((i, n_shards), "skipped") for i in range(n_shards)]
    skips = [pd.read_csv(p, dtype={"ID": str}) for p in skip_paths if p.is_file()]
    if skips or (out_dir / "skipped.csv").is_file():
        merged = pd.concat(skips, ignore_index=True) if skips else pd.DataFrame(columns=SKIPPED_COLUMNS)
        write_csv(out_dir / "skipped.csv", merged[SKIPPED_COLUMNS])
    return table


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"ID": str})


def _write_table(path: Path, table: pd.DataFrame) -> None:
    write_csv(path, table[TABLE_COLUMNS])


def _sorted_ids(out_dir: Path, n: int) -> list[str]:
    return sorted(set().union(*(_read_csv(shard_path(out_dir / "cells.csv", (i, n)))["ID"] for i in range(n)
                                if shard_path(out_dir / "cells.csv", (i, n)).is_file())))


def _read_table(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        df = pd.read_csv(path, dtype={"ID": str})
    except Exception as exc:  # a damaged table is rebuilt from the masks
        log.warning("ignoring unreadable table %s (%s); rows are recomputed from the masks", path, exc)
        return {}
    if list(df.columns) != TABLE_COLUMNS:
        return {}
    return {r["ID"]: r for r in df.to_dict("records")}


def _stats_from_files(out_dir: Path, image_id: str) -> dict:
    cell_path, nuc_path = mask_paths(out_dir, image_id)
    return mask_stats(image_id, read_mask(cell_path), read_mask(nuc_path))
