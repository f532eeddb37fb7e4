"""Score a submission against a data set's ground truth.

Command line::

    python -m hpa.score SUBMISSION_CSV DATA_DIR [--split test] [--mode oid|strict] [--iou 0.6]
        [--iou-type mask|box]

Ground truth lives in ``DATA_DIR/gt/``: ``{ID}_cellmask.png`` (cell instance masks,
read with :func:`hpa.io.fields.read_mask`) and ``cell_labels.csv`` with columns
``ID,cell_id,Label,split`` (Label: classes joined by ``|``, 18 = Negative). Only rows of
the chosen split count (``--split all``: every row). An image without any true cell has
no row there: it belongs to the split's ground truth when ``DATA_DIR/{split}.csv`` lists it
and ``gt/{ID}_cellmask.png`` exists (a mask without cells); its predictions are false
positives in ``strict`` mode and ignored in ``oid`` mode. Prints a per-class table and, as the
last line, ``mAP=0.xxxx``. An ID in the submission that is not in the split's ground
truth is an error; a ground-truth image missing from the submission counts as having no
predictions (a warning gives their number). ``--iou-type box`` compares the masks' tight
boxes, as the organisers' stored evaluation script does (docs/metric.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hpa.constants import IOU_THRESHOLD
from hpa.eval.metric import IOU_TYPES, MODES, MetricResult, submission_map
from hpa.eval.submission import read_submission
from hpa.io.errors import InputError
from hpa.io.layout import parse_label_string, read_csv_table

log = logging.getLogger(__name__)

LABELS_FILE = "cell_labels.csv"


def mask_path(data_dir: str | os.PathLike, image_id: str) -> Path:
    """``DATA_DIR/gt/{ID}_cellmask.png``."""
    return Path(data_dir) / "gt" / f"{image_id}_cellmask.png"


def read_cell_labels(csv_path: str | os.PathLike, split: str = "test") -> dict[str, dict[int, list[int]]]:
    """Read ``cell_labels.csv`` into ``{image_id: {cell_id: [classes]}}`` for one split.

    ``split="all"`` keeps every row. Raises :class:`InputError` naming the file and row for
    missing columns, bad cell ids or labels, duplicate (ID, cell_id) rows, and an unknown split.
    """
    csv_path = Path(csv_path)
    df = read_csv_table(csv_path, "cell labels file", ["ID", "cell_id", "Label"] + ([] if split == "all" else ["split"]))
    rows = range(len(df))
    if split != "all":
        splits = df["split"].str.strip()
        if not (splits == split).any():
            found = sorted(set(splits))
            raise InputError(f"{csv_path}: no rows of split {split!r}; splits found: {found} (or use 'all')")
        rows = (splits == split).to_numpy().nonzero()[0]
    out: dict[str, dict[int, list[int]]] = {}
    ids, cells, labels = df["ID"].to_numpy(), df["cell_id"].to_numpy(), df["Label"].to_numpy()
    for i in rows:
        where = f"{csv_path} row {i + 2}"
        image_id = ids[i].strip()
        if not image_id:
            raise InputError(f"{where}: empty ID")
        try:
            cell = int(cells[i])
        except ValueError:
            raise InputError(f"{where}: cell_id {cells[i]!r} is not an integer") from None
        if cell < 1:
            raise InputError(f"{where}: cell_id {cell} must be >= 1 (0 is background)")
        per_image = out.setdefault(image_id, {})
        if cell in per_image:
            raise InputError(f"{where}: duplicate cell {cell} of image {image_id!r}")
        per_image[cell] = parse_label_string(labels[i], where)
    return out


def cell_less_images(data_dir: str | os.PathLike, split: str, labelled: set[str]) -> list[str]:
    """Images of a split without any true cell: listed in ``DATA_DIR/{split}.csv`` (``all``: train
    and test), absent from ``cell_labels.csv`` (``labelled``: its IDs of every split), with a true
    mask file ``gt/{ID}_cellmask.png`` (which must then hold no cell; checked when scored)."""
    from hpa.io.layout import read_ids

    data_dir = Path(data_dir)
    out: list[str] = []
    for s in (("train", "test") if split == "all" else (split,)):
        listing = data_dir / f"{s}.csv"
        if listing.is_file():
            out += [i for i in read_ids(listing) if i not in labelled and mask_path(data_dir, i).is_file()]
    return list(dict.fromkeys(out))


def load_ground_truth(data_dir: str | os.PathLike, split: str = "test") -> dict[str, tuple[Path, dict[int, list[int]]]]:
    """``{image_id: (mask_path, {cell_id: [classes]})}`` of a split; masks are read when scored.

    Images of the split without any true cell (:func:`cell_less_images`) are included with
    an empty labels dict, after the labelled ones.
    """
    data_dir = Path(data_dir)
    labels = read_cell_labels(data_dir / "gt" / LABELS_FILE, split)
    gt = {image_id: (mask_path(data_dir, image_id), cells) for image_id, cells in labels.items()}
    labelled = set(gt) if split == "all" else set(read_cell_labels(data_dir / "gt" / LABELS_FILE, "all"))
    for image_id in cell_less_images(data_dir, split, labelled):
        gt[image_id] = (mask_path(data_dir, image_id), {})
    return gt


def score_submission(
    submission_csv: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "test",
    mode: str = "oid",
    iou_threshold: float = IOU_THRESHOLD,
    iou_type: str = "mask",
) -> tuple[MetricResult, list[str]]:
    """Score a submission file against ``DATA_DIR/gt``.

    Returns ``(result, missing)``: the :class:`hpa.eval.metric.MetricResult` and the IDs of the
    split's ground-truth images that have no row in the submission. Raises ValueError naming
    the row and ID for an image that is not in the split's ground truth, a wrong image size or
    a bad mask, and :class:`InputError` when a needed mask file is missing.
    """
    gt = load_ground_truth(data_dir, split)
    sub = read_submission(submission_csv)
    unknown = [s for s in sub.values() if s.image_id not in gt]
    if unknown:
        names = ", ".join(f"row {s.row} ID {s.image_id!r}" for s in unknown[:5])
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise InputError(
            f"{submission_csv}: {len(unknown)} image(s) not in the ground truth of split {split!r}: {names}{more}"
        )
    absent = [str(gt[i][0]) for i in sub if not gt[i][0].is_file()]
    if absent:
        raise InputError(f"{len(absent)} ground-truth mask file(s) missing: {absent[:5]}")
    missing = [i for i in gt if i not in sub]
    result = submission_map(gt, sub, mode=mode, iou_threshold=iou_threshold, iou_type=iou_type)
    return result, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpa.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("submission", help="submission CSV (ID,ImageWidth,ImageHeight,PredictionString)")
    parser.add_argument("data_dir", help="data folder with gt/cell_labels.csv and gt/{ID}_cellmask.png")
    parser.add_argument("--split", default="test", help="split of cell_labels.csv to score on, or 'all' (default test)")
    parser.add_argument("--mode", default="oid", choices=MODES, help="oid: ignore classes absent from an image (host's rule); strict: count them as false positives")
    parser.add_argument("--iou", type=float, default=IOU_THRESHOLD, help="IoU threshold for a match (default 0.6)")
    parser.add_argument("--iou-type", default="mask", choices=IOU_TYPES,
                        help="mask: pixel IoU (default); box: IoU of the masks' tight boxes, as the organisers' "
                             "stored evaluation script (docs/metric.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("HPA_LOG", "WARNING"), format="%(name)s %(levelname)s %(message)s")
    try:
        result, missing = score_submission(args.submission, args.data_dir, args.split, args.mode, args.iou, args.iou_type)
    except (InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"split={args.split} mode={result.mode} iou>={result.iou_threshold:g} iou_type={result.iou_type} "
          f"images={result.n_images}")
    print(result.table())
    if missing:
        print(f"warning: {len(missing)} of {result.n_images} ground-truth images have no row in the submission (scored as no predictions)")
    if result.n_ignored:
        print(f"note: {result.n_ignored} predictions of classes absent from their image's ground truth ignored (oid mode)")
    print(f"mAP={result.map:.4f}")
    return 0

