#!/usr/bin/env python
"""Cell-level mAP of the combination rules on the validation fold's training images, in both scoring modes.

The test split decides nothing: this scores the rules of :func:`hpa.cells.combine.combine` on the
cells of the image model's validation fold (``RUN/splits.csv``), which neither the image model
nor the cell models trained on (the cell models validate on them), against the synthetic
ground truth of those training images (``DATA/gt``; a diagnostic, as in stage 04's report).

    python benchmarks/combination_val.py --run runs/default

Prints the baselines without a cell model first (broadcast, the CAM score at each ``--cam-gamma``,
with ``--cam-scale`` also the CAM score of maps recomputed from the run's image model at each given
``cam.scale`` (hpa.cam.methods.image_cams; the stored maps are left alone), the isolated-cell view), then mAP per cell model (cycle 1, cycle 2) and rule (cell, product, mean, product_max),
Negative by ``max``, with the small-cell penalty as in stage 06, in the ``oid`` mode (the
competition's: chooses ``predict.combine``, the submission) and the ``strict`` mode (ranking all
cells by one class: chooses ``predict.rank_combine``). Two references from the truth: the true
image labels given to every predicted cell, and the cell model with the true image labels
(what it would score if it knew which classes each image has).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from hpa.cells.combine import aligned_cell_probs, cam_confidences, combine, quality_factor, view_confidences
from hpa.cells.table import CAM_MEAN_COLS, CAM_TOPK_COLS, IMG_COLS, VIEW_COLS, cell_cam_scores
from hpa.config import load_run_config
from hpa.constants import NUM_CLASSES
from hpa.eval.benchmark import read_ground_truth
from hpa.eval.metric import MODES, cell_images, score_images
from hpa.io.fields import read_mask

RULES = ("cell", "product", "mean", "product_max")


def recomputed_cam_scores(run: Path, cfg, data: Path, table: pd.DataFrame, groups: dict, masks: dict,
                          scale: float) -> np.ndarray:
    """The cell table's CAM columns (top-k mean, then mean; N x 38) from maps recomputed at ``scale``."""
    import json

    import torch

    from hpa.cam.maps import normalize_cams
    from hpa.cam.methods import image_cams
    from hpa.engine.amp import prepare_batch
    from hpa.engine.checkpoint import load_model
    from hpa.io.layout import list_split

    model, meta = load_model(run / "image_model" / "model.pt")
    size = int(meta["image_size"])
    cache = np.load(run / "cache" / f"train_{size}.npy", mmap_mode="r")
    row_of = {i: r for r, i in enumerate(json.loads((run / "cache" / f"train_{size}.json").read_text())["ids"])}
    mean = std = None
    if meta.get("mean") is not None and meta.get("normalize", True):
        mean, std = (torch.tensor(meta[k], dtype=torch.float32).view(1, -1, 1, 1) for k in ("mean", "std"))
    ids, labels = list_split(data, "train")
    label_of = {i: np.flatnonzero(r).tolist() for i, r in zip(ids, labels)}
    out = np.full((len(table), 2 * NUM_CLASSES), np.nan, np.float32)
    cell_ids = table["cell_id"].to_numpy()
    for image_id, rows in groups.items():
        x = prepare_batch(torch.from_numpy(np.array(cache[row_of[image_id]][None])), mean, std)
        res = image_cams(model, x, cfg.cam.method, [label_of[image_id]], tile=meta.get("tile"), scale=scale)[0]
        if not len(res.classes):
            continue
        m, t = cell_cam_scores(masks[image_id], normalize_cams(res.cams), cfg.pseudo.topk_frac, cfg.pseudo.work_size)
        cls = res.classes.tolist()
        out[np.ix_(rows, cls)] = t[cell_ids[rows] - 1]
        out[np.ix_(rows, [NUM_CLASSES + c for c in cls])] = m[cell_ids[rows] - 1]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished run (stages 01-05) on data with gt/")
    ap.add_argument("--cam-gamma", type=float, nargs="+", default=[1.0],
                    help="exponents of the CAM baseline's cell score (hpa.cells.combine.cam_confidences)")
    ap.add_argument("--cam-scale", type=float, nargs="+", default=[],
                    help="also score maps recomputed at these cam.scale values (e.g. 1 1.5 2 3)")
    args = ap.parse_args(argv)
    run = Path(args.run)
    cfg = load_run_config(run)
    data = Path(cfg.data)
    if not (data / "gt" / "cell_labels.csv").is_file():
        sys.exit(f"{data} has no gt/: nothing to score")
    folds = pd.read_csv(run / "splits.csv", dtype={"ID": str})
    val = set(folds.loc[folds["fold"] == int(cfg.image_model.val_fold), "ID"])
    table = pd.read_parquet(run / "cells" / "train.parquet")
    table = table[table["ID"].isin(val)].reset_index(drop=True)
    ids = list(dict.fromkeys(table["ID"]))
    truth = read_ground_truth(data, "train")
    gt = {i: truth[i] for i in truth if i in val}  # every validation image, those without a segmented cell too
    masks = {i: read_mask(run / "masks" / "train" / f"{i}_cellmask.png") for i in ids}
    groups, cell_ids = table.groupby("ID", sort=False).indices, table["cell_id"].to_numpy()
    img = table[IMG_COLS].to_numpy(np.float32)
    quality = quality_factor(table["rel_area"], table["touches_border"])
    image_ids = table["ID"].to_numpy()
    has = np.zeros((len(table), img.shape[1]), bool)  # the classes of each cell's image's true cells
    for i, rows in groups.items():
        for classes in gt[i][1].values():
            has[np.ix_(rows, classes)] = True
    cache: dict = {}

    def score(conf):
        pred = {i: (masks[i], cell_ids[groups[i]], conf[groups[i]]) for i in ids}
        return {m: r.map for m, r in score_images(gt, cell_images(gt, pred, cache), MODES).items()}

    print(f"{run}: {len(gt)} validation-fold images, {len(table)} cells")
    ref = score(has.astype(np.float32))
    print("true image labels on every cell: " + ", ".join(f"{m} {v:.4f}" for m, v in ref.items()))
    base = {"broadcast": combine(img, None, "image", "max", quality)}
    for g in args.cam_gamma:
        base[f"cam, gamma {g:g}"] = cam_confidences(table, cfg.pseudo.score, quality, g)
    for scale in args.cam_scale:
        tab = table.copy()
        tab[CAM_TOPK_COLS + CAM_MEAN_COLS] = recomputed_cam_scores(run, cfg, data, table, groups, masks, scale)
        base[f"cam, maps at {scale:g}x"] = cam_confidences(tab, cfg.pseudo.score, quality)
    if VIEW_COLS[0] in table.columns:
        base["cellview"] = view_confidences(table, quality)
    print(f"\n{'baselines (no cell model)':28s} " + " ".join(f"{m:>8s}" for m in MODES))
    for name, conf in base.items():
        v = score(conf)
        print(f"{name:28s} " + " ".join(f"{v[m]:8.4f}" for m in MODES))
    for cycle in ("cycle1", "cycle2"):
        path = run / cycle / "cell_probs_train.parquet"
        if not path.is_file():
            continue
        probs = aligned_cell_probs(table, pd.read_parquet(path), str(path))
        res = {rule: score(combine(img, probs, rule, "max", quality, image_ids)) for rule in RULES}
        res["cell x true image labels"] = score(np.where(has, combine(img, probs, "cell", "max", quality), 0))
        print(f"\n{cycle:28s} " + " ".join(f"{m:>8s}" for m in MODES))
        for rule, v in res.items():
            print(f"{rule:28s} " + " ".join(f"{v[m]:8.4f}" for m in MODES))
        for m in MODES:
            best = max(RULES, key=lambda r: res[r][m])
            print(f"best rule in {m} mode: {best}")


if __name__ == "__main__":
    main()
