"""Rendering the evaluation report: ``report.md``, the AP bar chart and the summary lines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpa.constants import CLASS_NAMES, NUM_CLASSES
from hpa.utils.fs import atomic_path

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
