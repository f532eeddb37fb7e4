"""Stage 08: per-cell answers for new fields with a trained run's models.

No training and no ground truth; nothing is written into ``RUN``. For every field of ``DIR``:
decode it once (:func:`hpa.io.fields.read_field`), segment it the way the run's settings say
(``segment``; :func:`hpa.pipeline.segmentation.segmenter_settings`), give every cell its
confidences with the run's image model, its cell model of the chosen cycle and its rule
(``predict.combine``, ``negative``, ``small_cell_penalty``; :class:`hpa.cells.answer.FieldPredictor`),
and draw the viewer's picture (:func:`hpa.viewer.render.render_field`).

Which fields: ``DIR`` in the Kaggle layout (``DIR/{split}/`` with ``DIR/{split}.csv``, or for the
test split ``test.csv`` / ``sample_submission.csv``; without a CSV every ``{ID}_red.*`` file), or a
flat folder of channel files ``{ID}_{red,green,blue,yellow}.{png,tif,tiff,jpg,jpeg}`` (IDs from
the file names); ``ids_csv`` (a CSV with an ``ID`` column) picks the fields and their order in
either case.

Outputs under ``OUT``:

- ``fields/{ID}.parquet``: one row per cell (``ID, cell_id, x0, y0, x1, y1, area, rel_area,
  touches_border, conf0..conf18, rank0..rank18, mask``: the competition's mask string) and ``fields/{ID}.json``
  (size, cell count, wall-clock and CPU seconds per step, image probabilities; or ``status:
  skipped`` and the reason): written per field, the JSON last, so a re-run (or another shard) skips finished fields;
- ``viewer/{ID}.png`` per field and ``viewer/index.html`` (:mod:`hpa.viewer.page`);
- ``submission.csv`` (the competition's format, :mod:`hpa.eval.submission`), ``cell_predictions.csv``
  (``ID, cell_id, x0, y0, x1, y1, area, conf0..conf18, top_class, top_class_name, top_confidence,
  rank0..rank18``; top class = argmax of the 19 confidences; ``rank*``: the ranking confidences of
  ``predict.rank_combine``, comparable between fields, for ranking all cells by one class) and ``skipped.csv`` (``ID, reason``): written once every
  field is finished, by whichever call (or shard) finishes last;
- ``settings.json`` (the fields' folder, the run, the cycle, the models' checksums, the rule, the
  segmenter; resuming with others is an error unless ``force``), ``config.yaml`` (the run's
  settings with the overrides of this call) and ``logs/``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hpa.cells.combine import needs_cell_probs, needs_image_probs
from hpa.config import Settings
from hpa.constants import CLASS_NAMES, IMAGE_EXTENSIONS, NUM_CLASSES
from hpa.io.errors import InputError, check_same_settings
from hpa.pipeline.predict import CONF_COLS, RANK_COLS  # the confidences as stage 06 names them
from hpa.utils.fs import atomic_path, write_csv, write_json, write_parquet
from hpa.utils.parallel import map_jobs
from hpa.utils.shards import select_shard
from hpa.utils.timing import StepTimer

log = logging.getLogger(__name__)

CELL_COLS = (["ID", "cell_id", "x0", "y0", "x1", "y1", "area", "rel_area", "touches_border"] + CONF_COLS + RANK_COLS
             + ["mask"])
PREDICTION_COLS = (["ID", "cell_id", "x0", "y0", "x1", "y1", "area"] + CONF_COLS
                   + ["top_class", "top_class_name", "top_confidence"] + RANK_COLS)
#: Steps timed per field (``seconds`` of ``fields/{ID}.json``), in order.
STEPS = ("read", "segment", "geometry", "image_model", "crops", "cell_model", "combine", "write", "viewer")


# ------------------------------------------------------------------ which fields
@dataclass
class FieldSet:
    """The fields to predict: channel files in ``folder``, IDs in order, and where the IDs came from."""

    folder: Path
    ids: list[str]
    source: str


def ids_from_names(folder: str | os.PathLike) -> list[str]:
    """IDs of every ``{ID}_red.{ext}`` file in ``folder`` (extensions of :data:`hpa.constants.IMAGE_EXTENSIONS`), sorted."""
    folder = Path(folder)
    ids = set()
    for ext in IMAGE_EXTENSIONS:
        suffix = f"_red{ext}"
        ids |= {p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}") if len(p.name) > len(suffix)}
    return sorted(ids)


def find_fields(data_dir: str | os.PathLike, split: str = "test", ids_csv: str | os.PathLike | None = None) -> FieldSet:
    """The fields of ``data_dir`` (see the module docstring for the layouts); InputError when there are none."""
    from hpa.io.layout import read_ids

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"data folder {data_dir} does not exist")
    if (data_dir / split).is_dir():
        folder = data_dir / split
        csvs = [data_dir / f"{split}.csv"] + ([data_dir / "sample_submission.csv"] if split == "test" else [])
    else:
        folder, csvs = data_dir, []
    if ids_csv is not None:
        ids, source = read_ids(ids_csv), str(ids_csv)
    else:
        found = next((p for p in csvs if p.is_file()), None)
        ids, source = (read_ids(found), str(found)) if found else (ids_from_names(folder), f"file names in {folder}")
    if not ids:
        raise InputError(f"no fields in {data_dir}: expected {data_dir}/{split}/ (Kaggle layout) or channel files "
                         f"{{ID}}_{{red,green,blue,yellow}}.{{png,tif,jpg}} in {folder}" if ids_csv is None
                         else f"{ids_csv}: no IDs")
    return FieldSet(folder, [str(i) for i in ids], source)


# ------------------------------------------------------------------ the run's models
def resolve_cycle(run: str | os.PathLike, cfg: Settings, cycle: int | None = None) -> int:
    """The cycle whose cell model answers: ``cycle`` if given, else ``predict.cycle`` (``last``: the
    highest cycle with a trained cell model). FileNotFoundError naming the model file when absent."""
    run = Path(run)
    wanted = cycle if cycle is not None else cfg.predict.cycle
    if wanted == "last":
        have = [k for k in (1, 2) if cell_model_path(run, k).is_file()]
        if not have:
            raise FileNotFoundError(f"no cell model in {run}/cycle1 or cycle2 (cell_model/model.pt): train the run "
                                    "first (stage 05)")
        return max(have)
    k = int(wanted)
    if not cell_model_path(run, k).is_file():
        hint = " (or --cycle 1)" if k == 2 else ""
        raise FileNotFoundError(f"{cell_model_path(run, k)} not found: train the cycle-{k} cell model first "
                                f"(stage 05 --cycle {k}){hint}")
    return k


def cell_model_path(run: Path, cycle: int) -> Path:
    return Path(run) / f"cycle{cycle}" / "cell_model" / "model.pt"


def image_model_path(run: Path) -> Path:
    return Path(run) / "image_model" / "model.pt"


def prediction_signature(run: Path, cfg: Settings, cycle: int, segmenter: str, segmenter_kw: dict,
                         viewer_size: int, folder: Path) -> dict:
    """What the answers depend on (``OUT/settings.json``): resuming with anything else is an error."""
    from hpa.pipeline.cams import file_sha1

    p = cfg.predict
    uses_image = needs_image_probs(p.combine, p.negative) or needs_image_probs(p.rank_combine, p.negative)
    return {"fields": str(Path(folder).resolve()), "run": str(Path(run).resolve()), "cycle": int(cycle),
            "cell_model_sha1": file_sha1(cell_model_path(run, cycle)),
            "image_model_sha1": file_sha1(image_model_path(run)) if uses_image else None,
            "combine": p.combine, "rank_combine": p.rank_combine, "negative": p.negative,
            "small_cell_penalty": p.small_cell_penalty, "image_tta_flip": cfg.cam.tta_flip if uses_image else None, "cell_tta_flip": cfg.cell_model.tta_flip,
            "segmenter": segmenter, "segmenter_settings": {k: v for k, v in segmenter_kw.items() if k != "device"},
            "viewer_size": int(viewer_size)}


# ------------------------------------------------------------------ one field (in a worker)
_WORKER: dict = {}


def _init_worker(spec: dict) -> None:
    """Build the segmenter and load the models once per process."""
    import cv2

    from hpa.cells.answer import FieldPredictor
    from hpa.segment import get_segmenter

    if spec["workers"] > 1:
        cv2.setNumThreads(1)
    predictor = FieldPredictor.from_files(spec["cell_model"], spec["image_model"], **spec["predictor"])
    _WORKER.update(spec, segmenter=get_segmenter(spec["segmenter"], **spec["segmenter_kw"]), predictor=predictor)


def field_record_paths(out: Path, image_id: str) -> tuple[Path, Path]:
    """``(fields/{ID}.parquet, fields/{ID}.json)`` of a field; the JSON marks it finished."""
    d = Path(out) / "fields"
    return d / f"{image_id}.parquet", d / f"{image_id}.json"


def _seconds(timer: StepTimer) -> dict:
    return {"seconds": {k: round(v, 4) for k, v in timer.wall.items()},
            "cpu_seconds": {k: round(v, 4) for k, v in timer.cpu.items()}}


def _skip(image_id: str, folder: Path, out: Path, reason: str, timer: StepTimer) -> dict:
    from hpa.io.fields import field_size

    try:
        h, w = field_size(folder, image_id)
    except InputError:
        h = w = None
    rec = {"ID": image_id, "status": "skipped", "reason": reason, "height": h, "width": w, "n_cells": 0,
           **_seconds(timer)}
    write_json(field_record_paths(out, image_id)[1], rec)
    return rec


def _field_job(image_id: str) -> dict:
    """Answer one field and write its records (and its picture); returns the JSON record."""
    from hpa.eval.submission import cell_mask_strings
    from hpa.io.fields import read_field, write_png
    from hpa.viewer.render import render_field

    w = _WORKER
    out, folder = Path(w["out"]), Path(w["folder"])
    timer = StepTimer(STEPS)
    try:
        with timer.step("read"):
            field = read_field(folder, image_id)
        with timer.step("segment"):
            cells, _ = w["segmenter"].segment(field)
    except InputError as exc:
        if not w["skip_bad"]:
            raise InputError(f"{exc} (set on_bad_image=skip to leave such fields out)") from None
        log.warning("skipping field %s: %s", image_id, exc)
        return _skip(image_id, folder, out, str(exc), timer)
    ans = w["predictor"].predict(field, cells)
    timer.update(ans.timer)
    with timer.step("write"):
        table = ans.cells[["cell_id", "x0", "y0", "x1", "y1", "area", "rel_area", "touches_border"]].copy()
        table.insert(0, "ID", image_id)
        table[CONF_COLS] = ans.conf
        table[RANK_COLS] = ans.rank
        table["mask"] = cell_mask_strings(cells, table["cell_id"].to_numpy()) if len(table) else []
        parquet, record = field_record_paths(out, image_id)
        write_parquet(parquet, table[CELL_COLS])
    if w["viewer_size"]:
        with timer.step("viewer"):
            pic = render_field(field, cells, table["cell_id"].to_numpy(), ans.conf, image_id, w["viewer_size"])
            write_png(out / "viewer" / f"{image_id}.png", pic)
    rec = {"ID": image_id, "status": "ok", "height": int(cells.shape[0]), "width": int(cells.shape[1]),
           "n_cells": int(len(table)), **_seconds(timer),
           "image_probs": None if ans.image_probs is None else [float(v) for v in ans.image_probs]}
    write_json(record, rec)  # last: the field is finished
    return rec


# ------------------------------------------------------------------ the stage
def predict_new(run: str | os.PathLike, data_dir: str | os.PathLike, out: str | os.PathLike, cfg: Settings, *,
                cycle: int | None = None, split: str = "test", ids_csv: str | os.PathLike | None = None,
                shard: tuple[int, int] = (0, 1), workers: int | None = None, viewer_size: int = 1024,
                force: bool = False, progress: bool = True) -> dict:
    """Stage 08 (see the module docstring).

    Args:
        run: the trained run (read only). data_dir, split, ids_csv: the fields (:func:`find_fields`).
        out: output folder. cfg: the run's settings with this call's overrides (``on_bad_image``,
            ``device``, ``num_workers``, ``predict``, ``segment`` are read).
        cycle: 1 or 2 (None: ``predict.cycle``). shard: ``(i, N)``: every N-th field from the i-th.
        workers: processes (None: ``num_workers``). viewer_size: longest side of the viewer's
            pictures (0: no viewer). force: redo finished fields.
    Returns:
        ``{"fields", "computed", "done_before", "skipped", "complete", "cycle"}`` (counts of this call's shard).
    """
    from hpa.config import resolve_device, save_config
    from hpa.io.layout import check_images_exist
    from hpa.pipeline.segmentation import segmenter_settings

    run, out = Path(run), Path(out)
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
        raise InputError(f"--out {out} lies inside the run {run}: stage 08 writes nothing into the run")
    fs = find_fields(data_dir, split, ids_csv)
    k = resolve_cycle(run, cfg, cycle)
    device = resolve_device(cfg.device)
    seg_name, seg_kw, reason = segmenter_settings(cfg.segment, device)
    _compare_segmenter(run, seg_name)
    signature = prediction_signature(run, cfg, k, seg_name, seg_kw, viewer_size, fs.folder)
    check_same_settings(out / "settings.json", signature, force, "answers",
                        "use another --out folder, or --force to redo every field")
    write_json(out / "settings.json", signature)
    save_config(out, cfg)
    mine = select_shard(fs.ids, shard)
    if cfg.on_bad_image == "error":
        check_images_exist(fs.folder, mine)  # fail before long work
    todo = [i for i in mine if force or not field_record_paths(out, i)[1].is_file()]
    stats = {"fields": len(mine), "computed": 0, "done_before": len(mine) - len(todo), "skipped": 0, "cycle": k}
    log.info("stage 08: %d field(s) of %s (IDs from %s), shard %d/%d: %d done before, %d to answer with the cycle-%d "
             "cell model of %s; segmenter %s (%s)", len(mine), fs.folder, fs.source, shard[0], shard[1],
             stats["done_before"], len(todo), k, run, seg_name, reason)
    workers = cfg.num_workers if workers is None else int(workers)
    spec = _worker_spec(run, k, cfg, fs.folder, out, workers, viewer_size, seg_name, seg_kw, device)
    try:
        for rec in map_jobs(_field_job, todo, workers, desc="predict fields", initializer=_init_worker,
                            initargs=(spec,), ordered=False, progress=progress):
            stats["computed"] += 1
            stats["skipped"] += rec["status"] == "skipped"
    finally:
        _WORKER.clear()
    missing = [i for i in fs.ids if not field_record_paths(out, i)[1].is_file()]
    stats["complete"] = not missing
    if missing:
        log.info("%d of %d fields not answered yet (other shards?): the summary files wait for them", len(missing),
                 len(fs.ids))
    elif stats["computed"] or force or not _outputs_exist(out, viewer_size):
        write_outputs(out, fs.ids, viewer_size > 0, about=_about(run, k, cfg))
    return stats


def _worker_spec(run: Path, cycle: int, cfg: Settings, folder: Path, out: Path, workers: int, viewer_size: int,
                 seg_name: str, seg_kw: dict, device: str) -> dict:
    """Everything a worker needs to answer fields (:func:`_init_worker`), picklable."""
    p = cfg.predict
    return {"out": str(out), "folder": str(folder), "skip_bad": cfg.on_bad_image == "skip",
            "viewer_size": int(viewer_size), "workers": workers, "segmenter": seg_name, "segmenter_kw": seg_kw,
            "cell_model": (str(cell_model_path(run, cycle)) if needs_cell_probs(p.combine)
                           or needs_cell_probs(p.rank_combine) else None),
            "image_model": (str(image_model_path(run)) if needs_image_probs(p.combine, p.negative)
                            or needs_image_probs(p.rank_combine, p.negative) else None),
            "predictor": {"combine": p.combine, "rank_combine": p.rank_combine, "negative": p.negative,
                          "small_cell_penalty": p.small_cell_penalty,
                          "image_tta_flip": cfg.cam.tta_flip, "cell_tta_flip": cfg.cell_model.tta_flip,
                          "batch_size": cfg.cell_model.predict_batch_size, "amp": cfg.cell_model.amp,
                          "device": device}}


def _compare_segmenter(run: Path, name: str) -> None:
    for split in ("test", "train"):
        path = run / "masks" / split / "segmenter.json"
        if path.is_file():
            used = json.loads(path.read_text()).get("segmenter")
            if used and used != name:
                log.warning("the run's %s masks were made with the %s segmenter; these fields are segmented with %s "
                            "(settings segment.*): answers may differ from the run's own", split, used, name)
            return


def _about(run: Path, cycle: int, cfg: Settings) -> str:
    p = cfg.predict
    rule = {"cell": "the cell model's probabilities", "product": "cell probability x image probability",
            "mean": "the mean of cell and image probabilities", "image": "the image probabilities",
            "product_max": "cell probability x image probability x the field's highest cell probability"}[p.combine]
    return (f"Answers of the cycle-{cycle} cell model of run {Path(run).resolve()}: confidence = {rule} (Negative: "
            f"{p.negative}){', lowered for small cells and cells cut by the border' if p.small_cell_penalty else ''}.")


def _outputs_exist(out: Path, viewer: int) -> bool:
    names = ["submission.csv", "cell_predictions.csv", "skipped.csv"] + (["viewer/index.html"] if viewer else [])
    return all((out / n).is_file() for n in names)


# ------------------------------------------------------------------ the summary files
def _records(out: Path, ids: list[str]):
    """``(ID, json record, cell table or None)`` of every field, one at a time (memory flat in the fields)."""
    for image_id in ids:
        parquet, record = field_record_paths(out, image_id)
        rec = json.loads(record.read_text())
        table = pd.read_parquet(parquet) if rec["status"] == "ok" else None
        yield image_id, rec, table


def write_outputs(out: str | os.PathLike, ids: list[str], viewer: bool = True, about: str = "") -> dict[str, Path]:
    """``submission.csv``, ``cell_predictions.csv``, ``skipped.csv`` and ``viewer/index.html`` from the
    per-field records of ``ids`` (all finished), streamed field by field."""
    from hpa.eval.submission import format_predictions, write_submission_rows
    from hpa.viewer.page import ViewerField, write_viewer

    out = Path(out)
    skipped, pages = [], []
    no_size = []

    def rows():
        for image_id, rec, table in _records(out, ids):
            if rec["status"] != "ok":
                skipped.append((image_id, rec["reason"]))
                pages.append(ViewerField(image_id, None, rec["width"] or 0, rec["height"] or 0, np.zeros(0, np.int64),
                                         np.zeros(0, np.int64), np.zeros((0, NUM_CLASSES)), f"skipped: {rec['reason']}"))
                if rec["width"] is None:
                    no_size.append(image_id)  # no readable header: no row can be written for it
                    continue
                yield image_id, rec["width"], rec["height"], ""
                continue
            conf = table[CONF_COLS].to_numpy(np.float32)
            pred_rows.write(table, conf, table[RANK_COLS].to_numpy(np.float32))
            if viewer:
                pages.append(ViewerField(image_id, f"{image_id}.png", rec["width"], rec["height"],
                                         table["cell_id"].to_numpy(), table["area"].to_numpy(), conf))
            yield image_id, rec["width"], rec["height"], format_predictions(table["mask"].tolist(), conf)

    paths = {}
    with _PredictionWriter(out / "cell_predictions.csv") as pred_rows:
        paths["submission"] = write_submission_rows(out / "submission.csv", rows())
    paths["cell_predictions"] = out / "cell_predictions.csv"
    paths["skipped"] = write_csv(out / "skipped.csv", pd.DataFrame(skipped, columns=["ID", "reason"]))
    if no_size:
        log.warning("%d skipped field(s) without any readable channel header have no submission row: %s", len(no_size),
                    ", ".join(no_size[:5]))
    if skipped:
        log.warning("%d field(s) skipped as unreadable: see %s", len(skipped), paths["skipped"])
    if viewer:
        paths["viewer"] = write_viewer(out / "viewer" / "index.html", pages, "Cell answers", about)
    log.info("wrote %s, %s and %s (%d fields, %d skipped)", paths["submission"], paths["cell_predictions"],
             paths.get("viewer", "no viewer"), len(ids), len(skipped))
    return paths


class _PredictionWriter:
    """``cell_predictions.csv`` written field by field into a temporary file, renamed when complete."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._f = open(tmp, "w", newline="")
        self._w = csv.writer(self._f)
        self._w.writerow(PREDICTION_COLS)
        return self

    def write(self, table: pd.DataFrame, conf: np.ndarray, rank: np.ndarray) -> None:
        if not len(table):
            return
        top = conf.argmax(1)
        geo = table[["ID", "cell_id", "x0", "y0", "x1", "y1", "area"]].itertuples(index=False)
        for (image_id, cid, x0, y0, x1, y1, area), row, c, r in zip(geo, conf, top, rank):
            self._w.writerow([image_id, int(cid), int(x0), int(y0), int(x1), int(y1), int(area)]
                             + [str(v) for v in row] + [int(c), CLASS_NAMES[c], str(row[c])] + [str(v) for v in r])

    def __exit__(self, *exc):
        self._f.close()
        return self._ctx.__exit__(*exc)
