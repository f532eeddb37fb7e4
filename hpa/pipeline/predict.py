"""Stage 06: per-cell confidences of every method on the test split, and the submission.

The methods (stage 07 scores them side by side, all on the same predicted masks):

1. ``broadcast``: the image model's probabilities given to every cell (no CAM, no cell model);
2. ``cam``: cell CAM score x image probability (:func:`hpa.cells.combine.cam_confidences`);
   ``cellview``: the image model's probability for the cell alone x image probability
   (:func:`hpa.cells.combine.view_confidences`; when the cell table has ``view_p*`` columns);
3. ``cycle1`` / 4. ``cycle2``: the cell model of that cycle combined with the image model
   by :func:`hpa.cells.combine.combine` with the run's ``predict`` settings;
   ``ranking``: the submitted cell model combined by ``predict.rank_combine`` instead, the
   per-cell output for ranking cells across images (``rank*`` columns of the predictions);
5. ``oracle``: the same cell classifier and budget trained on the true cell labels (upper bound).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from hpa.cells.combine import (
    aligned_cell_probs,
    cam_confidences,
    combine,
    quality_factor,
    rule_confidences,
    view_confidences,
)
from hpa.cells.table import IMG_COLS, VIEW_COLS
from hpa.config import PredictSettings, Settings
from hpa.constants import NUM_CLASSES
from hpa.io.fields import read_mask

log = logging.getLogger(__name__)

CONF_COLS = [f"conf{c}" for c in range(NUM_CLASSES)]
RANK_COLS = [f"rank{c}" for c in range(NUM_CLASSES)]
METHODS = ("broadcast", "cam", "cellview", "cycle1", "cycle2", "oracle")


def last_cycle(run: Path) -> int:
    """Highest cycle whose test-cell probabilities exist (0 when none)."""
    done = [k for k in (1, 2) if (run / f"cycle{k}" / "cell_probs_test.parquet").is_file()]
    return max(done) if done else 0


def cell_probs_path(run: Path, method: str) -> Path:
    folder = "oracle" if method == "oracle" else method
    return run / folder / "cell_probs_test.parquet"


def method_confidences(run: Path, table: pd.DataFrame, method: str, p: PredictSettings, score: str = "topk_mean",
                       combine_method: str | None = None, negative: str | None = None,
                       penalty: bool | None = None) -> np.ndarray | None:
    """Confidences (N, 19) of ``method`` for the cells of ``table``; None when its inputs are missing.

    ``p`` is the ``predict`` settings section; the keyword arguments override it (ablations).
    """
    penalty = p.small_cell_penalty if penalty is None else penalty
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
    return rule_confidences(img, cell, table["rel_area"], table["touches_border"], combine_method or p.combine,
                            negative or p.negative, penalty, table["ID"].to_numpy())


def final_method(run: Path, p: PredictSettings) -> str:
    """The cell model the submission uses: ``predict.cycle`` (last | 1 | 2)."""
    cyc = last_cycle(run) if p.cycle == "last" else int(p.cycle)
    if cyc == 0 or not cell_probs_path(run, f"cycle{cyc}").is_file():
        raise FileNotFoundError(f"no cell-model predictions for the test split in {run}/cycle{cyc or 1}: run stage 05 first")
    return f"cycle{cyc}"


def predict_test(run: str | Path, cfg: Settings, force: bool = False, device: str = "cpu") -> tuple[Path, Path]:
    """Stage 06: confidences of every test cell -> ``RUN/predictions_test.parquet`` and ``RUN/submission.csv``.

    Uses the cell model chosen by ``predict.cycle`` combined with the image model by
    :func:`hpa.cells.combine.combine`: ``conf*`` columns and the submission by ``predict.combine``
    (the competition's scoring), ``rank*`` columns by ``predict.rank_combine`` (confidences
    comparable between images, for ranking all cells by one class; docs/cell_model.md). Every test image gets a row in the submission, an empty
    prediction string when no cell was found in it or when an earlier stage skipped it as
    unreadable (its size then comes from its channel files' headers). ``device``: where the
    isolated-cell view of the test cell table runs (``image_model.amp`` mixed precision).
    """
    from hpa.eval.submission import write_submission
    from hpa.io.fields import field_size
    from hpa.io.layout import list_split
    from hpa.pipeline.pseudo_labels import cell_table, usable_ids

    run, data_dir = Path(run), Path(cfg.data)
    p, sc = cfg.predict, cfg.pseudo
    table = cell_table(run, data_dir, "test", sc.topk_frac, sc.work_size, force=force, view=sc.cell_view,
                       device=device, amp=cfg.image_model.amp)
    method = final_method(run, p)
    conf = method_confidences(run, table, method, p, sc.score)
    preds = table[["ID", "cell_id", "x0", "y0", "x1", "y1", "area"]].copy()
    preds[CONF_COLS] = conf
    preds[RANK_COLS] = method_confidences(run, table, method, p, sc.score, p.rank_combine)
    preds.insert(2, "model", method)
    from hpa.utils.fs import write_parquet

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
