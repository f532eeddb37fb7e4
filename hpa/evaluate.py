"""Stage 06/07 library: per-cell confidences of every method, the submission, and the
evaluation report with baselines.

Methods scored side by side on the test split (all on the same predicted masks):

1. ``broadcast``: the image model's probabilities given to every cell (no CAM, no cell model);
2. ``cam``: cell CAM score x image probability (:func:`hpa.predict.cam_confidences`);
   ``cellview``: the image model's probability for the cell alone x image probability
   (:func:`hpa.predict.view_confidences`; when the cell table has ``view_p*`` columns);
3. ``cycle1`` / 4. ``cycle2``: the cell model of that cycle combined with the image model
   by :func:`hpa.predict.combine` with the run's ``predict`` settings;
5. ``oracle``: the same cell classifier and budget trained on the true cell labels (upper bound).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from . import gt as gtmod
from .constants import CLASS_NAMES, NUM_CLASSES
from .io import read_mask
from .matching import match_cells
from .predict import PROB_COLS, aligned_cell_probs, cam_confidences, combine, quality_factor, view_confidences
from .cells import IMG_COLS, VIEW_COLS

log = logging.getLogger(__name__)

CONF_COLS = [f"conf{c}" for c in range(NUM_CLASSES)]
METHODS = ("broadcast", "cam", "cellview", "cycle1", "cycle2", "oracle")


def last_cycle(run: Path) -> int:
    """Highest cycle whose test-cell probabilities exist (0 when none)."""
    done = [k for k in (1, 2) if (run / f"cycle{k}" / "cell_probs_test.parquet").is_file()]
    return max(done) if done else 0


def cell_probs_path(run: Path, method: str) -> Path:
    folder = "oracle" if method == "oracle" else method
    return run / folder / "cell_probs_test.parquet"


def method_confidences(run: Path, table: pd.DataFrame, method: str, p: dict, score: str = "topk_mean",
                       combine_method: str | None = None, negative: str | None = None,
                       penalty: bool | None = None) -> np.ndarray | None:
    """Confidences (N, 19) of ``method`` for the cells of ``table``; None when its inputs are missing.

    ``p`` is the ``predict`` config section; the keyword arguments override it (ablations).
    """
    penalty = p["small_cell_penalty"] if penalty is None else penalty
    quality = quality_factor(table["rel_area"], table["touches_border"]) if penalty else None
    img = table[IMG_COLS].to_numpy(np.float32)
    if method == "broadcast":
        return combine(img, None, "image", "max", quality)
    if method == "cam":
        return cam_confidences(table, score, quality)
    if method == "cellview":
        return view_confidences(table, quality) if VIEW_COLS[0] in table.columns else None
    path = cell_probs_path(run, method)
    if not path.is_file():
        return None
    cell = aligned_cell_probs(table, pd.read_parquet(path), str(path))
    return combine(img, cell, combine_method or p["combine"], negative or p["negative"], quality)


def final_method(run: Path, p: dict) -> str:
    """The cell model the submission uses: ``predict.cycle`` (last | 1 | 2)."""
    cyc = last_cycle(run) if str(p["cycle"]) == "last" else int(p["cycle"])
    if cyc == 0 or not cell_probs_path(run, f"cycle{cyc}").is_file():
        raise FileNotFoundError(f"no cell-model predictions for the test split in {run}/cycle{cyc or 1}: run stage 05 first")
    return f"cycle{cyc}"


def per_image(table: pd.DataFrame, conf: np.ndarray, masks_dir: Path):
    """Yield ``(ID, mask, cell_ids, conf)`` per image of ``table`` (rows grouped by image)."""
    for image_id, idx in table.groupby("ID", sort=False).indices.items():
        mask = read_mask(masks_dir / f"{image_id}_cellmask.png")
        yield image_id, mask, table["cell_id"].to_numpy()[idx], conf[idx]


def score_methods(run: Path, data_dir: Path, table: pd.DataFrame, confs: dict[str, np.ndarray], mode: str = "oid",
                  n_boot: int = 0, seed: int = 0) -> dict:
    """Cell-level mAP of each method's confidences on the test split against ``DATA/gt``.

    Returns ``{method: {"mAP", "ap_per_class"}}``. With ``n_boot`` > 0 each entry also holds
    ``"bootstrap"``: its mAP on ``n_boot`` resamples of the test images, the same resamples for
    every method (:func:`hpa.metric.bootstrap_maps`), for confidence intervals and paired
    differences (:func:`step_gains`). Every method shares one IoU matrix per image.
    """
    from .metric import bootstrap_maps, cell_images, score_images

    gt_labels = gtmod.read_cell_labels(data_dir, "test")
    masks_dir = run / "masks" / "test"
    ids = list(dict.fromkeys(table["ID"]))
    gt = {i: (gtmod.read_gt_mask(data_dir, i), gt_labels.get(i, {})) for i in gt_labels}
    pred_masks = {i: read_mask(masks_dir / f"{i}_cellmask.png") for i in ids}
    groups = table.groupby("ID", sort=False).indices
    cell_ids = table["cell_id"].to_numpy()
    cache: dict = {}
    images = {name: cell_images(gt, {i: (pred_masks[i], cell_ids[groups[i]], conf[groups[i]]) for i in ids}, cache)
              for name, conf in confs.items()}
    out = {}
    for name, ims in images.items():
        res = score_images(gt, ims, mode)
        out[name] = {"mAP": float(res.map), "ap_per_class": [None if np.isnan(a) else float(a) for a in res.ap_per_class]}
    if n_boot > 0:
        for name, maps in bootstrap_maps(gt, images, n_boot, seed, mode).items():
            out[name]["bootstrap"] = maps.tolist()
    return out


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


def segmentation_quality(run: Path, data_dir: Path, ids: list[str]) -> dict:
    """Share of true test cells matched at IoU >= 0.6 and of predicted cells left unmatched."""
    n_true = n_pred = n_match = 0
    for i in ids:
        res = match_cells(read_mask(run / "masks" / "test" / f"{i}_cellmask.png"), gtmod.read_gt_mask(data_dir, i))
        n_true, n_pred, n_match = n_true + res.n_true, n_pred + res.n_pred, n_match + res.n_matched
    return {"true_cells": n_true, "predicted_cells": n_pred, "matched": n_match,
            "recall": n_match / max(n_true, 1), "unmatched_predicted": 1 - n_match / max(n_pred, 1)}


def predict_test(run: str | Path, cfg: dict, force: bool = False) -> tuple[Path, Path]:
    """Stage 06: confidences of every test cell -> ``RUN/predictions_test.parquet`` and ``RUN/submission.csv``.

    Uses the cell model chosen by ``predict.cycle`` combined with the image model by
    :func:`hpa.predict.combine`. Every test image gets a row in the submission, an empty
    prediction string when no cell was found in it or when an earlier stage skipped it as
    unreadable (its size then comes from its channel files' headers).
    """
    from .io import field_size, list_split
    from .labelling import cell_table, usable_ids
    from .submission import write_submission

    run, data_dir = Path(run), Path(cfg["data"])
    p, sc = cfg["predict"], cfg["pseudo"]
    table = cell_table(run, data_dir, "test", sc["topk_frac"], sc["work_size"], force=force, view=bool(sc.get("cell_view", True)))
    method = final_method(run, p)
    conf = method_confidences(run, table, method, p, sc["score"])
    preds = table[["ID", "cell_id", "x0", "y0", "x1", "y1", "area"]].copy()
    preds[CONF_COLS] = conf
    preds.insert(2, "model", method)
    from .fsutil import write_parquet

    pred_path = write_parquet(run / "predictions_test.parquet", preds)
    ids, _ = list_split(data_dir, "test")
    usable = set(usable_ids(run, "test", ids))
    groups = table.groupby("ID", sort=False).indices
    cell_ids = table["cell_id"].to_numpy()

    def rows():
        for i in ids:
            if i not in usable:  # skipped (listed in skipped.csv and the report): a row without predictions
                yield i, np.zeros(field_size(data_dir / "test", i), np.uint8), np.zeros(0, np.int64), conf[:0]
                continue
            mask = read_mask(run / "masks" / "test" / f"{i}_cellmask.png")
            idx = groups.get(i, np.zeros(0, np.int64))
            yield i, mask, cell_ids[idx], conf[idx]

    sub = write_submission(run / "submission.csv", rows())
    log.info("%s: %d cells of %d images with the %s cell model (%d skipped images without predictions)", sub,
             len(table), len(ids), method, len(ids) - len(usable))
    return pred_path, sub
