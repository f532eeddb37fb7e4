#!/usr/bin/env python
"""Cell-level mAP of the combination rules on the validation fold's training images.

The test split decides nothing: this scores the rules of :func:`hpa.cells.combine.combine` on the
cells of the image model's validation fold (``RUN/splits.csv``), which neither the image model
nor the cell models trained on (the cell models validate on them), against the synthetic
ground truth of those training images (``DATA/gt``; a diagnostic, as in stage 04's report).

    python benchmarks/combination_val.py --run runs/default

Prints mAP per cell model (cycle 1, cycle 2) and rule (cell, product, mean), Negative by
``max``, with the small-cell penalty as in stage 06.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from hpa.cells.combine import aligned_cell_probs, combine, quality_factor
from hpa.cells.table import IMG_COLS
from hpa.config import load_run_config
from hpa.eval import gt as gtmod
from hpa.eval.metric import cell_images, score_images
from hpa.io.fields import read_mask


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished run (stages 01-05) on data with gt/")
    args = ap.parse_args(argv)
    run = Path(args.run)
    cfg = load_run_config(run)
    data = Path(cfg.data)
    if not gtmod.has_gt(data):
        sys.exit(f"{data} has no gt/: nothing to score")
    folds = pd.read_csv(run / "splits.csv", dtype={"ID": str})
    val = set(folds.loc[folds["fold"] == int(cfg.image_model.val_fold), "ID"])
    table = pd.read_parquet(run / "cells" / "train.parquet")
    table = table[table["ID"].isin(val)].reset_index(drop=True)
    labels = gtmod.read_cell_labels(data, "train")
    ids = list(dict.fromkeys(table["ID"]))
    gt = {i: (gtmod.read_gt_mask(data, i), labels[i]) for i in ids}
    masks = {i: read_mask(run / "masks" / "train" / f"{i}_cellmask.png") for i in ids}
    groups, cell_ids = table.groupby("ID", sort=False).indices, table["cell_id"].to_numpy()
    img = table[IMG_COLS].to_numpy(np.float32)
    quality = quality_factor(table["rel_area"], table["touches_border"])
    cache: dict = {}
    print(f"{run}: {len(ids)} validation-fold images, {len(table)} cells")
    print(f"{'cell model':10s} " + " ".join(f"{r:>8s}" for r in ("cell", "product", "mean")))
    for cycle in ("cycle1", "cycle2"):
        path = run / cycle / "cell_probs_train.parquet"
        if not path.is_file():
            continue
        probs = aligned_cell_probs(table, pd.read_parquet(path), str(path))
        maps = []
        for rule in ("cell", "product", "mean"):
            conf = combine(img, probs, rule, "max", quality)
            pred = {i: (masks[i], cell_ids[groups[i]], conf[groups[i]]) for i in ids}
            maps.append(score_images(gt, cell_images(gt, pred, cache)).map)
        print(f"{cycle:10s} " + " ".join(f"{m:8.4f}" for m in maps))


if __name__ == "__main__":
    main()
