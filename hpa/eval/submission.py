"""Writing and reading ``submission.csv`` in the Kaggle HPA Single Cell format.

One row per image: ``ID,ImageWidth,ImageHeight,PredictionString``, where
``PredictionString`` is a space-separated list of ``class confidence mask`` triples:
``class`` an integer 0..18, ``confidence`` a float, ``mask`` the string of
:func:`hpa.eval.rle.encode_mask` for an image of ``ImageHeight x ImageWidth`` pixels. A cell
appears once per class it is given (the writer writes every class with a finite,
non-negative confidence); an image without predictions has an empty string.

Confidences are written in the shortest form that reads back to the same value of the
array's dtype (float32 stays float32-exact), so scores from a written and re-read
submission equal those computed from the arrays (:func:`hpa.eval.metric.cell_map`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

from hpa.constants import NUM_CLASSES
from hpa.eval.rle import RLEError, decode_rles, encode_instances, encode_mask, rle_to_mask
from hpa.io.errors import InputError
from hpa.io.layout import read_csv_table
from hpa.utils.fs import atomic_path

log = logging.getLogger(__name__)

COLUMNS = ("ID", "ImageWidth", "ImageHeight", "PredictionString")


class SubmissionError(InputError):
    """A malformed submission: the message names the file, row and image ID."""


# --------------------------------------------------------------------------- write
def _check_prediction(image_id: str, mask, cell_ids, conf) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"image {image_id!r}: expected an integer instance mask (H, W), got {mask.dtype} {mask.shape}")
    conf = np.asarray(conf)
    if not np.issubdtype(conf.dtype, np.floating):
        conf = conf.astype(np.float64)
    if conf.ndim != 2 or conf.shape[1] != NUM_CLASSES:
        raise ValueError(f"image {image_id!r}: expected confidences (K, {NUM_CLASSES}), got shape {conf.shape}")
    if cell_ids is None:
        cell_ids = np.unique(mask)
        cell_ids = cell_ids[cell_ids != 0]
    cell_ids = np.asarray(cell_ids)
    if cell_ids.ndim != 1 or len(cell_ids) != len(conf):
        raise ValueError(
            f"image {image_id!r}: {len(conf)} rows of confidences but cell_ids has shape {cell_ids.shape}"
        )
    if cell_ids.size and not np.issubdtype(cell_ids.dtype, np.integer):
        raise ValueError(f"image {image_id!r}: cell_ids must be integers, got {cell_ids.dtype}")
    return mask, cell_ids, conf


def prediction_string(mask: np.ndarray, cell_ids: np.ndarray | None, conf: np.ndarray, image_id: str = "?") -> str:
    """The ``PredictionString`` of one image.

    Args:
        mask: integer instance mask (H, W), 0 = background.
        cell_ids: int (K,) ids in ``mask`` that the rows of ``conf`` refer to; ``None`` means
            the sorted ids present in ``mask``. An id absent from ``mask`` is written as an
            empty mask (it can never match a true cell).
        conf: float (K, 19) confidences; NaN or a negative value means "no prediction".
    Returns:
        Triples ``class confidence mask`` in cell order, then class order, space-separated.
    """
    mask, cell_ids, conf = _check_prediction(image_id, mask, cell_ids, conf)
    ok = np.isfinite(conf) & (conf >= 0)
    if not ok.any():
        return ""
    return format_predictions(cell_mask_strings(mask, cell_ids), conf)


def cell_mask_strings(mask: np.ndarray, cell_ids: np.ndarray) -> list[str]:
    """The mask string of each id of ``cell_ids`` in the instance mask ``mask`` (H, W); an id absent
    from ``mask`` gets the string of an empty mask (it can never match a true cell)."""
    strings = encode_instances(mask) if np.any(mask) else {}
    empty = None
    out = []
    for cid in np.asarray(cell_ids).tolist():
        s = strings.get(cid)
        if s is None:
            if empty is None:
                empty = encode_mask(np.zeros(np.shape(mask), bool))
            s = empty
        out.append(s)
    return out


def format_predictions(mask_strings: list[str], conf: np.ndarray) -> str:
    """A ``PredictionString`` from each cell's mask string and its confidences ``conf`` (K, 19).

    Triples in cell order, then class order; NaN or a negative confidence is left out. The
    confidence is written as ``str`` of the array's float: the shortest form that reads back exactly.
    """
    conf = np.asarray(conf)
    if len(mask_strings) != len(conf):
        raise ValueError(f"{len(mask_strings)} mask strings for {len(conf)} rows of confidences")
    ok = np.isfinite(conf) & (conf >= 0)
    parts = []
    for k, s in enumerate(mask_strings):
        row = conf[k]
        for c in np.flatnonzero(ok[k]).tolist():
            parts.append(f"{c} {str(row[c])} {s}")  # str of a numpy float: shortest exact form
    return " ".join(parts)


PredictionsLike = Mapping[str, tuple] | Iterable[tuple]


def _iter_predictions(predictions: PredictionsLike) -> Iterator[tuple[str, np.ndarray, np.ndarray | None, np.ndarray]]:
    if isinstance(predictions, Mapping):
        items = ((k, *v) for k, v in predictions.items())
    else:
        items = iter(predictions)
    for item in items:
        if len(item) != 4:
            raise ValueError(
                "each prediction must be (image_id, mask, cell_ids, conf) "
                f"(or a mapping image_id -> (mask, cell_ids, conf)), got {len(item)} fields"
            )
        yield item


def write_submission(path: str | os.PathLike, predictions: PredictionsLike) -> Path:
    """Write ``submission.csv`` atomically.

    Args:
        path: output CSV path.
        predictions: ``{image_id: (mask, cell_ids, conf)}`` or an iterable of
            ``(image_id, mask, cell_ids, conf)`` (streamed, so images need not all be in
            memory): ``mask`` integer (H, W) instance mask, ``cell_ids`` int (K,) or None,
            ``conf`` float (K, 19), NaN / negative = not predicted. Rows keep this order.
    Returns:
        The path written.
    """
    def rows():
        for image_id, mask, cell_ids, conf in _iter_predictions(predictions):
            h, w = np.shape(mask)
            yield image_id, w, h, prediction_string(mask, cell_ids, conf, str(image_id))

    return write_submission_rows(path, rows())


def write_submission_rows(path: str | os.PathLike, rows: Iterable[tuple[str, int, int, str]]) -> Path:
    """Write ``submission.csv`` atomically from finished rows ``(image_id, width, height, prediction_string)``
    (streamed; e.g. strings made earlier by :func:`format_predictions`). IDs are checked as in
    :func:`write_submission`."""
    path = Path(path)
    seen: set[str] = set()
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(",".join(COLUMNS) + "\n")
        n = 0
        for image_id, w, h, ps in rows:
            image_id = str(image_id)
            if not image_id or any(ch in image_id for ch in ',"\n\r '):
                raise ValueError(f"image ID {image_id!r} is empty or contains a comma, quote or space")
            if image_id in seen:
                raise ValueError(f"image ID {image_id!r} given twice")
            seen.add(image_id)
            f.write(f"{image_id},{int(w)},{int(h)},{ps}\n")
            n += 1
    log.info("wrote %s (%d images)", path, n)
    return path


# --------------------------------------------------------------------------- read
@dataclass
class SubmissionImage:
    """The predictions of one submission row.

    ``classes`` int64 (N,) in 0..18, ``confidences`` float64 (N,), ``mask_index`` int64 (N,)
    pointing into ``rles``: one validated COCO RLE object per distinct mask string of the row
    (identical strings share one), in order of first appearance. ``mask(j)`` decodes one.
    """

    image_id: str
    width: int
    height: int
    row: int  # 1-based line number in the CSV (header = line 1)
    classes: np.ndarray
    confidences: np.ndarray
    mask_index: np.ndarray
    rles: list[dict] = field(repr=False)

    @property
    def n_predictions(self) -> int:
        return len(self.classes)

    @property
    def n_masks(self) -> int:
        return len(self.rles)

    def mask(self, j: int) -> np.ndarray:
        """Distinct mask ``j`` as bool (height, width)."""
        return rle_to_mask(self.rles[j])


def parse_prediction_string(text: str, height: int, width: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """Parse one ``PredictionString`` into ``(classes, confidences, mask_index, rles)``.

    ``where`` (file, row and ID) prefixes every error message. Raises :class:`SubmissionError`.
    """
    tokens = text.split()
    if len(tokens) % 3:
        raise SubmissionError(
            f"{where}: PredictionString has {len(tokens)} fields, not a multiple of 3 "
            "('class confidence mask' triples)"
        )
    if not tokens:
        return np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.int64), []
    cls_tok, conf_tok, rle_tok = tokens[0::3], tokens[1::3], tokens[2::3]
    try:
        classes = np.array(cls_tok).astype(np.int64)
    except ValueError:
        bad = next(i for i, t in enumerate(cls_tok) if not t.lstrip("-").isdigit())
        raise SubmissionError(
            f"{where}: triple {bad + 1}: class {cls_tok[bad]!r} is not an integer (malformed triple?)"
        ) from None
    out = (classes < 0) | (classes >= NUM_CLASSES)
    if out.any():
        bad = int(np.argmax(out))
        raise SubmissionError(f"{where}: triple {bad + 1}: class {classes[bad]} outside 0..{NUM_CLASSES - 1}")
    try:
        conf = np.array(conf_tok).astype(np.float64)
    except ValueError:
        bad = next(i for i, t in enumerate(conf_tok) if not _is_float(t))
        raise SubmissionError(
            f"{where}: triple {bad + 1}: confidence {conf_tok[bad]!r} is not a number (malformed triple?)"
        ) from None
    if not np.isfinite(conf).all():
        bad = int(np.argmax(~np.isfinite(conf)))
        raise SubmissionError(f"{where}: triple {bad + 1}: confidence {conf_tok[bad]!r} is not finite")
    index: dict[str, int] = {}
    mask_index = np.fromiter((index.setdefault(s, len(index)) for s in rle_tok), np.int64, len(rle_tok))
    distinct = list(index)
    try:
        rles = decode_rles(distinct, height, width)
    except RLEError as exc:
        bad = int(np.argmax(mask_index == exc.index))
        raise SubmissionError(f"{where}: triple {bad + 1}: bad mask: {exc}") from None
    return classes, conf, mask_index, rles


def _is_float(t: str) -> bool:
    try:
        float(t)
        return True
    except ValueError:
        return False


def read_submission(path: str | os.PathLike) -> dict[str, SubmissionImage]:
    """Read and validate a submission CSV into ``{image_id: SubmissionImage}`` (file order).

    Every mask is checked (base64, zlib, COCO RLE, runs covering ImageHeight x ImageWidth
    pixels), each distinct mask string of a row once. Raises :class:`SubmissionError` naming
    the file, row and ID for missing columns, duplicate IDs, bad sizes, malformed triples,
    classes outside 0..18 and bad masks.
    """
    path = Path(path)
    df = read_csv_table(path, "submission file", COLUMNS, SubmissionError)
    out: dict[str, SubmissionImage] = {}
    n_pred = n_mask = 0
    for i, (image_id, w_txt, h_txt, ps) in enumerate(
        zip(df["ID"], df["ImageWidth"], df["ImageHeight"], df["PredictionString"])
    ):
        row = i + 2
        image_id = image_id.strip()
        where = f"{path} row {row} (ID {image_id!r})"
        if not image_id:
            raise SubmissionError(f"{path} row {row}: empty ID")
        if image_id in out:
            raise SubmissionError(f"{where}: duplicate ID (first at row {out[image_id].row})")
        try:
            width, height = int(w_txt), int(h_txt)
        except ValueError:
            raise SubmissionError(
                f"{where}: ImageWidth {w_txt!r} / ImageHeight {h_txt!r} are not integers"
            ) from None
        if width < 1 or height < 1:
            raise SubmissionError(f"{where}: image size {width} x {height} is not positive")
        classes, conf, mask_index, rles = parse_prediction_string(ps, height, width, where)
        out[image_id] = SubmissionImage(image_id, width, height, row, classes, conf, mask_index, rles)
        n_pred += len(classes)
        n_mask += len(rles)
    log.info("read %s: %d images, %d predictions, %d distinct masks", path, len(out), n_pred, n_mask)
    return out
