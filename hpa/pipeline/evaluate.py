"""Stage 07: the evaluation report (``RUN/report.json``, ``RUN/report.md``, ``RUN/report_ap.png``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from hpa.config import Settings
from hpa.eval import gt as gtmod
from hpa.eval.benchmark import score_methods, segmentation_quality, step_gains
from hpa.eval.report import NEEDS_GT, plot_ap, render_markdown
from hpa.pipeline.predict import METHODS, final_method, method_confidences
from hpa.pipeline.pseudo_labels import cell_table
from hpa.utils.fs import write_json, write_text
from hpa.utils.timing import read_timings

log = logging.getLogger(__name__)


def build_report(run: str | Path, cfg: Settings, mode: str = "oid") -> dict:
    """Score every method and gather diagnostics and timings into one dict (also written to disk)."""
    run, data_dir = Path(run), Path(cfg.data)
    report: dict = {"run": str(run), "data": str(data_dir), "profile": cfg.profile, "mode": mode,
                    "combine": cfg.predict.combine}
    for k in (1, 2):
        p = run / f"cycle{k}" / "pseudo_report.json"
        if p.is_file():
            report[f"pseudo_cycle{k}"] = json.loads(p.read_text())
    report["timings_s"] = read_timings(run)
    report["input_problems"] = input_problems(run)
    if not gtmod.has_gt(data_dir):
        log.warning("%s has no gt/: nothing to score; the report lists timings and pseudo-label coverage only", data_dir)
        report["scored"] = False
        report["not_run"] = {what: f"{data_dir / 'gt' / 'cell_labels.csv'} not found" for what in NEEDS_GT}
        return report
    sc = cfg.pseudo
    table = cell_table(run, data_dir, "test", sc.topk_frac, sc.work_size, view=sc.cell_view)
    ids = list(dict.fromkeys(table["ID"]))
    report["segmentation"] = segmentation_quality(run, data_dir, ids)
    p = cfg.predict
    confs = {}
    for m in METHODS:
        c = method_confidences(run, table, m, p, sc.score)
        if c is None:
            log.warning("no %s predictions in %s: row left out of the report", m, run)
        else:
            confs[m] = c
    n_boot = cfg.evaluate.bootstrap
    report["methods"] = score_methods(run, data_dir, table, confs, mode, n_boot, cfg.seed)
    if n_boot:
        report["bootstrap"] = {"resamples": n_boot, "unit": "test image"}
        report["steps"] = step_gains(report["methods"])
        for v in report["methods"].values():
            b = np.asarray(v.pop("bootstrap"))
            v["ci95"] = [float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))]
    try:
        fm = final_method(run, p)
    except FileNotFoundError:
        fm = None
    if fm:  # ablations of the combination rule on the submitted cell model
        variants = {f"{fm} {c} / negative={n} / penalty={pen}": method_confidences(run, table, fm, p, sc.score, c, n, pen)
                    for c in ("product", "mean", "cell") for n in ("max", "min_complement") for pen in (True, False)}
        report["ablations"] = {k: v["mAP"] for k, v in score_methods(run, data_dir, table, variants, mode).items()}
        report["submitted"] = fm
    report["scored"] = True
    return report


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


