"""Stage 01 library: the image-level multi-label classifier, from a data folder to ``RUN/image_model/``.

:func:`train_image_model` wires :mod:`hpa.data.cache` (folds, field cache, channel statistics),
:mod:`hpa.data.augment`, :func:`hpa.models.factory.build_model` and :func:`hpa.engine.trainer.fit`:

1. ``DATA/train.csv`` and the channel files are checked before any long work;
2. multi-label stratified folds -> ``RUN/splits.csv`` (``ID,fold``), fold ``val_fold`` validates;
3. the working resolution from the cells' size (:mod:`hpa.pipeline.image_scale`: cache side ``S``,
   training crop) -> ``RUN/image_model/scale.json``;
4. every field is decoded once into ``RUN/cache/train_{S}.npy`` (uint8 ``(N, 4, S, S)``);
5. per-channel mean/std of the training folds' cache rows;
6. :func:`hpa.engine.trainer.fit` with batch augmentation -> ``RUN/image_model/`` (``model.pt``, ``last.pt``,
   ``metrics.csv``, ``val_predictions.csv``, ``thresholds.json``, ``curves.png``).

Under torchrun, rank 0 makes the splits, the resolution and the cache while the other ranks wait
(:func:`hpa.engine.distributed.main_first`: no barrier timeout, however long the cache takes).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hpa.config import ClassicalSegmenterSettings, ConfigError, ImageModelSettings
from hpa.constants import NUM_CLASSES
from hpa.data.augment import BatchAugment
from hpa.data.cache import FieldDataset, build_field_cache, cache_bad_ids, cache_path, channel_stats
from hpa.data.splits import load_or_make_splits
from hpa.engine.distributed import init_distributed, main_first
from hpa.engine.losses import init_head_bias
from hpa.engine.trainer import TrainSettings, fit
from hpa.io.errors import InputError
from hpa.io.layout import list_split, usable_images
from hpa.models.backbones import packaged_weights
from hpa.models.factory import IMAGENET, build_model
from hpa.pipeline.image_scale import load_scale, run_scale
from hpa.utils.fs import write_csv

log = logging.getLogger(__name__)

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


def train_image_model(run: str | os.PathLike, data_dir: str | os.PathLike, s: ImageModelSettings, *, seed: int = 0,
                      device: str = "cpu", num_workers: int = 0, on_bad_image: str = "error",
                      force: bool = False, progress: bool = True, cell_diameter: float | None = None,
                      classical: ClassicalSegmenterSettings | None = None) -> list[dict]:
    """Train (or resume, or skip when finished) the image model of ``run`` on ``data_dir``'s train split.

    Args:
        run: run directory; outputs go to ``RUN/splits.csv``, ``RUN/cache/``, ``RUN/image_model/``.
        data_dir: Kaggle-layout folder with ``train.csv`` and ``train/``.
        s: the ``image_model`` settings section.
        seed: folds, initialisation, sampling and augmentation.
        device: ``cpu`` / ``cuda`` (``auto`` already resolved). num_workers: cache decoding
            processes and DataLoader workers (unless ``s.loader_workers``). on_bad_image: ``error`` |
            ``skip`` (skipped images are listed in ``RUN/image_model/skipped.csv``). force: retrain.
        cell_diameter: the setting ``cell_diameter`` (field pixels; None: measured).
        classical: the ``segment.classical`` settings, to measure the cells on a sample of fields
            when stage 03 has not segmented the train split (:func:`hpa.pipeline.image_scale.resolve_scale`).
    Returns:
        the per-epoch history of :func:`hpa.engine.trainer.fit`.
    """
    pretrained = s.pretrained or None
    if pretrained is not None and str(pretrained).strip().lower() == IMAGENET:
        try:  # before any long work: the package is installed and its file intact
            packaged_weights(s.arch)
        except (ValueError, OSError, ImportError) as exc:
            raise ConfigError(f"image_model.pretrained={IMAGENET}: {exc}") from exc
    run, data_dir = Path(run), Path(data_dir)
    rank, world = init_distributed(device)
    ids, labels = list_split(data_dir, "train")
    folder = data_dir / "train"
    if not folder.is_dir():
        raise InputError(f"{data_dir}: train.csv lists {len(ids)} images but the folder {folder} does not exist")
    ids_ok, bad = usable_images(folder, ids, on_bad_image)

    def prepare():
        load_or_make_splits(run / "splits.csv", ids, labels, s.folds, seed)
        scale = run_scale(run, s, folder, ids_ok, cell_diameter=cell_diameter, classical=classical,
                          workers=num_workers, force=force)
        build_field_cache(data_dir, "train", ids_ok, scale.image_size, cache_path(run, "train", scale.image_size),
                          workers=num_workers, on_bad_image=on_bad_image, progress=progress)

    main_first(prepare)
    scale = load_scale(run)
    size, crop = scale.image_size, scale.train_crop
    cpath = cache_path(run, "train", size)
    folds = load_or_make_splits(run / "splits.csv", ids, labels, s.folds, seed)
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
    tr, va = rows[good & (folds != s.val_fold)], rows[good & (folds == s.val_fold)]
    if len(tr) == 0 or len(va) == 0:
        raise InputError(f"{len(tr)} training and {len(va)} validation images: need at least one of each")
    mean, std = channel_stats(cache, tr)
    log.info("%d training, %d validation images (fold %d); channel mean %s std %s", len(tr), len(va), s.val_fold,
             np.round(mean, 4).tolist(), np.round(std, 4).tolist())

    torch.manual_seed(seed)
    model = build_model(s.arch, NUM_CLASSES, 4, s.dropout, pretrained, size, s.output_stride, s.bn_momentum,
                        zero_init_residual=s.zero_init_residual,  # ignored with pretrained weights
                        input_norm=s.input_norm, drop_connect=s.drop_connect)
    y = labels.astype(np.float32)
    init_head_bias(model, y[tr], "multilabel")
    if crop is not None and crop > size:
        raise ConfigError(f"image_model.train_crop ({s.train_crop}, {crop} px at the cache side {size}) must be at most "
                          f"the cache side or null")
    augment = BatchAugment(flips=True, rot90=True, crop_scale=tuple(s.aug_crop_scale), intensity=s.aug_intensity,
                           out_size=crop)
    train = TrainSettings.of(s, task="multilabel", seed=seed,
                             num_workers=num_workers if s.loader_workers is None else s.loader_workers)
    return fit(model, FieldDataset(cpath, tr, y[tr]), FieldDataset(cpath, va, y[va]), out_dir, train, device=device,
               sample_weights=balanced_image_weights(labels[tr], s.balance_power), mean=mean, std=std,
               augment=augment, val_index=pd.DataFrame({"ID": [ids[i] for i in va]}), val_tile=crop,
               extra_meta={"val_fold": s.val_fold, "folds": s.folds, "data": str(data_dir.resolve()),
                           "cache": str(cpath), "n_train": int(len(tr)), "n_val": int(len(va)), "seed": seed,
                           "pretrained": None if pretrained is None else str(pretrained),
                           "world_size": world, "scale": scale.to_dict()},
               force=force, progress=progress)
