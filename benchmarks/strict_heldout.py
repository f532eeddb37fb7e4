#!/usr/bin/env python
"""Both scoring modes on fresh held-out fields: what holds the strict mode down, and which rule ranks cells best.

The ``strict`` mode counts a prediction of a class that none of the image's true cells has as a
false positive: it measures confidences that can rank all cells of a data set by one class. This
benchmark draws fresh synthetic fields (as ``benchmarks/cell_heldout.py``, whose work folder it
shares and reuses), predicts them with the run's cell models and scores, in both modes:

- the combination rules of :func:`hpa.cells.combine.combine` (``cell``, ``product``,
  ``product_max``) for each cell model, and the image probabilities broadcast to every cell;
- references from the truth: the true image labels (the classes of the image's true cells) on
  every true cell (the true masks as predictions) and on every predicted cell, and each cell model
  restricted to the true image labels (what it scores in strict mode when it knows which
  classes each image has: the strict loss of a rule is then all in the image-level decision);
- per class, the strict loss of the submitted rule and of the ranking rule.

    python benchmarks/strict_heldout.py --run runs/default [--n 300] [--seed 7] [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from cell_heldout import open_heldout, parse_models

from hpa.cells.combine import aligned_cell_probs, combine, quality_factor
from hpa.cells.table import IMG_COLS
from hpa.constants import CLASS_NAMES, NUM_CLASSES
from hpa.engine.checkpoint import load_model
from hpa.eval.benchmark import read_ground_truth, score_methods
from hpa.eval.metric import MODES, cell_map
from hpa.pipeline.cell_model import predict_cells


def true_labels_on_true_cells(gt: dict, modes=MODES) -> dict:
    """mAP per mode of the true image labels given (confidence 1) to every true cell, on the true masks."""
    pred = {}
    for i, (mask, labels) in gt.items():
        ids = sorted(labels)
        conf = np.full((len(ids), NUM_CLASSES), np.nan)
        conf[:, sorted({c for cl in labels.values() for c in cl})] = 1.0
        pred[i] = (mask, ids, conf)
    return {m: cell_map(gt, pred, mode=m).map for m in modes}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished run (stages 01-05) on synthetic data")
    ap.add_argument("--n", type=int, default=300, help="held-out fields to generate")
    ap.add_argument("--seed", type=int, default=7, help="generator seed (not the run's own)")
    ap.add_argument("--work", default=None, help="work folder (default RUN/heldout_seed{seed}; shared with cell_heldout.py)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    run = Path(args.run)
    models = {k: v for k, v in parse_models(run, None).items() if k != "oracle"}
    if not models:
        sys.exit(f"{run} has no cell models yet (stage 05)")
    h = open_heldout(run, args.n, args.seed, args.workers, args.work)
    data, wrun, cfg, table, crops, index = h.data, h.wrun, h.cfg, h.table, h.crops, h.index
    p = cfg.predict
    gt = read_ground_truth(data, "test")
    print(f"{run}: held-out set of {len(gt)} fields, {len(table)} cells (seed {args.seed}; prepared in "
          f"{h.seconds:.0f} s); negative {p.negative}, small-cell penalty {p.small_cell_penalty}")

    img = table[IMG_COLS].to_numpy(np.float32)
    quality = quality_factor(table["rel_area"], table["touches_border"]) if p.small_cell_penalty else None
    image_ids = table["ID"].to_numpy()
    groups = table.groupby("ID", sort=False).indices
    has = np.zeros((len(table), NUM_CLASSES), bool)  # the classes of each cell's image's true cells
    for i, rows in groups.items():
        for classes in gt[i][1].values():
            has[np.ix_(rows, classes)] = True
    confs = {"broadcast": combine(img, None, "image", "max", quality),
             "true image labels": has.astype(np.float32)}
    for name, path in models.items():
        model, meta = load_model(path)
        probs = aligned_cell_probs(table, predict_cells(model, meta, crops, index, cfg.cell_model.predict_batch_size),
                                   str(path))
        for rule in ("cell", "product", "product_max"):
            confs[f"{name} {rule}"] = combine(img, probs, rule, p.negative, quality, image_ids)
        confs[f"{name} x true image labels"] = np.where(has, combine(img, probs, "cell", p.negative, quality), 0)
    res = score_methods(wrun, data, table, confs, MODES, gt=gt)
    ref = true_labels_on_true_cells(gt)
    print(f"\n{'confidences':34s} " + " ".join(f"{m:>8s}" for m in MODES))
    print(f"{'true image labels on true cells':34s} " + " ".join(f"{ref[m]:8.4f}" for m in MODES))
    for name in confs:
        print(f"{name:34s} " + " ".join(f"{res[m][name]['mAP']:8.4f}" for m in MODES))

    last = list(models)[-1]
    cols = [f"{last} {p.combine}", f"{last} {p.rank_combine}", f"{last} x true image labels"]
    cols = list(dict.fromkeys(c for c in cols if c in confs))
    print(f"\nAP per class, oid / strict ({', '.join(cols)})")
    for c, cname in enumerate(CLASS_NAMES):
        vals = [(res["oid"][k]["ap_per_class"][c], res["strict"][k]["ap_per_class"][c]) for k in cols]
        if vals[0][0] is None:
            continue
        print(f"{c:2d} {cname[:30]:30s} " + "   ".join(f"{a:.3f} / {b:.3f}" for a, b in vals))


if __name__ == "__main__":
    main()
