"""Rendering the evaluation report: ``report.md``, the AP bar chart and the summary lines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpa.constants import CLASS_NAMES, NUM_CLASSES
from hpa.utils.fs import atomic_path

#: Fewer true test cells than this: the report says that class's AP is a matter of a few ranks.
FEW_TRUE_CELLS = 5

DESCRIPTIONS = {
    "broadcast": "image probabilities given to every cell",
    "cam": "cell CAM score x image probability",
    "cellview": "image model on the cell alone x image probability",
    "cycle1": "cycle-1 cell model",
    "cycle2": "cycle-2 cell model",
    "oracle": "same cell model trained on true cell labels (upper bound)",
    "ranking": "submitted cell model",
}


#: How the cell-model rows combine with the image model (``predict.combine``), for the descriptions.
COMBINED = {"cell": "", "product": " x image probability", "mean": ", mean with the image probability",
            "image": " (image probability only)",
            "product_max": " x image probability x the image's highest cell probability"}


#: Parts of the report (and stages) that need the true cell labels of ``DATA/gt/``.
NEEDS_GT = ("cell-level mAP of every method", "oracle cell model (stage 05 --oracle)",
            "segmentation match rate", "pseudo-label precision against true cell labels")


def describe(method: str, combine: str | None = None, rank_combine: str | None = None) -> str:
    """One-line description of a report row; cell-model rows say how they were combined."""
    text = DESCRIPTIONS.get(method, "")
    if method in ("cycle1", "cycle2") and combine:
        text += COMBINED.get(combine, f" ({combine})")
    if method == "ranking":
        text += COMBINED.get(rank_combine, f" ({rank_combine})") + " (rank* columns: for ranking cells across images)"
    return text


MODE_TEXT = {"oid": "the competition's rule: a prediction of a class that none of the image's true cells has is ignored",
             "strict": "such predictions are false positives: confidences must mean the same in every image, "
                       "as when all cells of a data set are ranked by one class"}


def _fmt(v, spec=".4f", none="-"):
    return none if v is None else format(v, spec)


def _by_mode(r: dict) -> dict:
    """``{mode: {"methods", "steps", "ablations"}}``, lead mode first (reports of one mode: that mode)."""
    if r.get("by_mode"):
        return {m: r["by_mode"][m] for m in r.get("modes", r["by_mode"]) if m in r["by_mode"]}
    return {r["mode"]: {k: r[k] for k in ("methods", "steps", "ablations") if k in r}}


def _score_lines(r: dict) -> list[str]:
    """The cell-level sections: both modes side by side."""
    bm = _by_mode(r)
    modes = list(bm)
    lead = bm[modes[0]]["methods"]
    ci = all("ci95" in v for e in bm.values() for v in e["methods"].values())
    lines = ["## Cell-level mAP (test split, IoU >= 0.6)", ""]
    lines += [f"- `{m}`{' (leads)' if i == 0 and len(modes) > 1 else ''}: {MODE_TEXT.get(m, m)}." for i, m in enumerate(modes)]
    head = "| method | what |" + "".join(f" {m} mAP |" + (" 95% CI |" if ci else "") for m in modes)
    lines += ["", head, "|---|---|" + ("---|" * (2 if ci else 1)) * len(modes)]
    for name in lead:
        row = f"| {name} | {describe(name, r.get('combine'), r.get('rank_combine'))} |"
        for m in modes:
            v = bm[m]["methods"].get(name)
            row += f" {_fmt(v and v['mAP'])} |"
            if ci:
                row += f" {v['ci95'][0]:.4f}-{v['ci95'][1]:.4f} |" if v else " - |"
        lines.append(row)
    sub = r.get("submitted")
    if "oracle" in lead and sub in lead:
        parts = [f"{bm[m]['methods'][sub]['mAP'] / max(bm[m]['methods']['oracle']['mAP'], 1e-9):.3f} ({m})"
                 for m in modes]
        lines += ["", f"Submitted model `{sub}` reaches " + ", ".join(parts) + " of the oracle."]
    if any(e.get("steps") for e in bm.values()):
        lines += ["", f"### Does each step add? (paired bootstrap: {r['bootstrap']['resamples']} resamples of the "
                  "test images, every method and mode scored on the same ones)", "",
                  "| step |" + "".join(f" {m} gain | 95% CI | resamples where it gains |" for m in modes),
                  "|---|" + "---|---|---|" * len(modes)]
        steps = {m: {(s["from"], s["to"]): s for s in bm[m].get("steps", [])} for m in modes}
        for key in steps[modes[0]]:
            row = f"| {key[0]} -> {key[1]} |"
            for m in modes:
                s = steps[m].get(key)
                row += (f" {s['gain']:+.4f} | {s['ci95'][0]:+.4f} to {s['ci95'][1]:+.4f} | {100 * s['p_better']:.0f}% |"
                        if s else " - | - | - |")
            lines.append(row)
    true = r.get("true_per_class")  # reports written before it have no count column
    for m in modes:
        methods = bm[m]["methods"]
        count = ["true cells (images)"] if true else []
        lines += ["", f"### AP per class ({m})", "", "| class | " + " | ".join(count + list(methods)) + " |",
                  "|---|" + "---|" * (len(methods) + len(count))]
        for c in range(NUM_CLASSES):
            vals = [methods[n]["ap_per_class"][c] for n in methods]
            if all(v is None for v in vals):
                continue
            n = [f"{true['cells'][c]} ({true['images'][c]})"] if true else []
            lines.append(f"| {c} {CLASS_NAMES[c]} | " + " | ".join(n + [_fmt(v, ".3f") for v in vals]) + " |")
    few = [c for c in range(NUM_CLASSES) if true and 0 < true["cells"][c] < FEW_TRUE_CELLS]
    if few:
        lines += ["", f"Classes with fewer than {FEW_TRUE_CELLS} true test cells: "
                  + ", ".join(f"{c} {CLASS_NAMES[c]} ({true['cells'][c]})" for c in few)
                  + f". Their AP is decided by the rank of those few cells: each moves the mAP by up to "
                  f"1/{NUM_CLASSES} = {1 / NUM_CLASSES:.3f}; compare methods on a larger test split, or on the "
                  "classes with more cells."]
    if any(e.get("ablations") for e in bm.values()):
        lines += ["", "## Combination rule (submitted cell model)", "",
                  "| variant |" + "".join(f" {m} mAP |" for m in modes), "|---|" + "---|" * len(modes)]
        first = bm[modes[0]].get("ablations", {})
        for k in sorted(first, key=lambda k: -first[k]):
            lines.append(f"| {k} |" + "".join(f" {_fmt(bm[m].get('ablations', {}).get(k))} |" for m in modes))
    if r.get("segmentation"):
        s = r["segmentation"]
        extra = (f" over all {s['images']} true test images" if "images" in s else "")
        if s.get("images_without_mask"):
            extra += f" ({s['images_without_mask']} without a predicted mask: their cells count as missed)"
        lines += ["", "## Segmentation (test split)", "",
                  f"{s['matched']} of {s['true_cells']} true cells matched at IoU >= 0.6 (recall {s['recall']:.3f}){extra}; "
                  f"{s['predicted_cells']} predicted cells, {100 * s['unmatched_predicted']:.1f}% unmatched."]
    return lines


def _summary_lines(r: dict) -> list[str]:
    """What the run says without cell truth (:func:`hpa.pipeline.evaluate.run_summary`)."""
    sm = r.get("summary") or {}
    lines = ["", "## What the run says without cell labels", ""]
    if sm.get("segmenter"):
        for split, seg in sm["segmenter"].items():
            lines.append(f"- Segmenter ({split}): `{seg.get('segmenter')}`: {seg.get('reason', '')}")
    for split, c in (sm.get("cells_per_field") or {}).items():
        if not c.get("fields"):
            continue
        lines.append(f"- Cells per field ({split}): {c['fields']} fields, {c['cells']} cells; min {c['min']}, median "
                     f"{c['median']:g}, mean {c['mean']:.1f}, max {c['max']}; {c['no_cells']} field(s) without any cell.")
    problems = r.get("input_problems") or {}
    if sm or problems:
        n_skip = len({(x["split"], x["ID"]) for x in problems.get("skipped", [])})
        lines.append(f"- Fields skipped as unreadable: {n_skip}" + (" (listed below)." if n_skip else "."))
    lvl = sm.get("image_level")
    if lvl:
        names = list(lvl["methods"])
        lines += ["", f"### Cell predictions aggregated to the image (validation fold {lvl['fold']}: {lvl['n_images']} "
                  "training images no model trained on)", "",
                  "Image-level AP against the image labels: the image model's own probabilities, and the cell models' "
                  "(each class's image score is the maximum over the image's cells of the cell model's probability). "
                  "A cell model far below the image model misses classes that the image shows.", "",
                  "| class | images | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        lines.append("| **mAP** | | " + " | ".join(f"**{_fmt(lvl['methods'][n]['mAP'])}**" for n in names) + " |")
        for c in range(NUM_CLASSES):
            vals = [lvl["methods"][n]["ap_per_class"][c] for n in names]
            if all(v is None for v in vals):
                continue
            lines.append(f"| {c} {CLASS_NAMES[c]} | {lvl['n_positive'][c]} | " + " | ".join(_fmt(v, ".3f") for v in vals) + " |")
    cov = sm.get("pseudo_coverage")
    if cov:
        cycles = list(cov)
        lines += ["", "### Pseudo-label coverage per class", "",
                  "Training cells labelled with each class by the rule (cycle 2 also: cells filled from the cycle-1 model), "
                  "out of the cells of training images that carry the class (Negative: out of every cell).", "",
                  "| class | cells in images with it | " + " | ".join(f"{k} rule" + (f" | {k} filled" if cov[k].get("filled") else "")
                                                           for k in cycles) + " |",
                  "|---|---|" + "".join("---|" * (2 if cov[k].get("filled") else 1) for k in cycles)]
        elig = next((cov[k]["eligible"] for k in cycles if cov[k].get("eligible")), None)
        for c in range(NUM_CLASSES):
            row = f"| {c} {CLASS_NAMES[c]} | {elig[c] if elig else '-'} |"
            for k in cycles:
                n = cov[k]["labelled"][c]
                row += f" {n}" + (f" ({100 * n / elig[c]:.0f}%)" if elig and elig[c] else "") + " |"
                if cov[k].get("filled"):
                    row += f" {cov[k]['filled'][c]} |"
            lines.append(row)
    top = sm.get("test_top_classes")
    if top and top["n_cells"]:
        lines += ["", f"### Predicted top class of the {top['n_cells']} test cells ({top.get('model')})", "",
                  "| class | cells | share | mean top confidence |", "|---|---|---|---|"]
        for c in range(NUM_CLASSES):
            n = top["counts"][c]
            if n:
                lines.append(f"| {c} {CLASS_NAMES[c]} | {n} | {100 * n / top['n_cells']:.1f}% | {top['mean_conf'][c]:.3f} |")
    return lines if len(lines) > 3 else []


def render_markdown(r: dict) -> str:
    modes = r.get("modes") or [r["mode"]]
    lines = [f"# Report for {r['run']}", "",
             f"Data: `{r['data']}`, profile `{r.get('profile')}`, scoring modes "
             + ", ".join(f"`{m}`" for m in modes) + (f" (`{r['mode']}` leads)." if len(modes) > 1 else "."), ""]
    if r.get("methods"):
        lines += _score_lines(r)
    if r.get("not_run"):
        lines += ["", "## Not run (no ground truth)", ""]
        lines += [f"- {what}: {why}" for what, why in r["not_run"].items()]
    lines += _summary_lines(r)
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
    """The few lines run_all.sh prints at the end: every method's mAP in both modes."""
    if not report.get("methods"):
        rows = ["no ground truth: no cell-level scores (report.md has what the run says without cell labels)"]
    else:
        bm = _by_mode(report)
        rows = []
        for m in report["methods"]:
            scores = "  ".join(f"{mode}={e['methods'][m]['mAP']:.4f}" for mode, e in bm.items() if m in e["methods"])
            rows.append(f"{m:<10} mAP {scores}  {describe(m, report.get('combine'), report.get('rank_combine'))}")
    problems = report.get("input_problems") or {}
    n_skip = len({(s["split"], s["ID"]) for s in problems.get("skipped", [])})
    n_empty = len(problems.get("no_cells", []))
    if n_skip or n_empty:
        rows.append(f"{n_skip} image(s) skipped as unreadable, {n_empty} without any cell: listed in report.md")
    return "\n".join(rows)
