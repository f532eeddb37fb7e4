"""Stage 05 library: the cell-level single-label classifier.

Pieces, each usable alone:

- *cell labels*: a DataFrame ``ID, cell_id, weight, t0..t18`` of soft targets (rows sum
  to 1), from stage 04's pseudo-labels (:func:`read_pseudo_labels`, hard -> one-hot) or
  from the ground truth in oracle mode (:func:`oracle_cell_labels`: true cells matched
  one-to-one at IoU >= 0.6 to OUR predicted cells; a true cell with k classes gives each
  1/k; unmatched predicted cells are left out);
- :func:`attach_targets`: labels joined onto the rows of the crop cache
  (:mod:`hpa.cells.crops`); :func:`balanced_sample_weights`: class-balanced sampling
  weights ``sum_c t_c * count_c ** -power`` x the label weight;
- :func:`cell_model_from_image_model`: the image model's architecture and backbone
  weights with a fresh 19-way linear head;
- :func:`predict_cells`: softmax probabilities of every cached cell;
- :func:`train_cell_stage`: stage 05 end to end. Training is :func:`hpa.engine.trainer.fit`
  (task ``multiclass``: softmax cross-entropy with probability targets and label
  smoothing) on :class:`hpa.data.cache.FieldDataset` over the crop cache (uint8 crops; the loop
  flips/turns them, jitters intensities and normalises with the image model's per-channel
  mean/std), validated on the cells of the image model's validation fold.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from hpa.cells.crops import build_crop_cache
from hpa.cells.targets import attach_targets, balanced_sample_weights, oracle_cell_labels, read_pseudo_labels
from hpa.config import CellModelSettings, Settings
from hpa.constants import NUM_CLASSES, PROB_COLS
from hpa.io.errors import InputError
from hpa.models.factory import cell_model_from_image_model
from hpa.utils.fs import write_json, write_parquet

log = logging.getLogger(__name__)


def read_val_ids(run: str | os.PathLike, val_fold: int) -> set[str]:
    """IDs of the validation fold from ``RUN/splits.csv`` (written by stage 01: ID, fold)."""
    path = Path(run) / "splits.csv"
    if not path.is_file():
        raise InputError(f"{path} not found: stage 01 writes the image folds; run it first")
    df = pd.read_csv(path, dtype={"ID": str})
    if not {"ID", "fold"} <= set(df.columns):
        raise InputError(f"{path}: expected columns ID, fold; found {list(df.columns)}")
    return set(df.loc[df["fold"] == int(val_fold), "ID"])


def predict_cells(model: nn.Module, meta: dict, crops: np.ndarray, index: pd.DataFrame, batch_size: int = 256,
                  device: str = "cpu", tta_flip: bool = False, amp: str = "auto") -> pd.DataFrame:
    """Softmax probabilities of every cell of a crop cache (via :func:`hpa.engine.inference.predict`).

    Args:
        model, meta: a multi-class cell model and its meta (:func:`hpa.engine.checkpoint.load_model`).
        crops: uint8 ``(N, 4, s, s)`` crop cache; index: its index (``ID, cell_id, row``).
    Returns:
        ``ID, cell_id, p0..p18`` (float32), one row per index row in index order; rows sum to 1.
    """
    from hpa.engine.inference import predict

    if meta.get("task") != "multiclass" or meta.get("num_classes") != NUM_CLASSES:
        raise ValueError(f"expected a {NUM_CLASSES}-class multiclass cell model, got task {meta.get('task')!r} "
                         f"with {meta.get('num_classes')} classes")
    rows = index["row"].to_numpy(np.int64)
    if len(rows) and not np.array_equal(rows, np.arange(len(crops))):
        crops = _Rows(crops, rows)
    probs = predict(model, meta, crops, batch_size=batch_size, device=device, tta_flip=tta_flip, amp=amp)
    df = index[["ID", "cell_id"]].reset_index(drop=True).copy()
    df[PROB_COLS] = probs.astype(np.float32) if len(df) else np.zeros((0, NUM_CLASSES), np.float32)
    return df


class _Rows(torch.utils.data.Dataset):
    def __init__(self, arr, rows):
        self.arr, self.rows = arr, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.arr[self.rows[i]]))


# --------------------------------------------------------------------------- stage 05
def stage_dir(run: str | os.PathLike, cycle: int | None, oracle: bool = False) -> Path:
    """``RUN/cycle{k}`` or ``RUN/oracle``: where a cell model and its probabilities go."""
    if oracle:
        return Path(run) / "oracle"
    if cycle not in (1, 2):
        raise ValueError(f"cycle must be 1 or 2, got {cycle}")
    return Path(run) / f"cycle{cycle}"


def outputs(run: str | os.PathLike, cycle: int | None, oracle: bool = False, oof_folds: int = 0) -> dict[str, Path]:
    """The files stage 05 writes: ``model`` (cell_model/model.pt), ``probs_{split}`` and, for cycle 1 with
    ``cell_model.oof_folds`` > 1, ``oof`` (``cycle1/oof.json``: the train probabilities are out-of-fold)."""
    d = stage_dir(run, cycle, oracle)
    out = {"model": d / "cell_model" / "model.pt", "probs_test": d / "cell_probs_test.parquet"}
    if not oracle:
        out["probs_train"] = d / "cell_probs_train.parquet"
    if not oracle and cycle == 1 and oof_folds > 1:
        out["oof"] = d / "oof.json"
    return out


def stale_out_of_fold(run: str | os.PathLike, cycle: int | None, oracle: bool, oof_folds: int) -> bool:
    """True when cycle 1's train probabilities are out-of-fold but ``oof_folds`` now asks for the model's own."""
    return not oracle and cycle == 1 and oof_folds <= 1 and (stage_dir(run, 1) / "oof.json").is_file()


def split_cache(run: Path, data_dir: Path, split: str, s: CellModelSettings,
                workers: int) -> tuple[np.ndarray, pd.DataFrame]:
    """The crop cache of every usable image of ``split`` (``RUN/cell_cache/``), built or reused."""
    from hpa.io.layout import list_split
    from hpa.pipeline.pseudo_labels import usable_ids

    ids = usable_ids(run, split, list_split(data_dir, split)[0])
    return build_crop_cache(data_dir, run / "masks" / split, split, ids, s.crop_size, s.margin, s.outside,
                            s.dim_factor, run / "cell_cache", workers)


def train_cell_stage(run: str | os.PathLike, cfg: Settings, cycle: int | None = None, oracle: bool = False, *,
                     device: str = "cpu", force: bool = False, progress: bool = True) -> dict[str, Path]:
    """Stage 05: train (or resume, or reuse) a cell model and predict every train/test cell.

    Args:
        run: run directory (reads ``masks/``, ``image_model/model.pt``, ``splits.csv``,
            ``cycle{k}/pseudo_labels.parquet``; oracle: ``DATA/gt``).
        cfg: the run's settings (``cell_model``, ``data``, ``seed``, ``num_workers``,
            ``image_model.val_fold``).
        cycle: 1 or 2 (ignored with ``oracle``).
        oracle: train on true cell labels moved onto our cells (upper bound) -> ``RUN/oracle/``.
        device: resolved device. force: retrain and re-predict.
    Returns:
        the paths written (see :func:`outputs`); test probabilities are skipped (absent from the
        dict) when ``RUN/masks/test`` does not exist.
    """
    from hpa.data.augment import BatchAugment
    from hpa.data.cache import FieldDataset
    from hpa.engine.distributed import init_distributed, main_first
    from hpa.engine.trainer import TrainSettings, fit

    s = cfg.cell_model
    run, data_dir = Path(run), Path(cfg.data)
    out = outputs(run, cycle, oracle, s.oof_folds)
    model_dir = out["model"].parent
    if stale_out_of_fold(run, cycle, oracle, s.oof_folds):  # oof_folds switched off: the model's own opinion again
        log.info("%s holds out-of-fold probabilities; cell_model.oof_folds=%d: predicting with the cycle-1 model",
                 out["probs_train"], s.oof_folds)
        out["probs_train"].unlink(missing_ok=True)
        (model_dir.parent / "oof.json").unlink()
    init_distributed(device)
    main_first(lambda: split_cache(run, data_dir, "train", s, cfg.num_workers))  # the others wait, no time limit
    crops, index = split_cache(run, data_dir, "train", s, 0)
    rows, targets, weights, tr, va = _training_cells(run, data_dir, index, cycle, oracle, cfg.image_model.val_fold)
    log.info("%s: %d labelled cells (%d train, %d validation images' cells) of %d cached; classes %s",
             model_dir, len(rows), len(tr), len(va), len(index),
             np.bincount(targets.argmax(1), minlength=NUM_CLASSES).tolist())
    npy = run / "cell_cache" / f"train_{s.crop_size}.npy"
    val_rows = rows[va]
    epochs = s.cycle2_epochs if (oracle or cycle == 2) and s.cycle2_epochs else s.epochs

    def train(train_sel: np.ndarray, folder: Path, what: dict, force: bool = force) -> None:
        model, image_meta = _initial_model(run, s, cycle, oracle, cfg.seed)
        fit(model, FieldDataset(npy, rows[train_sel], targets[train_sel]),
            FieldDataset(npy, val_rows, targets[va]) if len(va) else None, folder,
            TrainSettings.of(s, task="multiclass", num_workers=s.loader_workers, seed=cfg.seed, epochs=epochs),
            device=device,
            sample_weights=balanced_sample_weights(targets[train_sel], weights[train_sel], s.balance_power),
            mean=image_meta["mean"], std=image_meta["std"],
            augment=BatchAugment(flips=True, rot90=True, intensity=s.aug_intensity),
            val_index=index.iloc[val_rows][["ID", "cell_id"]].reset_index(drop=True) if len(va) else None,
            extra_meta={"cell_model": True, "cycle": None if oracle else cycle, "oracle": oracle,
                        "crop_size": s.crop_size, "margin": s.margin, "outside": s.outside,
                        "dim_factor": s.dim_factor, "image_model": str(run / "image_model" / "model.pt"),
                        "n_train": int(len(train_sel)), "n_val": int(len(va)), "seed": cfg.seed, **what},
            force=force, progress=progress)

    train(tr, model_dir, {})
    if len(va) == 0:
        log.warning("no labelled cells in the validation images: %s has no validation metrics", model_dir)
    written = {"model": out["model"]}
    written.update(main_first(lambda: _predict_splits(run, data_dir, s, out, (crops, index), oracle, cfg.num_workers,
                                                       device, force)) or {})
    if "oof" in out:
        _out_of_fold(run, cfg, out, index, rows, tr, crops, train, device, force)
        written["oof"] = out["oof"]
    return written


def oof_folds(ids, k: int, seed: int) -> dict[str, int]:
    """Each image ID's out-of-fold group ``0..k-1``: a seeded shuffle of the sorted IDs, dealt in turn."""
    ids = sorted(set(map(str, ids)))
    order = np.random.default_rng([seed, 7919]).permutation(len(ids))
    return {ids[j]: pos % k for pos, j in enumerate(order)}


def _out_of_fold(run: Path, cfg: Settings, out: dict, index: pd.DataFrame, rows: np.ndarray, tr: np.ndarray,
                 crops: np.ndarray, train, device: str, force: bool) -> None:
    """``cell_model.oof_folds`` k > 1: replace the training images' rows of ``cell_probs_train.parquet`` by the
    probabilities of a model that did not train on that image (k models, ``cycle1/oof/fold{j}``).

    A model's opinion of the cells it trained on echoes their pseudo-labels, wrong ones included;
    cycle 2 weighs that opinion against the rule (``pseudo.cycle2.weight``) and fills the cells the
    rule left out from it, so an opinion formed without those cells can correct them. The
    validation fold's cells keep the cycle-1 model's probabilities (it never trained on them).
    ``cycle1/oof.json`` records the folds; a re-run with the same k reuses the result.
    """
    from hpa.engine.distributed import main_first

    s = cfg.cell_model
    path, marker = out["probs_train"], out["oof"]
    if marker.is_file() and not force and marker.stat().st_mtime >= out["model"].stat().st_mtime:
        done = json.loads(marker.read_text())
        if done.get("folds") == s.oof_folds:
            log.info("%s is up to date (%d-fold out-of-fold); skipping", path, s.oof_folds)
            return
    index_ids = index["ID"].astype(str).to_numpy()
    train_ids = index_ids[rows[tr]]
    group = oof_folds(train_ids, s.oof_folds, cfg.seed)
    row_group = np.array([group.get(i, -1) for i in index_ids])  # -1: validation-fold (or unlabelled-only) images
    label_group = row_group[rows[tr]]
    fold_dirs = [path.parent / "oof" / f"fold{j}" for j in range(s.oof_folds)]
    for j, folder in enumerate(fold_dirs):
        log.info("cycle 1 out-of-fold model %d/%d: trains without %d of %d training images", j + 1, s.oof_folds,
                 sum(g == j for g in group.values()), len(group))
        done = folder / "cell_model" / "model.pt"
        stale = done.is_file() and done.stat().st_mtime < out["model"].stat().st_mtime  # from an older cycle 1
        train(tr[label_group != j], folder / "cell_model", {"oof_fold": j, "oof_folds": s.oof_folds}, force or stale)

    def predict_and_merge():
        from hpa.engine.checkpoint import load_model

        probs = pd.read_parquet(path)
        if not (probs["ID"].astype(str).to_numpy() == index_ids).all():
            raise InputError(f"{path}: rows do not follow the crop cache's index; re-run stage 05 with --force")
        values = probs[PROB_COLS].to_numpy(np.float32, copy=True)
        for j, folder in enumerate(fold_dirs):
            sel = np.flatnonzero(row_group == j)
            model, meta = load_model(folder / "cell_model" / "model.pt", device)
            fold_probs = predict_cells(model, meta, crops, index.iloc[sel], s.predict_batch_size, device, s.tta_flip,
                                       s.amp)
            values[sel] = fold_probs[PROB_COLS].to_numpy(np.float32)
        probs[PROB_COLS] = values
        write_parquet(path, probs)
        write_json(marker, {"folds": s.oof_folds, "images": len(group),
                            "cells_replaced": int((row_group >= 0).sum()), "cells": len(index)})
        log.info("%s: %d of %d cells now from out-of-fold models (%d folds)", path, int((row_group >= 0).sum()),
                 len(index), s.oof_folds)

    main_first(predict_and_merge)


def _training_cells(run: Path, data_dir: Path, index: pd.DataFrame, cycle: int | None, oracle: bool,
                    val_fold: int) -> tuple[np.ndarray, ...]:
    """Cache rows, targets and weights of the labelled cells, and which of them train / validate."""
    if oracle:
        labels = oracle_cell_labels(data_dir, run / "masks" / "train", list(dict.fromkeys(index["ID"])))
    else:
        labels = read_pseudo_labels(stage_dir(run, cycle) / "pseudo_labels.parquet")
    rows, targets, weights = attach_targets(index, labels)
    is_val = np.isin(index["ID"].to_numpy()[rows].astype(str), list(read_val_ids(run, val_fold)))
    tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if len(tr) == 0:
        raise InputError(f"no labelled cells in the training images ({len(labels)} labels, {len(va)} in validation)")
    return rows, targets, weights, tr, va


def _initial_model(run: Path, s: CellModelSettings, cycle: int | None, oracle: bool, seed: int) -> tuple[nn.Module, dict]:
    """The cell model before training (from the image model, or cycle 1's with ``cycle2_init=cycle1``) and the
    image model's meta (normalisation)."""
    from hpa.engine.checkpoint import load_model

    image_model, image_meta = load_model(run / "image_model" / "model.pt")
    if image_meta.get("mean") is None:
        raise InputError(f"{run / 'image_model' / 'model.pt'} has no normalisation mean/std in its meta")
    model = cell_model_from_image_model(image_model, s.crop_size, s.dropout, s.output_stride, s.bn_momentum, seed,
                                        s.drop_connect)
    if not oracle and cycle == 2 and s.cycle2_init == "cycle1":
        prev = stage_dir(run, 1) / "cell_model" / "model.pt"
        if not prev.is_file():
            raise InputError(f"{prev} not found: cell_model.cycle2_init=cycle1 needs the cycle-1 cell model "
                             "(stage 05 --cycle 1)")
        model.load_state_dict(load_model(prev)[0].state_dict(), strict=True)
        log.info("cycle 2 starts from the cycle-1 cell model %s", prev)
    return model, image_meta


def _predict_splits(run: Path, data_dir: Path, s: CellModelSettings, out: dict, train_cache: tuple, oracle: bool,
                    workers: int, device: str, force: bool) -> dict[str, Path]:
    """``cell_probs_{train,test}.parquet`` of the trained model (kept when newer than the model)."""
    from hpa.engine.checkpoint import load_model

    model, meta = load_model(out["model"], device)
    has_test = (run / "masks" / "test").is_dir()
    if not has_test:
        log.info("%s does not exist: no test-cell probabilities (run stage 03 on the test split)", run / "masks" / "test")
    written = {}
    for split in (["train"] if not oracle else []) + (["test"] if has_test else []):
        path = out[f"probs_{split}"]
        if path.is_file() and not force and path.stat().st_mtime >= out["model"].stat().st_mtime:
            log.info("%s is up to date; skipping (force retrains and re-predicts)", path)
        else:
            crops, index = split_cache(run, data_dir, split, s, workers) if split == "test" else train_cache
            probs = predict_cells(model, meta, crops, index, s.predict_batch_size, device, s.tta_flip, s.amp)
            write_parquet(path, probs)
            log.info("wrote %s (%d cells of %d images)", path, len(probs), probs["ID"].nunique())
        written[f"probs_{split}"] = path
    return written
