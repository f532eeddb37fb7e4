"""Stage 07: the evaluation report (``RUN/report.json``, ``RUN/report.md``, ``RUN/report_ap.png``).

Two kinds of content:

- with ``DATA/gt/``: cell-level mAP of every method in both scoring modes (``oid``, the
  competition's, and ``strict``), bootstrap intervals and paired step gains in both, the
  combination-rule ablations, the segmentation match rate over every true test image;
- always (:func:`run_summary`): what a run says without cell truth: the cell models'
  predictions aggregated back to the image on the validation fold against the image
  labels, next to the image model's own validation mAP; pseudo-label coverage per class;
  the predicted top classes of the test cells; cells per field; skipped fields; the
  segmenter used and why.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from hpa.config import Settings
from hpa.constants import NEGATIVE, NUM_CLASSES, PROB_COLS
from hpa.eval import gt as gtmod
from hpa.eval.benchmark import read_ground_truth, score_methods, segmentation_quality, step_gains, true_cells_per_class
from hpa.eval.metric import MODES
from hpa.eval.report import NEEDS_GT, plot_ap, render_markdown
from hpa.pipeline.predict import CONF_COLS, METHODS, final_method, method_confidences
from hpa.pipeline.pseudo_labels import cell_table
from hpa.utils.fs import write_json, write_text
from hpa.utils.timing import read_timings

log = logging.getLogger(__name__)


def mode_order(lead: str) -> tuple[str, ...]:
    """Both scoring modes, ``lead`` first."""
    if lead not in MODES:
        raise ValueError(f"unknown scoring mode {lead!r}; valid: {', '.join(MODES)}")
    return (lead,) + tuple(m for m in MODES if m != lead)


def build_report(run: str | Path, cfg: Settings, mode: str = "oid") -> dict:
    """Score every method in both modes and gather diagnostics and timings into one dict.

    ``mode`` only chooses which mode leads: ``report["methods"]``, ``["steps"]`` and
    ``["ablations"]`` are that mode's; ``report["by_mode"][m]`` holds each mode's.
    """
    run, data_dir = Path(run), Path(cfg.data)
    modes = mode_order(mode)
    report: dict = {"run": str(run), "data": str(data_dir), "profile": cfg.profile, "mode": mode,
                    "modes": list(modes), "combine": cfg.predict.combine, "rank_combine": cfg.predict.rank_combine}
    for k in (1, 2):
        p = run / f"cycle{k}" / "pseudo_report.json"
        if p.is_file():
            report[f"pseudo_cycle{k}"] = json.loads(p.read_text())
    report["timings_s"] = read_timings(run)
    report["input_problems"] = input_problems(run)
    report["summary"] = run_summary(run, cfg)
    if not gtmod.has_gt(data_dir):
        log.warning("%s has no gt/: no cell-level scores; the report gives what the run says without cell truth",
                    data_dir)
        report["scored"] = False
        report["not_run"] = {what: f"{data_dir / 'gt' / 'cell_labels.csv'} not found" for what in NEEDS_GT}
        return report
    sc = cfg.pseudo
    table = cell_table(run, data_dir, "test", sc.topk_frac, sc.work_size, view=sc.cell_view)
    gt = read_ground_truth(data_dir, "test")
    report["segmentation"] = segmentation_quality(run, data_dir, gt)
    report["true_per_class"] = true_cells_per_class(gt)
    p = cfg.predict
    confs = {}
    for m in METHODS:
        c = method_confidences(run, table, m, p, sc.score)
        if c is None:
            log.warning("no %s predictions in %s: row left out of the report", m, run)
        else:
            confs[m] = c
    try:
        fm = final_method(run, p)
    except FileNotFoundError:
        fm = None
    if fm and p.rank_combine != p.combine:  # the ranking output (rank* columns of predictions_test.parquet)
        confs["ranking"] = method_confidences(run, table, fm, p, sc.score, p.rank_combine)
    n_boot = cfg.evaluate.bootstrap
    scores = score_methods(run, data_dir, table, confs, modes, n_boot, cfg.seed, gt=gt)
    by_mode: dict = {}
    for m in modes:
        entry = {"methods": scores[m]}
        if n_boot:
            entry["steps"] = step_gains(scores[m])
            for v in scores[m].values():
                b = np.asarray(v.pop("bootstrap"))
                v["ci95"] = [float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))]
        by_mode[m] = entry
    if n_boot:
        report["bootstrap"] = {"resamples": n_boot, "unit": "test image"}
    if fm:  # ablations of the combination rule on the submitted cell model
        variants = {f"{fm} {c} / negative={n} / penalty={pen}": method_confidences(run, table, fm, p, sc.score, c, n, pen)
                    for c in ("product", "mean", "cell") for n in ("max", "min_complement") for pen in (True, False)}
        for m, res in score_methods(run, data_dir, table, variants, modes, gt=gt).items():
            by_mode[m]["ablations"] = {k: v["mAP"] for k, v in res.items()}
        report["submitted"] = fm
    report["by_mode"] = by_mode
    report.update({k: v for k, v in by_mode[mode].items()})  # the leading mode at the top level
    report["scored"] = True
    return report


# --------------------------------------------------------------------------- without cell truth
def run_summary(run: str | Path, cfg: Settings) -> dict:
    """What the run says without cell labels (each part present only when its inputs exist).

    Returns ``{"segmenter": {split: segmenter.json}, "cells_per_field": {split: stats},
    "image_level": ..., "pseudo_coverage": {cycle: ...}, "test_top_classes": ...}``
    (see :func:`image_level_check`, :func:`pseudo_coverage`, :func:`top_classes`).
    """
    run, data_dir = Path(run), Path(cfg.data)
    out: dict = {"segmenter": {}, "cells_per_field": {}}
    for split in ("train", "test"):
        seg = run / "masks" / split / "segmenter.json"
        if seg.is_file():
            out["segmenter"][split] = json.loads(seg.read_text())
        cells = run / "masks" / split / "cells.csv"
        if cells.is_file():
            out["cells_per_field"][split] = cells_per_field(pd.read_csv(cells, dtype={"ID": str}))
    try:
        lvl = image_level_check(run, cfg)
    except FileNotFoundError as exc:
        log.info("image-level check of the cell models left out: %s", exc)
        lvl = None
    if lvl:
        out["image_level"] = lvl
    cov = pseudo_coverage(run, data_dir)
    if cov:
        out["pseudo_coverage"] = cov
    pred = run / "predictions_test.parquet"
    if pred.is_file():
        out["test_top_classes"] = top_classes(pd.read_parquet(pred))
    return out


def cells_per_field(cells: pd.DataFrame) -> dict:
    """Cells per field of stage 03's ``cells.csv``: fields, fields without cells, min/median/mean/max."""
    n = cells["n_cells"].to_numpy(np.int64)
    if not n.size:
        return {"fields": 0, "no_cells": 0}
    return {"fields": int(n.size), "no_cells": int((n == 0).sum()), "min": int(n.min()), "median": float(np.median(n)),
            "mean": float(n.mean()), "max": int(n.max()), "cells": int(n.sum())}


def average_precisions(y: np.ndarray, score: np.ndarray) -> list[float | None]:
    """Image-level AP per class (sklearn, as the image model's validation), None for a class
    without both positive and negative images. ``y`` bool (N, 19), ``score`` float (N, 19)."""
    from sklearn.metrics import average_precision_score

    return [float(average_precision_score(y[:, c], score[:, c])) if y[:, c].any() and (~y[:, c]).any() else None
            for c in range(y.shape[1])]


def _mean(aps: list[float | None]) -> float | None:
    vals = [a for a in aps if a is not None]
    return float(np.mean(vals)) if vals else None


def image_level_check(run: Path, cfg: Settings) -> dict | None:
    """The cell models' per-cell predictions aggregated back to the image, on the validation fold.

    For every image of fold ``image_model.val_fold`` (``RUN/splits.csv``; neither the image
    model nor the cell models trained on it), each class's image score is the maximum over the
    image's cells of the cell model's probability (``cycle{k}/cell_probs_train.parquet``; 0 for
    an image without cells), scored against the image labels (``DATA/train.csv``) with the same
    image-level AP as the image model's validation (``image_model/val_predictions.csv``).
    Returns ``{"n_images", "methods": {name: {"mAP", "ap_per_class"}}}``, names ``image_model``,
    ``cycle1``, ``cycle2`` (those whose files exist); None when the run has no image model yet.
    Raises FileNotFoundError when ``splits.csv`` or the validation predictions are missing.
    """
    from hpa.io.layout import list_split

    val_pred = run / "image_model" / "val_predictions.csv"
    splits = run / "splits.csv"
    for f in (val_pred, splits):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found")
    folds = pd.read_csv(splits, dtype={"ID": str})
    val_ids = folds.loc[folds["fold"] == int(cfg.image_model.val_fold), "ID"].tolist()
    ids, y_all = list_split(cfg.data, "train")
    label_of = dict(zip(ids, np.asarray(y_all) > 0.5))
    img = pd.read_csv(val_pred, dtype={"ID": str}).set_index("ID")
    val_ids = [i for i in val_ids if i in label_of and i in img.index]  # images stage 01 skipped have no row
    if not val_ids:
        return None
    y = np.stack([label_of[i] for i in val_ids])
    methods = {"image_model": img.loc[val_ids, PROB_COLS].to_numpy(np.float64)}
    for k in (1, 2):
        path = run / f"cycle{k}" / "cell_probs_train.parquet"
        if path.is_file():
            probs = pd.read_parquet(path)
            probs = probs[probs["ID"].isin(set(val_ids))]
            agg = probs.groupby("ID")[PROB_COLS].max().reindex(val_ids).fillna(0.0)
            methods[f"cycle{k}"] = agg.to_numpy(np.float64)
    out = {"n_images": len(val_ids), "fold": int(cfg.image_model.val_fold),
           "n_positive": y.sum(0).astype(int).tolist(), "methods": {}}
    for name, score in methods.items():
        aps = average_precisions(y, score)
        out["methods"][name] = {"mAP": _mean(aps), "ap_per_class": aps}
    return out


def pseudo_coverage(run: Path, data_dir: Path) -> dict:
    """Per cycle and class: training cells the rule labelled c (and, cycle 2, filled with c),
    out of the cells of training images labelled c (``RUN/cells/train.parquet``, ``DATA/train.csv``;
    Negative: out of every cell).

    Returns ``{cycle: {"labelled": [...], "filled": [...] or None, "eligible": [...]}}`` (lists of 19 ints).
    """
    from hpa.io.layout import list_split

    table_path = run / "cells" / "train.parquet"
    eligible = None
    if table_path.is_file():
        table = pd.read_parquet(table_path, columns=["ID"])
        ids, y = list_split(data_dir, "train")
        per_image = pd.DataFrame(np.asarray(y) > 0.5, index=ids)
        counts = table["ID"].value_counts()
        common = per_image.index.intersection(counts.index)
        eligible = (per_image.loc[common].to_numpy() * counts.loc[common].to_numpy()[:, None]).sum(0).astype(int).tolist()
        eligible[NEGATIVE] = int(len(table))  # any cell may be Negative, whatever its image's labels
    out = {}
    for k in (1, 2):
        p = run / f"cycle{k}" / "pseudo_report.json"
        if not p.is_file():
            continue
        pr = json.loads(p.read_text())
        out[f"cycle{k}"] = {"labelled": pr["coverage"]["per_class"], "n_cells": pr["coverage"]["n_cells"],
                            "filled": (pr.get("filled") or {}).get("per_class"), "eligible": eligible}
    return out


def top_classes(pred: pd.DataFrame) -> dict:
    """Predicted top class of every test cell (``predictions_test.parquet``): counts per class (19),
    the mean top confidence per class, and the model that made them."""
    conf = pred[CONF_COLS].to_numpy(np.float64)
    if not len(conf):
        return {"n_cells": 0, "counts": [0] * NUM_CLASSES, "mean_conf": [None] * NUM_CLASSES}
    top = np.nan_to_num(conf, nan=-1.0).argmax(1)
    best = conf[np.arange(len(conf)), top]
    counts = np.bincount(top, minlength=NUM_CLASSES)
    mean = [float(best[top == c].mean()) if counts[c] else None for c in range(NUM_CLASSES)]
    return {"n_cells": int(len(conf)), "model": str(pred["model"].iloc[0]) if "model" in pred else None,
            "counts": counts.tolist(), "mean_conf": mean}


# --------------------------------------------------------------------------- problems, writing
#: ``skipped.csv`` files (``ID,reason``) of images a stage left out (``on_bad_image=skip``).
SKIP_LISTS = (("01_train_image", "train", "image_model/skipped.csv"),
              ("02_cam", "train", "cams/train/skipped.csv"), ("02_cam", "test", "cams/test/skipped.csv"),
              ("03_segment", "train", "masks/train/skipped.csv"), ("03_segment", "test", "masks/test/skipped.csv"))


def input_problems(run: str | Path) -> dict:
    """Images left out by a stage and images without any cell, so that none goes unnoticed.

    Returns ``{"skipped": [{"stage", "split", "ID", "reason"}, ...], "no_cells": [{"split",
    "ID"}, ...]}`` from the stages' ``skipped.csv`` files and the ``n_cells == 0`` rows of
    ``RUN/masks/{split}/cells.csv``.
    """
    run = Path(run)
    skipped, no_cells = [], []
    for stage, split, rel in SKIP_LISTS:
        path = run / rel
        if path.is_file():
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
            skipped += [{"stage": stage, "split": split, "ID": i, "reason": r} for i, r in zip(df["ID"], df["reason"])]
    for split in ("train", "test"):
        path = run / "masks" / split / "cells.csv"
        if path.is_file():
            df = pd.read_csv(path, dtype={"ID": str})
            no_cells += [{"split": split, "ID": i} for i in df.loc[df["n_cells"] == 0, "ID"]]
    return {"skipped": skipped, "no_cells": no_cells}


def write_report(run: str | Path, report: dict) -> None:
    run = Path(run)
    write_json(run / "report.json", report)
    write_text(run / "report.md", render_markdown(report))
    if report.get("methods"):
        plot_ap(run / "report_ap.png", report["methods"])
