"""Stage 05 library: the cell-level single-label classifier.

Pieces, each usable alone:

- *cell labels*: a DataFrame ``ID, cell_id, weight, t0..t18`` of soft targets (rows sum
  to 1), from stage 04's pseudo-labels (:func:`read_pseudo_labels`, hard -> one-hot) or
  from the ground truth in oracle mode (:func:`oracle_cell_labels`: true cells matched
  one-to-one at IoU >= 0.6 to OUR predicted cells; a true cell with k classes gives each
  1/k);
- :func:`attach_targets`: labels joined onto the rows of the crop cache
  (:mod:`hpa.cell_crops`); :func:`balanced_sample_weights`: class-balanced sampling
  weights ``sum_c t_c / count_c ** power`` x the label weight;
- :class:`CellCropDataset`: crops from the memmap, flips / 90-degree turns, normalised
  with the image model's per-channel mean and std;
- :func:`cell_model_from_image_model`: the image model's architecture and backbone
  weights with a fresh 19-way head;
- :func:`predict_cells`: softmax probabilities of every cached cell.
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
from .constants import IOU_THRESHOLD, NUM_CLASSES
from .io import InputError, read_mask

log = logging.getLogger(__name__)

TARGET_COLS = [f"t{c}" for c in range(NUM_CLASSES)]
PROB_COLS = [f"p{c}" for c in range(NUM_CLASSES)]


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

    Returns ``ID, cell_id, weight, t0..t18`` (one-hot targets). ``weight`` defaults to 1.
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
    return _labels_frame(df["ID"].astype(str), df["cell_id"], [[int(c)] for c in labels], weight)


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


# --------------------------------------------------------------------------- data
class CellCropDataset(torch.utils.data.Dataset):
    """Cell crops for training or prediction.

    Item ``i``: ``(x, t)`` with ``x`` float32 ``(4, s, s)`` = ``(crop / 255 - mean) / std``
    and ``t`` float32 ``(19,)`` (zeros when no targets are given). ``augment`` applies a
    random horizontal flip and a random multiple of 90 degrees (cells have no orientation).

    ``crops`` is the cache memmap or the path of its ``.npy``; a path is opened lazily in
    each worker, so DataLoader workers never copy the cache.
    """

    def __init__(self, crops: np.ndarray | str | os.PathLike, rows: np.ndarray, mean: Sequence[float],
                 std: Sequence[float], targets: np.ndarray | None = None, augment: bool = False):
        self._path = None if isinstance(crops, np.ndarray) else str(crops)
        self._crops = crops if isinstance(crops, np.ndarray) else None
        self.rows = np.asarray(rows, np.int64)
        self.mean = torch.as_tensor(np.asarray(mean, np.float32)).view(-1, 1, 1)
        self.std = torch.as_tensor(np.asarray(std, np.float32)).view(-1, 1, 1)
        if self.mean.numel() != 4 or self.std.numel() != 4 or (self.std <= 0).any():
            raise ValueError(f"mean and std must be 4 per-channel values (std > 0), got {mean} and {std}")
        self.targets = None if targets is None else torch.as_tensor(np.asarray(targets, np.float32))
        if self.targets is not None and self.targets.shape != (len(self.rows), NUM_CLASSES):
            raise ValueError(f"targets must be ({len(self.rows)}, {NUM_CLASSES}), got {tuple(self.targets.shape)}")
        self.augment = augment

    @property
    def crops(self) -> np.ndarray:
        if self._crops is None:
            self._crops = np.load(self._path, mmap_mode="r")
        return self._crops

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._path is not None:
            state["_crops"] = None
        return state

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.array(self.crops[self.rows[i]], dtype=np.float32)) / 255.0
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            k = int(torch.randint(4, ()))
            if k:
                x = torch.rot90(x, k, (-2, -1))
        x = (x - self.mean) / self.std
        t = self.targets[i] if self.targets is not None else torch.zeros(NUM_CLASSES)
        return x.contiguous(), t


# --------------------------------------------------------------------------- model
def cell_model_from_image_model(image_model: nn.Module, crop_size: int, dropout: float | None = None,
                                output_stride: int | None = None, seed: int = 0) -> nn.Module:
    """A fresh :class:`hpa.models.HPANet` with the image model's architecture and backbone weights.

    Args:
        image_model: the trained image-level HPANet (its ``arch`` and ``backbone`` are used).
        crop_size: the cell crop size (EfficientNet's static padding is built for it).
        dropout: head dropout (None: the image model's).
        output_stride: 16 or 32 (None: the image model's); the weights are the same either way.
        seed: seeds the new head's initialisation.
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
        model = build_model(arch, num_classes=NUM_CLASSES, dropout=dropout, image_size=int(crop_size),
                            output_stride=int(output_stride))
    missing = model.backbone.load_state_dict(image_model.backbone.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
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


@torch.no_grad()
def predict_cells(model: nn.Module, crops: np.ndarray | str | os.PathLike, index: pd.DataFrame,
                  mean: Sequence[float], std: Sequence[float], batch_size: int = 128, device: str = "cpu",
                  tta_flip: bool = False, num_workers: int = 0) -> pd.DataFrame:
    """Softmax probabilities of every cell of a crop cache.

    Returns ``ID, cell_id, p0..p18`` with one row per index row (same order); every row sums
    to 1. ``tta_flip`` averages the softmax over the crop and its horizontal flip.
    """
    ds = CellCropDataset(crops, index["row"].to_numpy(), mean, std)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    model = model.to(device).eval()
    out = []
    for x, _ in loader:
        x = x.to(device)
        p = torch.softmax(model(x).float(), 1)
        if tta_flip:
            p = 0.5 * (p + torch.softmax(model(x.flip(-1)).float(), 1))
        out.append(p.cpu().numpy())
    probs = np.concatenate(out) if out else np.zeros((0, NUM_CLASSES), np.float32)
    df = index[["ID", "cell_id"]].reset_index(drop=True).copy()
    df[PROB_COLS] = probs.astype(np.float32)
    return df
