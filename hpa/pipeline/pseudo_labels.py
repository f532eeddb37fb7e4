"""Stage 04 orchestration: the train cell table, pseudo-labels of a cycle, their report.

The cell table of a split (``RUN/cells/{split}.parquet``, also used by stage 06 for test) is
built image by image, so it can be built in shards: shard ``(i, N)`` takes every N-th usable
image and writes ``RUN/cells/{split}.shard-i-of-N.parquet``; the whole-split table is the
shards' rows joined in the split's image order (:func:`merge_cell_tables`), identical to the
table one process builds. Thresholds are global, so pseudo-labels need the whole table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from hpa.cells.pseudo_rules import (
    assign_labels,
    cam_evidence,
    cell_model_evidence,
    class_thresholds,
    coverage,
    diagnostics,
    fill_labels,
    fill_targets,
    label_sets,
    mixed_evidence,
    top_cell_per_label,
)
from hpa.cells.table import build_cell_table
from hpa.config import PseudoSettings, Settings
from hpa.constants import NEGATIVE, NUM_CLASSES, PROB_COLS, TARGET_COLS
from hpa.eval import gt as gtmod
from hpa.io.errors import InputError
from hpa.io.fields import read_mask
from hpa.io.layout import list_split
from hpa.utils.fs import write_json, write_parquet
from hpa.utils.shards import (
    merge_shard_tables,
    merge_when_complete,
    missing_shards,
    select_shard,
    shard_path,
    shard_sets,
)
from hpa.utils.timing import stage_timer

log = logging.getLogger(__name__)


def cell_table_path(run: str | Path, split: str, shard: tuple[int, int] = (0, 1)) -> Path:
    """``RUN/cells/{split}.parquet``, or ``RUN/cells/{split}.shard-i-of-N.parquet`` for shard i of N."""
    return shard_path(Path(run) / "cells" / f"{split}.parquet", shard)


def cell_table(run: Path, data_dir: Path, split: str, topk_frac: float, work_size: int, force: bool = False,
               view: bool = True, device: str = "cpu", amp: str = "auto") -> pd.DataFrame:
    """``RUN/cells/{split}.parquet``, built from masks and CAMs when missing (or ``force``).

    ``view``: add the image model's isolated-cell probabilities (``view_p*``, :mod:`hpa.cells.view`),
    computed on ``device`` with mixed precision ``amp`` (``image_model.amp``).

    When it is missing but a complete set of shard tables exists (:func:`build_cell_table_shard`),
    the shards are joined instead; an incomplete set is an error naming the missing shards
    (``force`` builds the whole table here and ignores the shards).
    """
    run, data_dir = Path(run), Path(data_dir)
    path = cell_table_path(run, split)
    if path.is_file() and not force:
        return pd.read_parquet(path)
    if not force:
        sets = shard_sets(path)
        complete = [n for n, have in sets.items() if len(have) == n]
        if len(complete) == 1:
            return merge_cell_tables(run, data_dir, split, complete[0])
        if sets:
            detail = "; ".join(f"N={n}: missing {missing_shards(path, n)}" for n, have in sets.items()
                               if len(have) < n)
            raise InputError(f"{path.parent}: cannot tell which shard tables of {split} to join "
                             f"({detail or 'complete sets for N=' + ', '.join(map(str, complete))}); run the missing "
                             f"shards or --merge N, or --force to build the whole table in one process")
    ids = usable_ids(run, split, list_split(data_dir, split)[0])
    table = build_cell_table(ids, run / "masks" / split, run / "cams" / split, topk_frac, work_size,
                             _viewer(run, data_dir, split, view, device, amp))
    write_parquet(path, table)
    log.info("cell table %s: %d cells in %d images -> %s", split, len(table), len(ids), path)
    return table


def build_cell_table_shard(run: str | Path, data_dir: str | Path, split: str, shard: tuple[int, int],
                           topk_frac: float, work_size: int, force: bool = False, view: bool = True,
                           device: str = "cpu", amp: str = "auto") -> Path:
    """Build the cell table of shard ``(i, N)`` (every N-th usable image from the i-th).

    Writes ``RUN/cells/{split}.shard-i-of-N.parquet`` (kept unless ``force``) and, once every
    shard's table exists, the whole split's ``RUN/cells/{split}.parquet``
    (:func:`merge_cell_tables`). Returns the shard table's path.
    """
    run, data_dir = Path(run), Path(data_dir)
    path = cell_table_path(run, split, shard)
    if force or not path.is_file():
        ids = usable_ids(run, split, list_split(data_dir, split)[0])
        mine = select_shard(ids, shard)
        table = build_cell_table(mine, run / "masks" / split, run / "cams" / split, topk_frac, work_size,
                                 _viewer(run, data_dir, split, view, device, amp))
        write_parquet(path, table)
        log.info("cell table %s shard %d/%d: %d cells in %d images -> %s", split, shard[0], shard[1], len(table),
                 len(mine), path)
    merge_when_complete(cell_table_path(run, split), shard, lambda n: merge_cell_tables(run, data_dir, split, n))
    return path


def cell_table_shard_stage(run: str | Path, cfg: Settings, split: str, shard: tuple[int, int], stage: str,
                           force: bool = False) -> Path:
    """What stages 04 (train) and 06 (test) do with ``--shard i/N``: build, time and report one shard table."""
    from hpa.config import resolve_device

    p = cfg.pseudo
    with stage_timer(run, f"{stage}_cell_table_{split}_shard{shard[0]}of{shard[1]}"):
        path = build_cell_table_shard(run, cfg.data, split, shard, p.topk_frac, p.work_size, force=force,
                                      view=p.cell_view, device=resolve_device(cfg.device), amp=cfg.image_model.amp)
    print(f"cell table shard: {path}")
    return path


def merge_cell_tables(run: str | Path, data_dir: str | Path, split: str, n_shards: int) -> pd.DataFrame:
    """Join the N shard tables of a split into ``RUN/cells/{split}.parquet`` (written atomically).

    Rows follow the split's image order (``DATA/{split}.csv``), as in a table built in one
    process. Raises FileNotFoundError listing the shard tables that are missing.
    """
    run, data_dir = Path(run), Path(data_dir)
    try:
        return merge_shard_tables(cell_table_path(run, split), n_shards, list_split(data_dir, split)[0], pd.read_parquet,
                                  write_parquet, f"{split} cell table")
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _viewer(run: Path, data_dir: Path, split: str, view: bool, device: str = "cpu", amp: str = "auto"):
    """The isolated-cell viewer of the run's image model on ``device``, or None (``view`` off, or no image model)."""
    if not view:
        return None
    if not (run / "image_model" / "model.pt").is_file():
        log.info("%s has no image model: the %s cell table gets no isolated-cell probabilities", run, split)
        return None
    from hpa.cells.view import CellViewer

    return CellViewer(run, data_dir, split, device=device, amp=amp)


def usable_ids(run: Path, split: str, ids: list[str]) -> list[str]:
    """IDs minus images an earlier stage recorded as skipped (``skipped.csv`` of masks or cams)."""
    skipped = set()
    for p in (run / "masks" / split / "skipped.csv", run / "cams" / split / "skipped.csv"):
        if p.is_file():
            skipped |= set(pd.read_csv(p, dtype={"ID": str})["ID"])
    if skipped:
        log.warning("%d %s image(s) skipped by earlier stages are left out (see skipped.csv)", len(skipped), split)
    return [i for i in ids if i not in skipped]


def load_cell_probs(path: Path, table: pd.DataFrame) -> np.ndarray:
    """Cell-model probabilities (N, 19) aligned to ``table``'s (ID, cell_id) rows."""
    if not path.is_file():
        raise InputError(f"{path} not found: train the previous cycle's cell model first (stage 05)")
    probs = pd.read_parquet(path)
    merged = table[["ID", "cell_id"]].merge(probs, on=["ID", "cell_id"], how="left", validate="one_to_one")
    if merged[PROB_COLS].isna().any().any():
        n = int(merged[PROB_COLS[0]].isna().sum())
        raise InputError(f"{path}: no probabilities for {n} cells of the cell table (masks changed since?)")
    return merged[PROB_COLS].to_numpy(np.float32)


def make_pseudo_labels(run: str | Path, data_dir: str | Path, cycle: int, p: PseudoSettings,
                       force: bool = False, device: str = "cpu", amp: str = "auto") -> pd.DataFrame:
    """Write ``RUN/cycle{k}/pseudo_labels.parquet`` and ``pseudo_report.json``; return the labels.

    ``p``: the ``pseudo`` settings section (its ``cycle2`` part applies from cycle 2 on). device, amp:
    where and how the isolated-cell view of the cell table runs (:class:`hpa.cells.view.CellViewer`).
    """
    run, data_dir = Path(run), Path(data_dir)
    table = cell_table(run, data_dir, "train", p.topk_frac, p.work_size, force=force, view=p.cell_view,
                       device=device, amp=amp)
    ids, y = list_split(data_dir, "train")
    label_of = dict(zip(ids, y))
    img_labels = np.stack([label_of[i] for i in table["ID"]]) if len(table) else np.zeros((0, NUM_CLASSES))
    ev = cam_evidence(table, img_labels, p.score, p.times_image_prob, p.view_weight)
    negative_image = (img_labels[:, NEGATIVE] == 1) & (img_labels[:, :NEGATIVE].sum(1) == 0)
    raw = probs = None
    if cycle > 1:
        raw = load_cell_probs(run / f"cycle{cycle - 1}" / "cell_probs_train.parquet", table)
        probs = cell_model_evidence(raw, p.cycle2.evidence)
    q = p.pos_quantile if cycle == 1 else p.cycle2.pos_quantile
    label, conf, thr = assign_labels(ev, negative_image, q, p.pos_min, p.neg_threshold, probs, p.cycle2.weight)
    mixed = mixed_evidence(ev, probs, p.cycle2.weight)  # cycle 1: ev itself
    extra: dict[int, list[int]] = {}
    top_report = None
    if p.top_cell_per_label:  # every image class reaches at least one of the image's cells
        label, conf, extra, top_report = _top_cells(label, conf, mixed, table["ID"].to_numpy(), p.multi_label)
    out = table[["ID", "cell_id"]].copy()
    out["label"], out["confidence"], out["weight"] = label, conf, 1.0
    sets = None
    if p.multi_label:  # cycle 2: cycle 1's rule keeps its secondary classes (hpa.cells.pseudo_rules.label_sets)
        also = None if probs is None else (ev, class_thresholds(ev, p.pos_quantile, p.pos_min))
        rel = p.cycle2.secondary_rel if probs is not None else 0.0
        sets = label_sets(mixed, label, thr, also, rel)
        for j, cs in extra.items():
            sets[j] += [c for c in cs if c not in sets[j]]
        out["labels"] = ["|".join(map(str, c)) for c in sets]
    report = {"cycle": cycle, "thresholds": thr.tolist(), "coverage": coverage(label)}
    if top_report is not None:
        report["top_cell_per_label"] = top_report
    filled = np.zeros(len(label), bool)
    if raw is not None and p.cycle2.fill_weight > 0:
        filled, report["filled"] = _fill(out, label, conf, raw, img_labels, p.cycle2.fill_weight,
                                         p.cycle2.fill_targets)
    if gtmod.has_gt(data_dir):
        truth = true_label_sets(run, data_dir, table)
        report["vs_ground_truth"] = diagnostics(label, truth, sets)
        log.info("cycle %d pseudo-labels: %.1f%% of cells labelled, precision %.3f against ground truth", cycle,
                 100 * report["coverage"]["labelled"], report["vs_ground_truth"]["overall_precision"])
        if filled.any():
            report["filled"]["vs_ground_truth"] = diagnostics(np.where(filled, out["label"], -1), truth)
            log.info("cycle %d: %d left-out cells filled from the cell model at weight %.2f, precision %.3f", cycle,
                     int(filled.sum()), p.cycle2.fill_weight, report["filled"]["vs_ground_truth"]["overall_precision"])
    out = out[out["label"] >= 0].reset_index(drop=True)
    cdir = run / f"cycle{cycle}"
    write_json(cdir / "pseudo_report.json", report)
    write_parquet(cdir / "pseudo_labels.parquet", out)  # last: its presence makes stage 04 skip the cycle
    return out


def _top_cells(label: np.ndarray, conf: np.ndarray, evidence: np.ndarray, image_ids: np.ndarray,
               multi_label: bool) -> tuple[np.ndarray, np.ndarray, dict[int, list[int]], dict]:
    """Apply :func:`top_cell_per_label`: a left-out or Negative top cell takes the class as its label; a
    positive one gets it added to its label set (with ``multi_label``; otherwise it keeps its label alone).

    Returns the new labels and confidences, ``{row: [added classes]}`` and the report entry.
    """
    label, conf = label.copy(), conf.copy()
    extra: dict[int, list[int]] = {}
    relabelled = np.zeros(NUM_CLASSES, np.int64)
    added = np.zeros(NUM_CLASSES, np.int64)
    for j, c in top_cell_per_label(label, evidence, image_ids):
        if label[j] < 0 or label[j] == NEGATIVE:
            label[j], conf[j] = c, evidence[j, c]
            relabelled[c] += 1
        elif multi_label:
            extra.setdefault(j, []).append(c)
            added[c] += 1
    log.info("top cell per image class: %d cells labelled, %d label sets extended", relabelled.sum(), added.sum())
    return label, conf, extra, {"relabelled": relabelled.tolist(), "added_to_sets": added.tolist()}


def _fill(out: pd.DataFrame, label: np.ndarray, conf: np.ndarray, raw: np.ndarray, img_labels: np.ndarray,
          weight: float, kind: str) -> tuple[np.ndarray, dict]:
    """Give the cells the rule left out (label -1) the cell model's labels, in place in ``out``.

    ``kind``: ``hard`` (its best allowed class) or ``soft`` (its probabilities over the allowed
    classes as ``t0..t18`` targets). Returns the filled rows (bool) and their report entry.
    """
    full = fill_labels(label, raw, img_labels)
    filled = label < 0
    out["label"] = full
    out["confidence"] = np.where(filled, raw[np.arange(len(full)), full], conf).astype(np.float32)
    out["weight"] = np.where(filled, weight, 1.0).astype(np.float32)
    if "labels" in out.columns:
        out.loc[filled, "labels"] = full[filled].astype(str)
    if kind == "soft":  # the cell model's probabilities over the allowed classes, not its top class
        soft = np.full((len(out), NUM_CLASSES), np.nan, np.float32)
        soft[filled] = fill_targets(raw[filled], img_labels[filled])
        out[TARGET_COLS] = soft
    return filled, {"weight": weight, "targets": kind, **coverage(np.where(filled, full, -1))}


def true_label_sets(run: Path, data_dir: Path, table: pd.DataFrame, split: str = "train") -> list[list[int] | None]:
    """True classes of each row of ``table`` (None for cells without a true partner). Diagnostic only."""
    labels = gtmod.read_cell_labels(data_dir, split)
    truth: dict[tuple[str, int], list[int]] = {}
    for image_id in table["ID"].unique():
        pred = read_mask(run / "masks" / split / f"{image_id}_cellmask.png")
        transfer = gtmod.transfer_labels(pred, gtmod.read_gt_mask(data_dir, image_id), labels.get(image_id, {}))
        truth.update({(image_id, c): t for c, t in transfer.items()})
    return [truth.get((i, int(c))) for i, c in zip(table["ID"], table["cell_id"])]
