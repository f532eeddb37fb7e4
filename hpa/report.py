"""Stage 07: the evaluation report (``RUN/report.json``, ``RUN/report.md``, ``RUN/report_ap.png``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from . import gt as gtmod
from .constants import CLASS_NAMES, NUM_CLASSES
from .evaluate import METHODS, final_method, method_confidences, score_methods, segmentation_quality, step_gains
from .fsutil import atomic_path, write_json, write_text
from .labelling import cell_table
from .timing import read_timings

log = logging.getLogger(__name__)

DESCRIPTIONS = {
    "broadcast": "image probabilities given to every cell",
    "cam": "cell CAM score x image probability",
    "cellview": "image model on the cell alone x image probability",
    "cycle1": "cycle-1 cell model",
    "cycle2": "cycle-2 cell model",
    "oracle": "same cell model trained on true cell labels (upper bound)",
}

#: How the cell-model rows combine with the image model (``predict.combine``), for the descriptions.
COMBINED = {"cell": "", "product": " x image probability", "mean": ", mean with the image probability",
            "image": " (image probability only)"}


#: Parts of the report (and stages) that need the true cell labels of ``DATA/gt/``.
NEEDS_GT = ("cell-level mAP of every method", "oracle cell model (stage 05 --oracle)",
            "segmentation match rate", "pseudo-label precision against true cell labels")


def describe(method: str, combine: str | None = None) -> str:
    """One-line description of a report row; cell-model rows say how they were combined."""
    text = DESCRIPTIONS.get(method, "")
    if method in ("cycle1", "cycle2") and combine:
        text += COMBINED.get(combine, f" ({combine})")
    return text


def build_report(run: str | Path, cfg: dict, mode: str = "oid") -> dict:
    """Score every method and gather diagnostics and timings into one dict (also written to disk)."""
    run, data_dir = Path(run), Path(cfg["data"])
    report: dict = {"run": str(run), "data": str(data_dir), "profile": cfg.get("profile"), "mode": mode,
                    "combine": cfg["predict"]["combine"]}
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
    sc = cfg["pseudo"]
    table = cell_table(run, data_dir, "test", sc["topk_frac"], sc["work_size"], view=bool(sc.get("cell_view", True)))
    ids = list(dict.fromkeys(table["ID"]))
    report["segmentation"] = segmentation_quality(run, data_dir, ids)
    p = cfg["predict"]
    confs = {}
    for m in METHODS:
        c = method_confidences(run, table, m, p, sc["score"])
        if c is None:
            log.warning("no %s predictions in %s: row left out of the report", m, run)
        else:
            confs[m] = c
    n_boot = int(cfg.get("evaluate", {}).get("bootstrap", 0) or 0)
    report["methods"] = score_methods(run, data_dir, table, confs, mode, n_boot, int(cfg.get("seed", 0)))
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
        variants = {f"{fm} {c} / negative={n} / penalty={pen}": method_confidences(run, table, fm, p, sc["score"], c, n, pen)
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


def render_markdown(r: dict) -> str:
    lines = [f"# Report for {r['run']}", "", f"Data: `{r['data']}`, profile `{r.get('profile')}`, scoring mode `{r['mode']}`.", ""]
    if r.get("methods"):
        ci = all("ci95" in v for v in r["methods"].values())
        lines += ["## Cell-level mAP (test split, IoU >= 0.6)", "",
                  "| method | what | mAP |" + (" 95% CI |" if ci else ""), "|---|---|---|" + ("---|" if ci else "")]
        for m, v in r["methods"].items():
            lines.append(f"| {m} | {describe(m, r.get('combine'))} | {v['mAP']:.4f} |"
                         + (f" {v['ci95'][0]:.4f}-{v['ci95'][1]:.4f} |" if ci else ""))
        if "oracle" in r["methods"] and r.get("submitted") in r["methods"]:
            ratio = r["methods"][r["submitted"]]["mAP"] / max(r["methods"]["oracle"]["mAP"], 1e-9)
            lines += ["", f"Submitted model `{r['submitted']}` reaches {ratio:.3f} of the oracle."]
        if r.get("steps"):
            lines += ["", f"### Does each step add? (paired bootstrap: {r['bootstrap']['resamples']} resamples of the "
                      "test images, every method scored on the same ones)", "",
                      "| step | mAP gain | 95% CI of the gain | resamples where it gains |", "|---|---|---|---|"]
            lines += [f"| {s['from']} -> {s['to']} | {s['gain']:+.4f} | {s['ci95'][0]:+.4f} to {s['ci95'][1]:+.4f} | "
                      f"{100 * s['p_better']:.0f}% |" for s in r["steps"]]
        lines += ["", "### AP per class", "", "| class | " + " | ".join(r["methods"]) + " |",
                  "|---|" + "---|" * len(r["methods"])]
        for c in range(NUM_CLASSES):
            vals = [r["methods"][m]["ap_per_class"][c] for m in r["methods"]]
            if all(v is None for v in vals):
                continue
            lines.append(f"| {c} {CLASS_NAMES[c]} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    if r.get("not_run"):
        lines += ["", "## Not run (no ground truth)", ""]
        lines += [f"- {what}: {why}" for what, why in r["not_run"].items()]
    if r.get("ablations"):
        lines += ["", "## Combination rule (submitted cell model)", "", "| variant | mAP |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(r["ablations"].items(), key=lambda kv: -kv[1])]
    if r.get("segmentation"):
        s = r["segmentation"]
        lines += ["", "## Segmentation (test split)", "",
                  f"{s['matched']} of {s['true_cells']} true cells matched at IoU >= 0.6 (recall {s['recall']:.3f}); "
                  f"{s['predicted_cells']} predicted cells, {100 * s['unmatched_predicted']:.1f}% unmatched."]
    for k in (1, 2):
        pr = r.get(f"pseudo_cycle{k}")
        if not pr:
            continue
        cov = pr["coverage"]
        line = f"- cycle {k}: {100 * cov['labelled']:.1f}% of {cov['n_cells']} train cells labelled"
        if "vs_ground_truth" in pr:
            line += f", precision {pr['vs_ground_truth']['overall_precision']:.3f} against true cell labels"
        if pr.get("filled"):
            f = pr["filled"]
            soft = f.get("targets") == "soft"
            what = ("learn the cycle-1 cell model's probabilities over their image's classes and Negative" if soft
                    else "take the cycle-1 cell model's best allowed class")
            line += f"; the other {100 * f['labelled']:.1f}% {what} at weight {f['weight']:g}"
            if "vs_ground_truth" in f:
                line += (f" ({'its best allowed class right for' if soft else 'precision'} "
                         f"{f['vs_ground_truth']['overall_precision']:.3f})")
        lines += (["", "## Pseudo-labels", ""] if k == 1 or "pseudo_cycle1" not in r else []) + [line]
    lines += _problem_lines(r.get("input_problems") or {})
    if r.get("timings_s"):
        lines += ["", "## Timings", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in r["timings_s"].items()]
        lines.append(f"| total | {sum(r['timings_s'].values()):.1f} |")
    return "\n".join(lines) + "\n"


def _problem_lines(problems: dict, limit: int = 50) -> list[str]:
    """Markdown of :func:`input_problems`: every skip with its reason, then images without cells."""
    skipped, no_cells = problems.get("skipped", []), problems.get("no_cells", [])
    if not skipped and not no_cells:
        return []
    lines = ["", "## Images left out or without cells", ""]
    if skipped:
        ids = {(s["split"], s["ID"]) for s in skipped}
        lines += [f"{len(ids)} image(s) skipped as unreadable (on_bad_image=skip):", "",
                  "| stage | split | ID | reason |", "|---|---|---|---|"]
        lines += [f"| {s['stage']} | {s['split']} | {s['ID']} | {s['reason'].replace('|', '/')} |"
                  for s in skipped[:limit]]
        if len(skipped) > limit:
            lines.append(f"| ... | | {len(skipped) - limit} more rows in report.json | |")
    if no_cells:
        lines += ["", f"{len(no_cells)} image(s) without any segmented cell (empty masks; no cell predictions): "
                  + ", ".join(f"{c['ID']} ({c['split']})" for c in no_cells[:limit])
                  + (f" and {len(no_cells) - limit} more (report.json)" if len(no_cells) > limit else "")]
    return lines


def plot_ap(path: Path, methods: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(methods)
    fig, ax = plt.subplots(figsize=(14, 4.5))
    width = 0.8 / len(names)
    x = np.arange(NUM_CLASSES)
    for j, m in enumerate(names):
        ap = [np.nan if v is None else v for v in methods[m]["ap_per_class"]]
        ax.bar(x + j * width - 0.4 + width / 2, ap, width, label=f"{m} ({methods[m]['mAP']:.3f})")
    ax.set_xticks(x, [f"{c} {CLASS_NAMES[c][:14]}" for c in range(NUM_CLASSES)], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("AP (IoU >= 0.6)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=len(names))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def summary_table(report: dict) -> str:
    """The few lines run_all.sh prints at the end."""
    if not report.get("methods"):
        rows = ["no ground truth: nothing scored (see report.md for coverage and timings)"]
    else:
        rows = [f"{m:<10} mAP={v['mAP']:.4f}  {describe(m, report.get('combine'))}" for m, v in report["methods"].items()]
    problems = report.get("input_problems") or {}
    n_skip = len({(s["split"], s["ID"]) for s in problems.get("skipped", [])})
    n_empty = len(problems.get("no_cells", []))
    if n_skip or n_empty:
        rows.append(f"{n_skip} image(s) skipped as unreadable, {n_empty} without any cell: listed in report.md")
    return "\n".join(rows)
