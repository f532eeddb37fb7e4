"""``RUN/model_card.md``: what a trained run's models are, what they learnt from, and how to use them.

:func:`write_model_card` reads only what the stages left in ``RUN`` (and the run's
``train.csv``) and writes one Markdown page:

- the data: the data folder, the number of training images and of images per class
  (``train.csv``), the validation fold (``splits.csv``), the number of test images;
- the settings that decide what the models are (profile, seed, image model, segmenter, cell
  model, combination rule);
- validation figures: the image model's last validated epoch (``image_model/metrics.csv``:
  image-level mAP and macro F1 on the validation fold) and each cell model's
  (``cycle{k}/cell_model/metrics.csv``: mAP, macro F1 and accuracy against the validation
  images' pseudo-labels; ``oracle/``: against their true cell labels);
- the segmenter that made the training masks (``masks/train/segmenter.json``);
- the model files with their SHA-1, and the command that answers new fields with them
  (stage 08, :mod:`hpa.pipeline.predict_new`).

Stage 07 calls it after its report; it can also be called on any finished run.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import numpy as np
import pandas as pd

from hpa.config import Settings
from hpa.constants import CLASS_NAMES, NUM_CLASSES
from hpa.io.errors import InputError
from hpa.utils.fs import write_text


def _last_validated(path: Path) -> dict | None:
    """The last row of a ``metrics.csv`` that has a validation mAP (None: no file or no such row)."""
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    if "mAP" not in df.columns:
        return None
    rows = df[df["mAP"].notna()]
    return None if rows.empty else rows.iloc[-1].to_dict()


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{float(v):.{digits}f}"


def _n(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


def _sha1(path: Path) -> str:
    from hpa.pipeline.cams import file_sha1

    return file_sha1(path)[:12]


def _data_section(cfg: Settings, run: Path) -> list[str]:
    from hpa.io.layout import list_split

    data = Path(cfg.data) if cfg.data else None
    lines = ["## Training data", ""]
    if data is None:
        return lines + ["No data folder recorded in RUN/config.yaml.", ""]
    lines.append(f"- Data folder: `{data}`")
    try:
        ids, labels = list_split(data, "train")
    except InputError as exc:
        return lines + [f"- Training labels not readable now: {exc}", ""]
    val = None
    if (run / "splits.csv").is_file():
        folds = pd.read_csv(run / "splits.csv", dtype={"ID": str})
        val = int((folds["fold"] == cfg.image_model.val_fold).sum())
    lines.append(f"- Training images: {len(ids)} (`train.csv`)"
                 + (f", of which {val} in the validation fold {cfg.image_model.val_fold} of "
                    f"{cfg.image_model.folds} (`splits.csv`)" if val is not None else ""))
    try:
        test_ids, _ = list_split(data, "test")
        lines.append(f"- Test images: {len(test_ids)}")
    except InputError:
        pass
    for k in (1, 2):
        rep = run / f"cycle{k}" / "pseudo_report.json"
        if rep.is_file():
            cov = json.loads(rep.read_text()).get("coverage", {})
            if "n_cells" in cov and "labelled" in cov:
                lines.append(f"- Cycle {k}: {cov['n_cells']} segmented training cells, {100 * cov['labelled']:.1f}% of "
                             f"them given a pseudo-label by the rule (`cycle{k}/pseudo_report.json`)")
    counts = labels.sum(0).astype(int)
    lines += ["", "Images per class in `train.csv` (an image counts once for each of its labels; the models "
              "never saw cell-level labels):", "", "| class | name | images |", "|---:|---|---:|"]
    lines += [f"| {c} | {CLASS_NAMES[c]} | {counts[c]} |" for c in range(NUM_CLASSES)]
    return lines + [""]


def _settings_section(cfg: Settings, run: Path) -> list[str]:
    im, cm, p, seg = cfg.image_model, cfg.cell_model, cfg.predict, cfg.segment
    used = run / "masks" / "train" / "segmenter.json"
    name = json.loads(used.read_text()).get("segmenter", seg.segmenter) if used.is_file() else seg.segmenter
    seg_detail = (f"{name}, work_size {seg.classical.work_size}" if name == "classical"
                  else f"{name}, scale_factor {seg.hpacellseg.scale_factor}")
    return [
        "## Settings that matter", "",
        f"- Profile `{cfg.profile}`, seed {cfg.seed}, device `{cfg.device}`.",
        f"- Image model: {im.arch}, {'pretrained from ' + im.pretrained if im.pretrained else 'random initialisation'}; "
        f"fields resized to {im.image_size} px, trained on {'whole fields' if im.train_crop is None else f'{im.train_crop}-px crops'} "
        f"for {_n(im.epochs, 'epoch')} of {im.samples_per_epoch or 'all'} samples (batch {im.batch_size}, lr {im.lr:g}, "
        f"{im.loss} loss), output stride {im.output_stride}, input normalisation `{im.input_norm}`.",
        f"- Segmentation: `segment.segmenter={seg.segmenter}` ({seg_detail}).",
        f"- Pseudo-labels: CAM score `{cfg.pseudo.score}`, isolated-cell view {'on' if cfg.pseudo.cell_view else 'off'}; "
        f"cycle 2 mixes in the cycle-1 cell model at weight {cfg.pseudo.cycle2.weight:g} and fills the cells its rule "
        f"leaves out with `{cfg.pseudo.cycle2.fill_targets}` targets.",
        f"- Cell model: the image model's backbone with a new 19-way head, {cm.crop_size}-px crops (box + "
        f"{cm.margin:g} margin, pixels outside the cell `{cm.outside}`{f' x{cm.dim_factor:g}' if cm.outside == 'dim' else ''}), "
        f"{_n(cm.epochs, 'epoch')} of {cm.samples_per_epoch or 'all'} cells, lr {cm.lr:g}, label smoothing {cm.label_smoothing:g}.",
        f"- Answers: `predict.cycle={p.cycle}`, `predict.combine={p.combine}`, `predict.negative={p.negative}`, "
        f"small-cell penalty {'on' if p.small_cell_penalty else 'off'}; flip TTA: image {cfg.cam.tta_flip}, "
        f"cell {cm.tta_flip}.",
        ""]


def _validation_section(run: Path) -> list[str]:
    lines = ["## Validation figures", "",
             "On the validation fold, which no model trained on. Cell models are scored against the validation "
             "images' pseudo-labels (the oracle against their true cell labels), so their figures measure agreement "
             "with the labelling, not accuracy on real cells; the test-split figures are in `report.md` (stage 07).",
             "", "| model | epoch | mAP | macro F1 | accuracy | file |", "|---|---:|---:|---:|---:|---|"]
    rows = [("image model (image level)", run / "image_model")] + \
           [(f"cycle-{k} cell model", run / f"cycle{k}" / "cell_model") for k in (1, 2)] + \
           [("oracle cell model", run / "oracle" / "cell_model")]
    found = False
    for name, folder in rows:
        m = _last_validated(folder / "metrics.csv")
        model = folder / "model.pt"
        if m is None and not model.is_file():
            continue
        found = True
        epoch = "-" if m is None else str(int(m["epoch"]))
        m = m or {}
        sha = f"`{model.relative_to(run)}` ({_sha1(model)})" if model.is_file() else "not trained"
        lines.append(f"| {name} | {epoch} | {_fmt(m.get('mAP'))} | {_fmt(m.get('f1'))} | {_fmt(m.get('acc'))} | {sha} |")
    if not found:
        lines.append("| (no model trained yet) | | | | | |")
    return lines + [""]


def _segmenter_section(run: Path) -> list[str]:
    path = run / "masks" / "train" / "segmenter.json"
    lines = ["## Segmenter", ""]
    if not path.is_file():
        return lines + ["No `masks/train/segmenter.json` (stage 03 has not run on the training split).", ""]
    rec = json.loads(path.read_text())
    settings = ", ".join(f"{k} {v}" for k, v in (rec.get("settings") or {}).items())
    return lines + [f"The training masks were made by the `{rec.get('segmenter')}` segmenter ({rec.get('reason')}); "
                    f"settings: {settings or '-'}. Stage 08 segments new fields with the run's `segment` settings, "
                    "the same way unless they are overridden.", ""]


def _usage_section(run: Path, cfg: Settings) -> list[str]:
    have = [k for k in (1, 2) if (run / f"cycle{k}" / "cell_model" / "model.pt").is_file()]
    cmd = f"python stages/08_predict_new.py --run {shlex.quote(str(run.resolve()))} --data DIR --out OUT"
    lines = ["## Predict new fields", "",
             "DIR is a folder of fields named `{ID}_{red,green,blue,yellow}.{png,tif,jpg}` (or the Kaggle layout, "
             "`DIR/test/`); OUT receives `submission.csv`, `cell_predictions.csv` and `viewer/index.html` "
             "(docs/predict.md):", "", "```bash", cmd, "```", ""]
    if not have:
        lines.append("No cell model is trained yet: run stage 05 first.")
    elif have == [1]:
        lines.append("Only the cycle-1 cell model is trained: add `--cycle 1`.")
    else:
        lines.append(f"It uses the cycle-{max(have)} cell model (`--cycle 1` for cycle 1) and the settings in "
                     "`RUN/config.yaml`; `key=value` arguments override them for that call only (e.g. `device=cuda`).")
    return lines + [""]


def write_model_card(run: str | os.PathLike, cfg: Settings) -> Path:
    """Write ``RUN/model_card.md`` (see the module docstring) and return its path.

    Args:
        run: the run folder. cfg: its settings (:func:`hpa.config.load_run_config`).
    """
    run = Path(run)
    parts = [f"# Model card: {run.resolve().name}", "",
             "A weakly supervised single-cell classifier of Human Protein Atlas fields: an image-level classifier "
             "trained on image labels, cell pseudo-labels from it, and a cell-level classifier trained on those "
             "(README.md). Each cell gets a confidence for each of the 19 classes of the 2021 HPA Single Cell "
             "Classification competition.", ""]
    parts += _data_section(cfg, run) + _settings_section(cfg, run) + _validation_section(run) + _segmenter_section(run)
    parts += _usage_section(run, cfg)
    return write_text(run / "model_card.md", "\n".join(parts))
