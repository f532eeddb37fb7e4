"""Stage 05 library: the cell-level single-label classifier.

Pieces, each usable alone:

- *cell labels*: a DataFrame ``ID, cell_id, weight, t0..t18`` of soft targets (rows sum
  to 1), from stage 04's pseudo-labels (:func:`read_pseudo_labels`, hard -> one-hot) or
  from the ground truth in oracle mode (:func:`oracle_cell_labels`: true cells matched
  one-to-one at IoU >= 0.6 to OUR predicted cells; a true cell with k classes gives each
  1/k; unmatched predicted cells are left out);
- :func:`attach_targets`: labels joined onto the rows of the crop cache
  (:mod:`hpa.cell_crops`); :func:`balanced_sample_weights`: class-balanced sampling
  weights ``sum_c t_c * count_c ** -power`` x the label weight;
- :func:`cell_model_from_image_model`: the image model's architecture and backbone
  weights with a fresh 19-way linear head;
- :func:`predict_cells`: softmax probabilities of every cached cell;
- :func:`train_cell_stage`: stage 05 end to end. Training is :func:`hpa.train.fit`
  (task ``multiclass``: softmax cross-entropy with probability targets and label
  smoothing) on :class:`hpa.data.FieldDataset` over the crop cache (uint8 crops; the loop
  flips/turns them, jitters intensities and normalises with the image model's per-channel
  mean/std), validated on the cells of the image model's validation fold.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import gt as gtmod
from .cell_crops import build_crop_cache
from .constants import IOU_THRESHOLD, NUM_CLASSES, PROB_COLS, TARGET_COLS
from .fsutil import write_parquet
from .io import InputError, read_mask

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- labels
def soft_targets(classes: Sequence[Sequence[int]]) -> np.ndarray:
    """float32 ``(N, 19)``: row i spreads 1 uniformly over ``classes[i]`` (one class -> one-hot)."""
    out = np.zeros((len(classes), NUM_CLASSES), np.float32)
    for i, cl in enumerate(classes):
        cl = sorted(set(int(c) for c in cl))
        if not cl or cl[0] < 0 or cl[-1] >= NUM_CLASSES:
            raise ValueError(f"row {i}: classes {cl} must be a non-empty subset of 0..{NUM_CLASSES - 1}")
        out[i, cl] = 1.0 / len(cl)
    return out


def _labels_frame(ids, cell_ids, classes, weights) -> pd.DataFrame:
    df = pd.DataFrame({"ID": pd.Series(ids, dtype=str), "cell_id": np.asarray(cell_ids, np.int64),
                       "weight": np.asarray(weights, np.float32)})
    return pd.concat([df, pd.DataFrame(soft_targets(classes), columns=TARGET_COLS)], axis=1)


def read_pseudo_labels(path: str | os.PathLike) -> pd.DataFrame:
    """Stage 04's ``pseudo_labels.parquet`` (ID, cell_id, label 0..18, weight) as cell labels.

    Returns ``ID, cell_id, weight, t0..t18``: one-hot targets, or uniform over the classes of an
    optional ``labels`` column (``"3|7"``, starting with ``label``). Rows of optional ``t0..t18``
    columns that are not all NaN are probability targets taken as they are (non-negative, summing
    to 1; stage 04 writes them for cycle 2's filled cells with ``pseudo.cycle2_fill_targets=soft``).
    ``weight`` defaults to 1.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found: run stage 04 (pseudo-labels) for this cycle first")
    df = pd.read_parquet(path)
    missing = {"ID", "cell_id", "label"} - set(df.columns)
    if missing:
        raise InputError(f"{path}: missing column(s) {sorted(missing)}; found {list(df.columns)}")
    labels = df["label"].to_numpy()
    bad = (labels < 0) | (labels >= NUM_CLASSES)
    if bad.any():
        raise InputError(f"{path}: {int(bad.sum())} labels outside 0..{NUM_CLASSES - 1} (first: {labels[bad][0]})")
    weight = df["weight"].to_numpy(np.float32) if "weight" in df.columns else np.ones(len(df), np.float32)
    if (weight < 0).any() or not np.isfinite(weight).all():
        raise InputError(f"{path}: weights must be finite and >= 0")
    if df.duplicated(["ID", "cell_id"]).any():
        raise InputError(f"{path}: a cell appears more than once")
    if "labels" in df.columns:  # soft multi-class targets: the best class first, then the others it passes
        sets = [[int(c) for c in str(v).split("|")] for v in df["labels"]]
        if any(c < 0 or c >= NUM_CLASSES for cs in sets for c in cs) or any(cs[0] != l for cs, l in zip(sets, labels)):
            raise InputError(f"{path}: column 'labels' must list classes 0..{NUM_CLASSES - 1} starting with 'label'")
    else:
        sets = [[int(c)] for c in labels]
    out = _labels_frame(df["ID"].astype(str), df["cell_id"], sets, weight)
    if set(TARGET_COLS) <= set(df.columns):
        given = df[TARGET_COLS].to_numpy(np.float64)
        rows = ~np.isnan(given).all(1)
        t = given[rows]
        if np.isnan(t).any() or (t < 0).any() or not np.allclose(t.sum(1), 1.0, atol=1e-3):
            raise InputError(f"{path}: soft targets t0..t{NUM_CLASSES - 1} must be non-negative and sum to 1 per cell")
        out.loc[rows, TARGET_COLS] = (t / t.sum(1, keepdims=True)).astype(np.float32)
    return out


def oracle_cell_labels(data_dir: str | os.PathLike, masks_dir: str | os.PathLike, ids: Sequence[str],
                       split: str = "train", threshold: float = IOU_THRESHOLD) -> pd.DataFrame:
    """True labels moved onto our predicted cells (oracle mode; reads ``DATA/gt``).

    Each predicted cell of ``masks_dir/{ID}_cellmask.png`` matched one-to-one at IoU >=
    ``threshold`` to a true cell of ``DATA/gt/{ID}_cellmask.png`` takes that cell's classes
    (soft target, uniform over them); unmatched cells are left out. Returns the cell-labels
    frame ``ID, cell_id, weight (1), t0..t18``.
    """
    truth = gtmod.read_cell_labels(data_dir, split)
    rows_id, rows_cell, rows_cls = [], [], []
    for image_id in ids:
        if image_id not in truth:
            continue
        pred = read_mask(Path(masks_dir) / f"{image_id}_cellmask.png")
        moved = gtmod.transfer_labels(pred, gtmod.read_gt_mask(data_dir, image_id), truth[image_id], threshold)
        for cid in sorted(moved):
            rows_id.append(image_id)
            rows_cell.append(cid)
            rows_cls.append(moved[cid])
    log.info("oracle: %d predicted cells of %d images took true labels", len(rows_id), len(ids))
    return _labels_frame(rows_id, rows_cell, rows_cls, np.ones(len(rows_id)))


def attach_targets(index: pd.DataFrame, labels: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labelled rows of a crop-cache index.

    Args:
        index: crop-cache index (ID, cell_id, row, ...).
        labels: cell labels (ID, cell_id, weight, t0..t18).
    Returns:
        ``(rows, targets, weights)``: int64 ``(M,)`` cache rows in index order, float32
        ``(M, 19)``, float32 ``(M,)``. Labels of cells missing from the cache are an error
        (the masks changed after labelling).
    """
    merged = labels.merge(index[["ID", "cell_id", "row"]], on=["ID", "cell_id"], how="left", validate="one_to_one")
    lost = merged["row"].isna()
    if lost.any():
        first = merged[lost].iloc[0]
        raise InputError(f"{int(lost.sum())} labelled cells are not in the crop cache (first: image {first.ID} "
                         f"cell {first.cell_id}); were the masks re-made after labelling? re-run stages 04 and 05")
    merged = merged.sort_values("row", kind="stable")
    return (merged["row"].to_numpy(np.int64), merged[TARGET_COLS].to_numpy(np.float32),
            merged["weight"].to_numpy(np.float32))


def balanced_sample_weights(targets: np.ndarray, weights: np.ndarray | None = None, power: float = 0.5) -> np.ndarray:
    """Sampling weight per cell: ``sum_c t_c * count_c ** -power`` x ``weights``, mean 1.

    ``count_c`` is the (soft) number of cells of class c; ``power`` 0.5 samples a class in
    proportion to the square root of its size, 1 equally often, 0 as it comes.
    Returns float64 ``(M,)``.
    """
    targets = np.asarray(targets, np.float64)
    if targets.ndim != 2 or targets.shape[1] != NUM_CLASSES:
        raise ValueError(f"targets must be (M, {NUM_CLASSES}), got {targets.shape}")
    counts = targets.sum(0)
    inv = np.where(counts > 0, np.maximum(counts, 1e-12) ** -float(power), 0.0)
    w = targets @ inv
    if weights is not None:
        w = w * np.asarray(weights, np.float64)
    return w / w.mean() if len(w) and w.mean() > 0 else w


def read_val_ids(run: str | os.PathLike, val_fold: int) -> set[str]:
    """IDs of the validation fold from ``RUN/splits.csv`` (written by stage 01: ID, fold)."""
    path = Path(run) / "splits.csv"
    if not path.is_file():
        raise InputError(f"{path} not found: stage 01 writes the image folds; run it first")
    df = pd.read_csv(path, dtype={"ID": str})
    if not {"ID", "fold"} <= set(df.columns):
        raise InputError(f"{path}: expected columns ID, fold; found {list(df.columns)}")
    return set(df.loc[df["fold"] == int(val_fold), "ID"])


# --------------------------------------------------------------------------- model
def cell_model_from_image_model(image_model: nn.Module, crop_size: int, dropout: float | None = None,
                                output_stride: int | None = None, bn_momentum: float | None = None,
                                seed: int = 0, drop_connect: float | None = None) -> nn.Module:
    """A new :class:`hpa.models.HPANet` with the image model's architecture and backbone weights.

    Args:
        image_model: the trained image-level HPANet (its ``arch`` and ``backbone`` are used).
        crop_size: the cell crop size (EfficientNet's static padding is built for it).
        dropout: head dropout (None: the image model's).
        output_stride: 16 or 32 (None: the image model's); the weights are the same either way.
        bn_momentum: BatchNorm momentum (None: the architecture's own).
        seed: seeds the new head's initialisation.
        drop_connect: EfficientNet stochastic depth rate while training (None: the arch's own).
    Returns:
        a model whose ``backbone`` state equals the image model's and whose ``head`` is a new
        ``nn.Linear(num_features, 19)``.
    """
    from .models import build_model

    arch = getattr(image_model, "arch", None)
    if arch is None or not hasattr(image_model, "backbone"):
        raise TypeError(f"expected an hpa.models.HPANet image model, got {type(image_model).__name__}")
    if output_stride is None:
        output_stride = model_output_stride(image_model)
    if dropout is None:
        dropout = float(image_model.dropout.p)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, num_classes=NUM_CLASSES, dropout=float(dropout), image_size=int(crop_size),
                            output_stride=int(output_stride), bn_momentum=bn_momentum, drop_connect=drop_connect)
    src = {k: v.detach().cpu() for k, v in image_model.backbone.state_dict().items()}
    model.backbone.load_state_dict(src, strict=True)
    return model


def model_output_stride(model: nn.Module) -> int:
    """16 or 32: the total stride of a model's backbone, measured on a 64-px input."""
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    with torch.no_grad():
        f = model.backbone(torch.zeros(1, 4, 64, 64, device=param.device, dtype=param.dtype))
    model.train(was_training)
    return 64 // f.shape[-1]


def predict_cells(model: nn.Module, meta: dict, crops: np.ndarray, index: pd.DataFrame, batch_size: int = 256,
                  device: str = "cpu", tta_flip: bool = False, amp: str = "auto") -> pd.DataFrame:
    """Softmax probabilities of every cell of a crop cache (via :func:`hpa.train.predict`).

    Args:
        model, meta: a multi-class cell model and its meta (:func:`hpa.train.load_model`).
        crops: uint8 ``(N, 4, s, s)`` crop cache; index: its index (``ID, cell_id, row``).
    Returns:
        ``ID, cell_id, p0..p18`` (float32), one row per index row in index order; rows sum to 1.
    """
    from .train import predict

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
#: Keys of the ``cell_model`` config section that :func:`train_cell_stage` understands.
SETTINGS = ("cycle2_init", "crop_size", "margin", "outside", "dim_factor", "output_stride", "epochs", "batch_size", "lr",
            "weight_decay", "warmup_epochs", "label_smoothing", "balance_power", "samples_per_epoch",
            "aug_intensity", "dropout", "bn_momentum", "drop_connect", "tta_flip", "predict_batch_size", "loader_workers", "amp",
            "channels_last", "accumulate", "grad_clip")


def stage_dir(run: str | os.PathLike, cycle: int | None, oracle: bool = False) -> Path:
    """``RUN/cycle{k}`` or ``RUN/oracle``: where a cell model and its probabilities go."""
    if oracle:
        return Path(run) / "oracle"
    if cycle not in (1, 2):
        raise ValueError(f"cycle must be 1 or 2, got {cycle}")
    return Path(run) / f"cycle{cycle}"


def outputs(run: str | os.PathLike, cycle: int | None, oracle: bool = False) -> dict[str, Path]:
    """The files stage 05 writes: ``model`` (cell_model/model.pt) and ``probs_{split}``."""
    d = stage_dir(run, cycle, oracle)
    out = {"model": d / "cell_model" / "model.pt", "probs_test": d / "cell_probs_test.parquet"}
    if not oracle:
        out["probs_train"] = d / "cell_probs_train.parquet"
    return out


def split_cache(run: Path, data_dir: Path, split: str, s: dict, workers: int) -> tuple[np.ndarray, pd.DataFrame]:
    """The crop cache of every usable image of ``split`` (``RUN/cell_cache/``), built or reused."""
    from .io import list_split
    from .labelling import usable_ids

    ids = usable_ids(run, split, list_split(data_dir, split)[0])
    return build_crop_cache(data_dir, run / "masks" / split, split, ids, int(s["crop_size"]), float(s["margin"]),
                            s["outside"], float(s["dim_factor"]), run / "cell_cache", workers)


def train_cell_stage(run: str | os.PathLike, cfg: dict, cycle: int | None = None, oracle: bool = False, *,
                     device: str = "cpu", force: bool = False, progress: bool = True) -> dict[str, Path]:
    """Stage 05: train (or resume, or reuse) a cell model and predict every train/test cell.

    Args:
        run: run directory (reads ``masks/``, ``image_model/model.pt``, ``splits.csv``,
            ``cycle{k}/pseudo_labels.parquet``; oracle: ``DATA/gt``).
        cfg: the whole resolved config (``cell_model``, ``data``, ``seed``, ``num_workers``,
            ``image_model.val_fold``).
        cycle: 1 or 2 (ignored with ``oracle``).
        oracle: train on true cell labels moved onto our cells (upper bound) -> ``RUN/oracle/``.
        device: resolved device. force: retrain and re-predict.
    Returns:
        the paths written (see :func:`outputs`); test probabilities are skipped (absent from the
        dict) when ``RUN/masks/test`` does not exist.
    """
    from .config import ConfigError
    from .data import FieldDataset
    from .train import barrier, fit, init_distributed, is_main_process, load_model

    s = dict(cfg["cell_model"])
    unknown = sorted(set(s) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"unknown cell_model setting(s) {unknown}; valid: {list(SETTINGS)}")
    run, data_dir = Path(run), Path(cfg["data"])
    seed, workers = int(cfg["seed"]), int(cfg["num_workers"])
    out = outputs(run, cycle, oracle)
    model_dir = out["model"].parent
    has_test = (run / "masks" / "test").is_dir()
    init_distributed(device)

    if is_main_process():  # rank 0 builds the caches while the others wait
        split_cache(run, data_dir, "train", s, workers)
    barrier()
    crops, index = split_cache(run, data_dir, "train", s, 0)
    if oracle:
        labels = oracle_cell_labels(data_dir, run / "masks" / "train", list(dict.fromkeys(index["ID"])))
    else:
        labels = read_pseudo_labels(stage_dir(run, cycle) / "pseudo_labels.parquet")
    rows, targets, weights = attach_targets(index, labels)
    val_ids = read_val_ids(run, int(cfg["image_model"]["val_fold"]))
    is_val = index["ID"].to_numpy()[rows].astype(str)
    is_val = np.isin(is_val, list(val_ids))
    tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if len(tr) == 0:
        raise InputError(f"no labelled cells in the training images ({len(labels)} labels, {len(va)} in validation)")
    log.info("%s: %d labelled cells (%d train, %d validation images' cells) of %d cached; classes %s",
             model_dir, len(rows), len(tr), len(va), len(index),
             np.bincount(targets.argmax(1), minlength=NUM_CLASSES).tolist())

    image_model, image_meta = load_model(run / "image_model" / "model.pt")
    if image_meta.get("mean") is None:
        raise InputError(f"{run / 'image_model' / 'model.pt'} has no normalisation mean/std in its meta")
    model = cell_model_from_image_model(image_model, int(s["crop_size"]), s.get("dropout"), s.get("output_stride"),
                                        s.get("bn_momentum"), seed, s.get("drop_connect"))
    del image_model
    if not oracle and cycle == 2 and s.get("cycle2_init", "image") == "cycle1":
        prev = stage_dir(run, 1) / "cell_model" / "model.pt"
        if not prev.is_file():
            raise InputError(f"{prev} not found: cell_model.cycle2_init=cycle1 needs the cycle-1 cell model (stage 05 --cycle 1)")
        prev_model, _ = load_model(prev)
        model.load_state_dict(prev_model.state_dict(), strict=True)
        log.info("cycle 2 starts from the cycle-1 cell model %s", prev)
        del prev_model
    elif s.get("cycle2_init", "image") not in ("image", "cycle1"):
        raise ConfigError(f"cell_model.cycle2_init must be 'image' or 'cycle1', got {s.get('cycle2_init')!r}")
    from .augment import BatchAugment

    npy = run / "cell_cache" / f"train_{int(s['crop_size'])}.npy"
    power = float(s["balance_power"])
    sample_weights = balanced_sample_weights(targets[tr], weights[tr], power)
    val_rows = rows[va]
    fit(model, FieldDataset(npy, rows[tr], targets[tr]),
        FieldDataset(npy, val_rows, targets[va]) if len(va) else None, model_dir,
        task="multiclass", loss="ce", epochs=int(s["epochs"]), batch_size=int(s["batch_size"]), lr=float(s["lr"]),
        weight_decay=float(s["weight_decay"]), warmup_epochs=float(s["warmup_epochs"]),
        label_smoothing=float(s["label_smoothing"]), sample_weights=sample_weights,
        samples_per_epoch=s.get("samples_per_epoch"), mean=image_meta["mean"], std=image_meta["std"],
        augment=BatchAugment(flips=True, rot90=True, intensity=float(s["aug_intensity"])), amp=s["amp"],
        channels_last=bool(s["channels_last"]), accumulate=int(s["accumulate"]), grad_clip=s.get("grad_clip"),
        num_workers=int(s["loader_workers"]), seed=seed, device=device, force=force, progress=progress,
        val_index=index.iloc[val_rows][["ID", "cell_id"]].reset_index(drop=True) if len(va) else None,
        extra_meta={"cell_model": True, "cycle": None if oracle else cycle, "oracle": oracle,
                    "crop_size": int(s["crop_size"]), "margin": float(s["margin"]), "outside": s["outside"],
                    "dim_factor": float(s["dim_factor"]), "image_model": str(run / "image_model" / "model.pt"),
                    "n_train": int(len(tr)), "n_val": int(len(va)), "seed": seed})
    if len(va) == 0:
        log.warning("no labelled cells in the validation images: %s has no validation metrics", model_dir)
    written = {"model": out["model"]}
    if is_main_process():
        model, meta = load_model(out["model"], device)
        splits = (["train"] if not oracle else []) + (["test"] if has_test else [])
        if not has_test:
            log.info("%s does not exist: no test-cell probabilities (run stage 03 on the test split)",
                     run / "masks" / "test")
        for split in splits:
            path = out[f"probs_{split}"]
            if path.is_file() and not force and path.stat().st_mtime >= out["model"].stat().st_mtime:
                log.info("%s is up to date; skipping (force retrains and re-predicts)", path)
            else:
                crops, index = split_cache(run, data_dir, split, s, workers) if split == "test" else (crops, index)
                probs = predict_cells(model, meta, crops, index, int(s["predict_batch_size"]), device,
                                      bool(s["tta_flip"]), s["amp"])
                write_parquet(path, probs)
                log.info("wrote %s (%d cells of %d images)", path, len(probs), probs["ID"].nunique())
            written[f"probs_{split}"] = path
    barrier()
    return written
