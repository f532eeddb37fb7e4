"""The per-split loop of stage 02: CAMs of every image, resumable and sharded, then overlays.

Outputs under ``RUN/cams/``:

- ``{split}/{ID}.npz``: one file per image (:func:`hpa.cam.maps.save_cam`): raw float16 CAMs of
  the selected classes at feature resolution, their class indices, 19 probabilities and logits.
  Train: the image's labels. Test: every class with probability >= ``prob_floor`` (0: all 19).
- ``{split}/probs.csv``: ``ID, p0..p18`` for every image, written when the split is complete
  (by the shard that finishes last).
- ``{split}/skipped.csv``: ``ID, reason`` of images left out (``on_bad_image=skip``), written
  with ``probs.csv``; later stages leave these images out.
- ``{split}/settings.json``: method, flips, floor, input size and the model's checksum the
  files were made with; resuming with other settings is an error unless ``force``.
- ``overlays/{split}/{ID}.png`` and ``overlays/index.html``: see :mod:`hpa.cam.overlay`.

Fields come from the uint8 cache of :mod:`hpa.data.cache` (``RUN/cache/{split}_{S}.npy``, built by
stage 01 for train, here for test). An image whose ``.npz`` exists is skipped unless ``force``.
With ``shard = (i, N)`` the shard takes every N-th image; it reads the whole split's cache
when that is complete, otherwise builds a cache of its own images only
(``{split}_{S}.shard-i-of-N.npy``), so shards never write the same file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from hpa.cam.maps import load_cam, save_cam
from hpa.cam.methods import check_method, head_bias, image_cams
from hpa.constants import PROB_COLS
from hpa.io.errors import InputError, check_same_settings
from hpa.io.layout import list_split, usable_images
from hpa.utils.fs import write_csv, write_json, write_text
from hpa.utils.parallel import map_jobs
from hpa.utils.shards import select_shard

log = logging.getLogger(__name__)


def cams_dir(run: str | os.PathLike, split: str) -> Path:
    """``RUN/cams/{split}``."""
    return Path(run) / "cams" / split


def overlays_dir(run: str | os.PathLike) -> Path:
    """``RUN/cams/overlays`` (one sub-folder per split, plus ``index.html``)."""
    return Path(run) / "cams" / "overlays"


def file_sha1(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes (identifies the model the CAMs were made with)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _bad_marker(out_dir: Path, image_id: str) -> Path:
    return out_dir / f"{image_id}.skipped.txt"


def _open_cache(run: Path, data_dir: Path, split: str, ids_ok: list[str], mine: list[str], size: int,
                shard: tuple[int, int], workers: int, on_bad_image: str):
    """``(cache, row_of_id, bad)``: the whole split's cache when usable, else this shard's own."""
    from hpa.data.cache import build_field_cache, cache_bad_ids, cache_path

    full = cache_path(run, split, size)
    side = full.with_suffix(".json")
    use_full = shard[1] == 1
    if not use_full and full.is_file() and side.is_file():
        meta = json.loads(side.read_text())
        use_full = meta.get("size") == size and meta.get("ids") == ids_ok
    if use_full:
        path, ids = full, ids_ok
    else:
        path, ids = full.with_name(f"{split}_{size}.shard-{shard[0]}-of-{shard[1]}.npy"), mine
    cache = build_field_cache(data_dir, split, ids, size, path, workers=workers, on_bad_image=on_bad_image)
    return cache, {i: r for r, i in enumerate(ids)}, cache_bad_ids(path)


def compute_split_cams(run: str | os.PathLike, data_dir: str | os.PathLike, split: str, model: torch.nn.Module,
                       meta: dict, *, method: str = "cam", batch_size: int = 16, tta_flip: bool = False,
                       prob_floor: float = 0.0, device: str = "cpu", shard: tuple[int, int] = (0, 1),
                       force: bool = False, workers: int = 0, on_bad_image: str = "error",
                       signature: dict | None = None, progress: bool = True, amp: str = "auto",
                       scale: float = 1.0) -> dict:
    """Compute and store the CAMs of every image of a split (or of one shard of it).

    Args:
        run: run directory (outputs in ``RUN/cams/{split}/``, field cache in ``RUN/cache/``).
        data_dir: Kaggle-layout data folder (``train.csv`` labels select the train classes).
        split: ``train`` or ``test``.
        model, meta: the image model and its meta (from :func:`hpa.engine.checkpoint.load_model`): ``meta``
            needs ``image_size`` and ``mean``/``std`` (None: no normalisation).
        method: a name of :func:`hpa.cam.methods.available_methods`. batch_size: images per pass.
        tta_flip: average over flips. prob_floor: test split class selection.
        device: where the model runs. shard: ``(i, N)``. force: recompute finished images.
        workers: cache decoding processes. on_bad_image: ``error`` | ``skip``.
        signature: extra entries for ``settings.json`` (e.g. the model's checksum).
        amp: mixed precision of the ``cam`` method (:func:`hpa.engine.amp.amp_dtype`: bf16 on GPUs that have
            it, fp16 on older GPUs, off on the CPU with ``auto``); other methods run in float32.
    Returns:
        ``{"images", "computed", "done_before", "skipped", "complete"}`` counts of this call.
    """
    from hpa.data.cache import read_cache_rows
    from hpa.engine.amp import amp_dtype, prepare_batch

    check_method(method)
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; valid: train, test")
    run, data_dir = Path(run), Path(data_dir)
    out_dir = cams_dir(run, split)
    size = int(meta["image_size"])
    settings = {"method": method, "tta_flip": bool(tta_flip), "input_size": size, "tile": meta.get("tile"),
                "prob_floor": float(prob_floor) if split == "test" else None, **(signature or {})}
    if scale != 1:  # absent at 1, so folders written before the setting existed resume
        settings["scale"] = float(scale)
    check_same_settings(out_dir / "settings.json", settings, force, "CAMs", "pass --force to recompute them all")

    ids, labels = list_split(data_dir, split)
    label_of = {i: np.flatnonzero(row).tolist() for i, row in zip(ids, labels)} if labels is not None else None
    ids_ok, bad = usable_images(data_dir / split, ids, on_bad_image)
    mine = select_shard(ids_ok, shard)
    todo = [i for i in mine if force or not ((out_dir / f"{i}.npz").is_file() or _bad_marker(out_dir, i).is_file())]
    stats = {"images": len(mine), "computed": 0, "done_before": len(mine) - len(todo), "skipped": 0}
    write_json(out_dir / "settings.json", settings)
    for i in sorted(bad):  # files missing: every shard records all of them (same content)
        write_text(_bad_marker(out_dir, i), bad[i] + "\n")
    if todo:
        cache, row_of, cache_bad = _open_cache(run, data_dir, split, ids_ok, mine, size, shard, workers, on_bad_image)
        for i in todo:
            if i in cache_bad:
                write_text(_bad_marker(out_dir, i), cache_bad[i] + "\n")
                stats["skipped"] += 1
        todo = sorted((i for i in todo if i not in cache_bad), key=row_of.__getitem__)
        mean = std = None
        if meta.get("mean") is not None and meta.get("normalize", True):
            mean = torch.tensor(meta["mean"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
            std = torch.tensor(meta["std"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
        autocast = amp_dtype(amp, device) if method == "cam" else None
        model = model.to(device).eval()
        bias = head_bias(model)
        log.info("%s CAMs of %d %s images (%s%s) -> %s", method, len(todo), split,
                 f"{size} px" + (f", maps at {scale:g}x: {round(size * scale)} px" if scale != 1 else ""),
                 ", flip TTA" if tta_flip else "", out_dir)
        bar = tqdm(total=len(todo), desc=f"cams {split}", unit="img", mininterval=2.0, disable=not progress)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            x = torch.from_numpy(read_cache_rows(cache, [row_of[i] for i in chunk]))  # RSS flat in N
            x = prepare_batch(x.to(device), mean, std)
            labs = [label_of[i] for i in chunk] if label_of is not None else None
            for image_id, res in zip(chunk, image_cams(model, x, method, labs, prob_floor, tta_flip, autocast=autocast,
                                                         tile=meta.get("tile"), scale=scale)):
                save_cam(out_dir / f"{image_id}.npz", res.cams, res.classes, res.probs, res.logits, method, size,
                         bias)
            stats["computed"] += len(chunk)
            bar.update(len(chunk))
        bar.close()
    stats["complete"] = merge_split(run, split, ids)
    return stats


def merge_split(run: str | os.PathLike, split: str, ids: list[str]) -> bool:
    """Write ``probs.csv`` and ``skipped.csv`` of a split once every image has a CAM or a skip
    marker; returns whether the split is complete (False: other shards still running)."""
    out_dir = cams_dir(run, split)
    missing = [i for i in ids if not (out_dir / f"{i}.npz").is_file() and not _bad_marker(out_dir, i).is_file()]
    if missing:
        log.info("%s: %d of %d images have no CAM yet (other shards?); probs.csv not written", out_dir, len(missing),
                 len(ids))
        return False
    rows, skipped = [], []
    for i in ids:
        if (out_dir / f"{i}.npz").is_file():
            rows.append([i] + load_cam(out_dir / f"{i}.npz").probs.tolist())
        else:
            skipped.append((i, _bad_marker(out_dir, i).read_text().strip()))
    write_csv(out_dir / "probs.csv", pd.DataFrame(rows, columns=["ID"] + PROB_COLS))
    write_csv(out_dir / "skipped.csv", pd.DataFrame(skipped, columns=["ID", "reason"]))
    if skipped:
        log.warning("%d %s image(s) skipped: see %s", len(skipped), split, out_dir / "skipped.csv")
    log.info("wrote %s (%d images)", out_dir / "probs.csv", len(rows))
    return True


# --------------------------------------------------------------------------- overlays
def _overlay_job(args) -> str:
    from hpa.cam.overlay import render_overlay, save_overlay
    from hpa.io.fields import read_field, read_mask

    folder, image_id, npz, mask_path, out_path, labels, panel_size, top_k = args
    rec = load_cam(npz)
    field = read_field(folder, image_id)
    mask = read_mask(mask_path) if mask_path and Path(mask_path).is_file() else None
    image = render_overlay(field, rec, labels=labels, cell_mask=mask, panel_size=panel_size, top_k=top_k,
                           title=image_id)
    save_overlay(out_path, image)
    return image_id


def draw_split_overlays(run: str | os.PathLike, data_dir: str | os.PathLike, split: str, max_images: int = 200,
                        panel_size: int = 512, top_k: int = 3, shard: tuple[int, int] = (0, 1),
                        force: bool = False, workers: int = 0, progress: bool = True) -> int:
    """Draw ``RUN/cams/overlays/{split}/{ID}.png`` for the first ``max_images`` images with CAMs.

    Cell outlines come from ``RUN/masks/{split}/{ID}_cellmask.png`` when stage 03 wrote it.
    Existing PNGs are kept unless ``force`` (use it after segmentation to add outlines).
    Returns the number of overlays drawn now.
    """
    run, data_dir = Path(run), Path(data_dir)
    ids, labels = list_split(data_dir, split)
    label_of = {i: np.flatnonzero(r).tolist() for i, r in zip(ids, labels)} if labels is not None else {}
    src, out = cams_dir(run, split), overlays_dir(run) / split
    chosen = [i for i in ids if (src / f"{i}.npz").is_file()][: max(int(max_images), 0)]
    jobs = []
    for i in select_shard(chosen, shard):
        target = out / f"{i}.png"
        if force or not target.is_file():
            jobs.append((str(data_dir / split), i, str(src / f"{i}.npz"), str(run / "masks" / split / f"{i}_cellmask.png"),
                         str(target), label_of.get(i), int(panel_size), int(top_k)))
    if not jobs:
        return 0
    for _ in map_jobs(_overlay_job, jobs, workers, desc=f"overlays {split}", ordered=False, progress=progress):
        pass
    log.info("drew %d overlays in %s", len(jobs), out)
    return len(jobs)


def write_overlay_index(run: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """(Re)write ``RUN/cams/overlays/index.html`` from the overlays of every split present."""
    from hpa.cam.overlay import GalleryEntry, write_gallery

    run, data_dir = Path(run), Path(data_dir)
    root = overlays_dir(run)
    entries = []
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            continue
        try:
            ids, labels = list_split(data_dir, split)
        except InputError:
            continue
        label_of = {i: np.flatnonzero(r).tolist() for i, r in zip(ids, labels)} if labels is not None else {}
        for i in ids:
            png, npz = folder / f"{i}.png", cams_dir(run, split) / f"{i}.npz"
            if png.is_file() and npz.is_file():
                rec = load_cam(npz)
                entries.append(GalleryEntry(split, i, png.relative_to(root).as_posix(), label_of.get(i), rec.probs,
                                            rec.method))
    return write_gallery(root / "index.html", entries)
