"""Stage 04 orchestration: the train cell table, pseudo-labels of a cycle, their report."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from . import gt as gtmod
from .cells import build_cell_table
from .constants import NEGATIVE, NUM_CLASSES
from .fsutil import write_json, write_parquet
from .io import InputError, list_split, read_mask
from .pseudo import assign_labels, cam_evidence, coverage, diagnostics

log = logging.getLogger(__name__)

PROB_COLS = [f"p{c}" for c in range(NUM_CLASSES)]


def cell_table(run: Path, data_dir: Path, split: str, topk_frac: float, work_size: int, force: bool = False) -> pd.DataFrame:
    """``RUN/cells/{split}.parquet``, built from masks and CAMs when missing (or ``force``)."""
    path = run / "cells" / f"{split}.parquet"
    if path.is_file() and not force:
        return pd.read_parquet(path)
    ids, _ = list_split(data_dir, split)
    ids = usable_ids(run, split, ids)
    table = build_cell_table(ids, run / "masks" / split, run / "cams" / split, topk_frac, work_size)
    write_parquet(path, table)
    log.info("cell table %s: %d cells in %d images -> %s", split, len(table), len(ids), path)
    return table


def usable_ids(run: Path, split: str, ids: list[str]) -> list[str]:
    """IDs minus images an earlier stage recorded as skipped (``skipped.csv`` of masks or cams)."""
    skipped = set()
    for p in (run / "masks" / split / "skipped.csv", run / "cams" / split / "skipped.csv"):
        if p.is_file():
            skipped |= set(pd.read_csv(p, dtype={"ID": str})["ID"])
    if skipped:
        log.warning("%d %s image(s) skipped by earlier stages are left out (see skipped.csv)", len(skipped), split)
    return [i for i in ids if i not in skipped]


def load_cell_probs(path: Path, table: pd.DataFrame) -> np.ndarray:
    """Cell-model probabilities (N, 19) aligned to ``table``'s (ID, cell_id) rows."""
    if not path.is_file():
        raise InputError(f"{path} not found: train the previous cycle's cell model first (stage 05)")
    probs = pd.read_parquet(path)
    merged = table[["ID", "cell_id"]].merge(probs, on=["ID", "cell_id"], how="left", validate="one_to_one")
    if merged[PROB_COLS].isna().any().any():
        n = int(merged[PROB_COLS[0]].isna().sum())
        raise InputError(f"{path}: no probabilities for {n} cells of the cell table (masks changed since?)")
    return merged[PROB_COLS].to_numpy(np.float32)


def make_pseudo_labels(run: str | Path, data_dir: str | Path, cycle: int, p: dict, force: bool = False) -> pd.DataFrame:
    """Write ``RUN/cycle{k}/pseudo_labels.parquet`` and ``pseudo_report.json``; return the labels.

    ``p`` is the ``pseudo`` config section (see hpa.config.DEFAULTS).
    """
    run, data_dir = Path(run), Path(data_dir)
    table = cell_table(run, data_dir, "train", p["topk_frac"], p.get("work_size", 512), force=force)
    ids, y = list_split(data_dir, "train")
    label_of = dict(zip(ids, y))
    img_labels = np.stack([label_of[i] for i in table["ID"]]) if len(table) else np.zeros((0, NUM_CLASSES))
    ev = cam_evidence(table, img_labels, p["score"], p["times_image_prob"])
    negative_image = (img_labels[:, NEGATIVE] == 1) & (img_labels[:, :NEGATIVE].sum(1) == 0)
    probs = load_cell_probs(run / f"cycle{cycle - 1}" / "cell_probs_train.parquet", table) if cycle > 1 else None
    label, conf, thr = assign_labels(ev, negative_image, p["pos_quantile"], p["pos_min"], p["neg_threshold"],
                                     probs, p["cycle2_weight"])
    out = table[["ID", "cell_id"]].copy()
    out["label"], out["confidence"], out["weight"] = label, conf, 1.0
    out = out[out["label"] >= 0].reset_index(drop=True)
    report = {"cycle": cycle, "thresholds": thr.tolist(), "coverage": coverage(label)}
    if gtmod.has_gt(data_dir):
        report["vs_ground_truth"] = diagnostics(label, true_label_sets(run, data_dir, table))
        log.info("cycle %d pseudo-labels: %.1f%% of cells labelled, precision %.3f against ground truth", cycle,
                 100 * report["coverage"]["labelled"], report["vs_ground_truth"]["overall_precision"])
    cdir = run / f"cycle{cycle}"
    write_parquet(cdir / "pseudo_labels.parquet", out)
    write_json(cdir / "pseudo_report.json", report)
    return out


def true_label_sets(run: Path, data_dir: Path, table: pd.DataFrame, split: str = "train") -> list[list[int] | None]:
    """True classes of each row of ``table`` (None for cells without a true partner). Diagnostic only."""
    labels = gtmod.read_cell_labels(data_dir, split)
    truth: dict[tuple[str, int], list[int]] = {}
    for image_id in table["ID"].unique():
        pred = read_mask(run / "masks" / split / f"{image_id}_cellmask.png")
        transfer = gtmod.transfer_labels(pred, gtmod.read_gt_mask(data_dir, image_id), labels.get(image_id, {}))
        truth.update({(image_id, c): t for c, t in transfer.items()})
    return [truth.get((i, int(c))) for i, c in zip(table["ID"], table["cell_id"])]
