"""Stage 01 library: the image-level multi-label classifier, from a data folder to ``RUN/image_model/``.

:func:`train_image_model` wires :mod:`hpa.data.cache` (folds, field cache, channel statistics),
:mod:`hpa.data.augment`, :func:`hpa.models.factory.build_model` and :func:`hpa.engine.trainer.fit`:

1. ``DATA/train.csv`` and the channel files are checked before any long work;
2. multi-label stratified folds -> ``RUN/splits.csv`` (``ID,fold``), fold ``val_fold`` validates;
3. every field is decoded once into ``RUN/cache/train_{S}.npy`` (uint8 ``(N, 4, S, S)``);
4. per-channel mean/std of the training folds' cache rows;
5. :func:`hpa.engine.trainer.fit` with batch augmentation -> ``RUN/image_model/`` (``model.pt``, ``last.pt``,
   ``metrics.csv``, ``val_predictions.csv``, ``thresholds.json``, ``curves.png``).

Under torchrun, rank 0 makes the splits and the cache while the other ranks wait.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hpa.config import ConfigError
from hpa.constants import NUM_CLASSES
from hpa.data.augment import BatchAugment
from hpa.data.cache import FieldDataset, build_field_cache, cache_bad_ids, cache_path, channel_stats
from hpa.data.splits import load_or_make_splits
from hpa.engine.distributed import barrier, init_distributed
from hpa.engine.losses import init_head_bias
from hpa.engine.trainer import fit
from hpa.io.errors import InputError
from hpa.io.layout import list_split, usable_images
from hpa.models.backbones import packaged_weights
from hpa.models.factory import IMAGENET, available_models, build_model
from hpa.utils.fs import write_csv

log = logging.getLogger(__name__)

#: Keys of the ``image_model`` config section that :func:`train_image_model` understands.
SETTINGS = ("arch", "pretrained", "image_size", "train_crop", "output_stride", "epochs", "samples_per_epoch",
            "batch_size", "lr", "weight_decay", "warmup_epochs", "loss", "focal_gamma", "amp", "channels_last",
            "accumulate", "folds", "val_fold", "aug_crop_scale", "aug_intensity", "dropout", "bn_momentum",
            "zero_init_residual", "input_norm", "balance_power", "grad_clip", "val_every", "drop_connect",
            "loader_workers")


def image_model_dir(run: str | os.PathLike) -> Path:
    """``RUN/image_model``: where stage 01 writes and later stages read ``model.pt``."""
    return Path(run) / "image_model"


def balanced_image_weights(labels: np.ndarray, power: float) -> np.ndarray | None:
    """Sampling weight per image: ``max`` over its classes of ``count_c ** -power`` (None when power is 0).

    ``labels``: multi-hot (N, K). power 0.5 draws a class seen 4x less often about 2x more often.
    """
    if power <= 0:
        return None
    counts = np.maximum(labels.sum(0), 1).astype(np.float64)
    w = (labels * counts[None, :] ** -float(power)).max(1)
    return np.where(w > 0, w, counts.min() ** -float(power))


def train_image_model(run: str | os.PathLike, data_dir: str | os.PathLike, settings: dict, *, seed: int = 0,
                      device: str = "cpu", num_workers: int = 0, on_bad_image: str = "error",
                      force: bool = False, progress: bool = True) -> list[dict]:
    """Train (or resume, or skip when finished) the image model of ``run`` on ``data_dir``'s train split.

    Args:
        run: run directory; outputs go to ``RUN/splits.csv``, ``RUN/cache/``, ``RUN/image_model/``.
        data_dir: Kaggle-layout folder with ``train.csv`` and ``train/``.
        settings: the ``image_model`` config section (keys :data:`SETTINGS`).
        seed: folds, initialisation, sampling and augmentation.
        device: ``cpu`` / ``cuda`` (``auto`` already resolved). num_workers: cache decoding
            processes and DataLoader workers. on_bad_image: ``error`` | ``skip`` (skipped images
            are listed in ``RUN/image_model/skipped.csv``). force: retrain from scratch.
    Returns:
        the per-epoch history of :func:`hpa.engine.trainer.fit`.
    """
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"unknown image_model setting(s) {unknown}; valid: {list(SETTINGS)}")
    s = dict(settings)
    if s["arch"] not in available_models():
        raise ConfigError(f"unknown model {s['arch']!r}; available models: {', '.join(available_models())}")
    pretrained = s.get("pretrained") or None
    if pretrained is not None and str(pretrained).strip().lower() == IMAGENET:
        try:  # before any long work: the package is installed and its file intact
            packaged_weights(s["arch"])
        except (ValueError, OSError, ImportError) as exc:
            raise ConfigError(f"image_model.pretrained={IMAGENET}: {exc}") from exc
    run, data_dir = Path(run), Path(data_dir)
    rank, world = init_distributed(device)
    ids, labels = list_split(data_dir, "train")
    folder = data_dir / "train"
    if not folder.is_dir():
        raise InputError(f"{data_dir}: train.csv lists {len(ids)} images but the folder {folder} does not exist")
    ids_ok, bad = usable_images(folder, ids, on_bad_image)
    size = int(s["image_size"])
    cpath = cache_path(run, "train", size)
    if rank == 0:
        load_or_make_splits(run / "splits.csv", ids, labels, int(s["folds"]), seed)
        build_field_cache(data_dir, "train", ids_ok, size, cpath,
                          workers=num_workers, on_bad_image=on_bad_image, progress=progress)
    barrier()
    folds = load_or_make_splits(run / "splits.csv", ids, labels, int(s["folds"]), seed)
    keep = np.isin(ids, ids_ok)
    ids, labels, folds = [i for i, k in zip(ids, keep) if k], labels[keep], folds[keep]
    cache = np.load(cpath, mmap_mode="r")
    bad.update(cache_bad_ids(cpath))
    rows = np.arange(len(ids))
    good = ~np.isin(ids, list(bad))
    out_dir = image_model_dir(run)
    if bad and rank == 0:
        log.warning("%d training image(s) left out (on_bad_image=skip): see %s", len(bad), out_dir / "skipped.csv")
        write_csv(out_dir / "skipped.csv", pd.DataFrame({"ID": list(bad), "reason": list(bad.values())}))
    val_fold = int(s["val_fold"])
    if not 0 <= val_fold < int(s["folds"]):
        raise ConfigError(f"val_fold must lie in 0..{int(s['folds']) - 1}, got {val_fold}")
    tr, va = rows[good & (folds != val_fold)], rows[good & (folds == val_fold)]
    if len(tr) == 0 or len(va) == 0:
        raise InputError(f"{len(tr)} training and {len(va)} validation images: need at least one of each")
    mean, std = channel_stats(cache, tr)
    log.info("%d training, %d validation images (fold %d); channel mean %s std %s", len(tr), len(va), val_fold,
             np.round(mean, 4).tolist(), np.round(std, 4).tolist())

    torch.manual_seed(seed)
    model = build_model(s["arch"], NUM_CLASSES, 4, float(s["dropout"]), pretrained, size,
                        int(s["output_stride"]), s.get("bn_momentum"),
                        zero_init_residual=bool(s.get("zero_init_residual")),  # ignored with pretrained
                        input_norm=s.get("input_norm") or "none", drop_connect=s.get("drop_connect"))
    y = labels.astype(np.float32)
    init_head_bias(model, y[tr], "multilabel")
    crop = s.get("train_crop")
    if crop is not None and not 8 <= int(crop) <= size:
        raise ConfigError(f"image_model.train_crop must lie in 8..image_size ({size}) or be null, got {crop}")
    augment = BatchAugment(flips=True, rot90=True, crop_scale=tuple(s["aug_crop_scale"]),
                           intensity=float(s["aug_intensity"]), out_size=None if crop is None else int(crop))
    return fit(model, FieldDataset(cpath, tr, y[tr]), FieldDataset(cpath, va, y[va]), out_dir,
               task="multilabel", epochs=int(s["epochs"]), batch_size=int(s["batch_size"]), lr=float(s["lr"]),
               weight_decay=float(s["weight_decay"]), warmup_epochs=float(s["warmup_epochs"]), loss=s["loss"],
               focal_gamma=float(s["focal_gamma"]),
               sample_weights=balanced_image_weights(labels[tr], float(s.get("balance_power", 0.0))),
               samples_per_epoch=None if s.get("samples_per_epoch") is None else int(s["samples_per_epoch"]),
               mean=mean, std=std, augment=augment, amp=s["amp"], channels_last=bool(s["channels_last"]),
               accumulate=int(s["accumulate"]), grad_clip=s.get("grad_clip"), seed=seed,
               num_workers=num_workers if s.get("loader_workers") is None else int(s["loader_workers"]),
               device=device, val_index=pd.DataFrame({"ID": [ids[i] for i in va]}), force=force, progress=progress,
               val_every=int(s.get("val_every") or 1),
               val_tile=None if crop is None else int(crop),
               extra_meta={"val_fold": val_fold, "folds": int(s["folds"]), "data": str(data_dir.resolve()),
                           "cache": str(cpath), "n_train": int(len(tr)), "n_val": int(len(va)), "seed": seed,
                           "pretrained": None if pretrained is None else str(pretrained),
                           "world_size": world})
