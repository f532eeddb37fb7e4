"""Scoring methods side by side on the test split: cell-level mAP per method with bootstrap
resamples of the test images, paired step gains, segmentation match rate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hpa.constants import NUM_CLASSES
from hpa.eval.matching import match_cells
from hpa.io.fields import read_mask


def per_image(table: pd.DataFrame, conf: np.ndarray, masks_dir: Path):
    """Yield ``(ID, mask, cell_ids, conf)`` per image of ``table`` (rows grouped by image)."""
    for image_id, idx in table.groupby("ID", sort=False).indices.items():
        mask = read_mask(masks_dir / f"{image_id}_cellmask.png")
        yield image_id, mask, table["cell_id"].to_numpy()[idx], conf[idx]


def read_ground_truth(data_dir: Path, split: str = "test") -> dict:
    """``{ID: (true mask int (H, W), {cell_id: [classes]})}`` of every ground-truth image of a split,
    images without any true cell included (:func:`hpa.eval.score.load_ground_truth`)."""
    from hpa.eval.score import load_ground_truth

    return {i: (read_mask(path), labels) for i, (path, labels) in load_ground_truth(data_dir, split).items()}


def true_cells_per_class(gt: dict) -> dict:
    """``{"cells": [...], "images": [...]}`` (19 each): true test cells and images showing each class.

    A class's AP rests on its true cells: with one or two (a rare class in a small test split),
    one cell's rank moves the mAP by up to 1/19 = 0.053, so the report flags such classes.
    """
    cells = np.zeros(NUM_CLASSES, np.int64)
    images = np.zeros(NUM_CLASSES, np.int64)
    for _, labels in gt.values():
        shown = np.zeros(NUM_CLASSES, bool)
        for classes in labels.values():
            for c in classes:
                cells[c] += 1
                shown[c] = True
        images += shown
    return {"cells": cells.tolist(), "images": images.tolist()}


def score_methods(run: Path, data_dir: Path, table: pd.DataFrame, confs: dict[str, np.ndarray],
                  mode: str | tuple[str, ...] = "oid", n_boot: int = 0, seed: int = 0, gt: dict | None = None) -> dict:
    """Cell-level mAP of each method's confidences on the test split against ``DATA/gt``.

    Returns ``{method: {"mAP", "ap_per_class"}}`` for one ``mode``, ``{mode: {method: ...}}``
    for a tuple of modes. With ``n_boot`` > 0 each entry also holds ``"bootstrap"``: its mAP
    on ``n_boot`` resamples of the test images, the same resamples for every method and mode
    (:func:`hpa.eval.metric.bootstrap_maps`), for confidence intervals and paired differences
    (:func:`step_gains`). Every method shares one IoU matrix per image. ``gt``: the test
    ground truth when already read (:func:`read_ground_truth`); every test image with a true
    mask counts, those without a predicted cell (none found, or skipped) as missed.
    """
    from hpa.eval.metric import bootstrap_maps, cell_images, score_images

    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    gt = read_ground_truth(data_dir, "test") if gt is None else gt
    masks_dir = run / "masks" / "test"
    ids = list(dict.fromkeys(table["ID"]))
    pred_masks = {i: read_mask(masks_dir / f"{i}_cellmask.png") for i in ids}
    groups = table.groupby("ID", sort=False).indices
    cell_ids = table["cell_id"].to_numpy()
    cache: dict = {}
    images = {name: cell_images(gt, {i: (pred_masks[i], cell_ids[groups[i]], conf[groups[i]]) for i in ids}, cache)
              for name, conf in confs.items()}
    out: dict = {m: {} for m in modes}
    for name, ims in images.items():
        for m, res in score_images(gt, ims, modes).items():
            out[m][name] = {"mAP": float(res.map),
                            "ap_per_class": [None if np.isnan(a) else float(a) for a in res.ap_per_class]}
    if n_boot > 0:
        for m, maps in bootstrap_maps(gt, images, n_boot, seed, modes).items():
            for name, b in maps.items():
                out[m][name]["bootstrap"] = b.tolist()
    return out[mode] if isinstance(mode, str) else out


#: The steps the report tests: the issue's chain, and the cell model against its own evidence.
STEPS = (("broadcast", "cam"), ("cam", "cycle1"), ("cycle1", "cycle2"), ("cycle2", "oracle"), ("cellview", "cycle1"))


def step_gains(methods: dict, pairs=STEPS) -> list[dict]:
    """Paired bootstrap gain of method ``b`` over ``a`` for each pair whose rows have ``bootstrap``.

    Returns ``[{"from", "to", "gain", "ci95": [lo, hi], "p_better"}, ...]``: the mAP
    difference on the full test split, the 2.5 and 97.5 percentiles of the differences over
    the resamples, and the share of resamples in which ``b`` scored higher.
    """
    steps = []
    for a, b in pairs:
        if "bootstrap" not in methods.get(a, {}) or "bootstrap" not in methods.get(b, {}):
            continue
        d = np.asarray(methods[b]["bootstrap"]) - np.asarray(methods[a]["bootstrap"])
        steps.append({"from": a, "to": b, "gain": methods[b]["mAP"] - methods[a]["mAP"],
                      "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
                      "p_better": float((d > 0).mean())})
    return steps


def segmentation_quality(run: Path, data_dir: Path, gt: dict | None = None) -> dict:
    """Share of true test cells matched at IoU >= 0.6 and of predicted cells left unmatched.

    Over every ground-truth test image (``gt`` as :func:`read_ground_truth`, read when None):
    an image without a predicted mask (skipped by stage 03) or without any predicted cell
    counts its true cells as missed.
    """
    gt = read_ground_truth(data_dir, "test") if gt is None else gt
    n_true = n_pred = n_match = n_absent = 0
    for i, (true_mask, _) in gt.items():
        path = run / "masks" / "test" / f"{i}_cellmask.png"
        if path.is_file():
            res = match_cells(read_mask(path), true_mask)
            n_true, n_pred, n_match = n_true + res.n_true, n_pred + res.n_pred, n_match + res.n_matched
        else:
            n_true, n_absent = n_true + len(np.setdiff1d(np.unique(true_mask), [0])), n_absent + 1
    return {"images": len(gt), "images_without_mask": n_absent, "true_cells": n_true, "predicted_cells": n_pred,
            "matched": n_match, "recall": n_match / max(n_true, 1), "unmatched_predicted": 1 - n_match / max(n_pred, 1)}
