"""Image folds: multi-label iterative stratification (Sechidis et al. 2011, package
``iterative-stratification``) so that every fold sees the rare classes; ``RUN/splits.csv``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from hpa.io.errors import InputError
from hpa.utils.fs import write_csv

log = logging.getLogger(__name__)


def make_folds(labels: np.ndarray, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Multi-label stratified fold of every image.

    Args:
        labels: multi-hot ``(N, C)`` (0/1) image labels.
        n_folds: number of folds, 2 <= n_folds <= N.
        seed: shuffling seed (same labels + seed -> same folds).
    Returns:
        int64 ``(N,)`` fold index in ``0..n_folds-1``; fold sizes differ by at most one or two
        images and each class is spread over the folds as evenly as its count allows.
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a (N, C) multi-hot array, got shape {labels.shape}")
    n = len(labels)
    if not 2 <= n_folds <= n:
        raise ValueError(f"need 2 <= folds <= number of images ({n}), got folds={n_folds}")
    folds = np.full(n, -1, np.int64)
    skf = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val_idx) in enumerate(skf.split(np.zeros(n), labels)):
        folds[val_idx] = k
    assert (folds >= 0).all()
    return folds


def load_or_make_splits(path: str | os.PathLike, ids: Sequence[str], labels: np.ndarray, n_folds: int,
                        seed: int) -> np.ndarray:
    """Folds of ``ids`` from ``path`` (``ID,fold`` CSV), made and written there if absent.

    An existing file is reused only when it lists exactly ``ids`` with ``n_folds`` folds;
    otherwise it is an error (a run's validation images must not change under it).
    Returns int64 ``(N,)`` folds in the order of ``ids``.
    """
    path = Path(path)
    ids = list(ids)
    if path.is_file():
        df = pd.read_csv(path, dtype={"ID": str})
        if not {"ID", "fold"} <= set(df.columns):
            raise InputError(f"{path}: expected columns ID, fold; found {list(df.columns)}")
        by_id = dict(zip(df["ID"], df["fold"].astype(int)))
        if set(by_id) != set(ids) or df["fold"].nunique() != n_folds:
            raise InputError(f"{path} was made for other images or another fold count ({len(by_id)} IDs, "
                             f"{df['fold'].nunique()} folds; now {len(ids)} IDs, {n_folds} folds): "
                             "use a new run folder, or delete the file to re-split")
        return np.array([by_id[i] for i in ids], np.int64)
    folds = make_folds(labels, n_folds, seed)
    write_csv(path, pd.DataFrame({"ID": ids, "fold": folds}))
    log.info("wrote %s (%d images, %d folds)", path, len(ids), n_folds)
    return folds
