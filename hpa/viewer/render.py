"""One picture per field: the field with every cell outlined and labelled with its answer.

:func:`render_field` draws, at a view whose longest side is ``size`` pixels (fields larger
than that are shrunk, smaller ones enlarged, so labels keep one readable size whatever the
field's resolution):

- the field as an RGB composite (:func:`hpa.io.fields.rgb_composite`: microtubules red,
  protein green, nucleus blue, ER yellow, each channel stretched to its 99.5th percentile),
  as in the CAM overlays (:mod:`hpa.cam.overlay`);
- every cell's outline in the colour of its top class (:data:`CLASS_COLOURS`), a line of
  about ``size / 512`` pixels on each side of the boundary;
- a label on a box of that colour at the cell's most interior point: ``{cell_id}
  {short name} {confidence}``; where that label would cover another or leave the picture,
  the cell number alone (the page's table gives every cell's top three classes);
- a strip below the field: the field's ID and, for each top class present, its colour,
  short name and number of cells (the legend of this picture).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
from scipy import ndimage

from hpa.constants import CLASS_NAMES, NUM_CLASSES
from hpa.io.fields import resize_field, rgb_composite

#: Short class names for labels (full names: :data:`hpa.constants.CLASS_NAMES`).
SHORT_NAMES = ("Nucleoplasm", "Nuc. membrane", "Nucleoli", "Nucleoli FC", "Nuc. speckles", "Nuc. bodies", "ER",
               "Golgi", "Interm. fil.", "Actin fil.", "Microtubules", "Mitotic spindle", "Centrosome",
               "Plasma memb.", "Mitochondria", "Aggresome", "Cytosol", "Vesicles", "Negative")

#: One RGB colour per class, bright enough to show on a dark fluorescence field (related classes in related hues).
CLASS_COLOURS = ((66, 135, 245), (140, 200, 255), (255, 140, 0), (255, 200, 90), (60, 200, 75), (170, 240, 120),
                 (240, 50, 60), (255, 150, 170), (150, 90, 230), (200, 170, 255), (170, 110, 60), (0, 170, 160),
                 (255, 60, 200), (255, 230, 0), (190, 230, 0), (130, 130, 0), (0, 220, 240), (150, 240, 230),
                 (160, 160, 160))

assert len(SHORT_NAMES) == len(CLASS_COLOURS) == NUM_CLASSES == len(CLASS_NAMES)

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BG = (24, 24, 24)


def hex_colour(c: int) -> str:
    """``#rrggbb`` of class ``c``'s colour."""
    return "#%02x%02x%02x" % CLASS_COLOURS[c]


def text_colour(rgb: Sequence[int]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones (relative luminance threshold 0.5)."""
    r, g, b = (v / 255.0 for v in rgb)
    return (0, 0, 0) if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else (255, 255, 255)


def view_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """``(vh, vw)``: a field of ``h x w`` scaled so that its longest side is ``size`` (aspect kept)."""
    s = size / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _label_edges(mask: np.ndarray, width: int) -> np.ndarray:
    """bool ``(h, w)``: cell pixels within ``width`` px of another label (a cell or the background)."""
    k = 2 * int(width) + 1
    m = mask.astype(np.float32)
    kernel = np.ones((k, k), np.uint8)
    return (mask > 0) & ((cv2.dilate(m, kernel) != m) | (cv2.erode(m, kernel) != m))


def _anchors(mask: np.ndarray, edges: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``(N, 2)`` int (x, y): each cell's point farthest from its outline (its first pixel if it has no inner pixel)."""
    inner = ((mask > 0) & ~edges).astype(np.uint8)
    dist = cv2.distanceTransform(inner, cv2.DIST_L2, 3)
    boxes = ndimage.find_objects(mask)
    out = np.zeros((len(ids), 2), np.int64)
    for n, cid in enumerate(np.asarray(ids).tolist()):
        sl = boxes[cid - 1] if 0 < cid <= len(boxes) else None
        if sl is None:
            continue
        own = mask[sl] == cid
        d = np.where(own, dist[sl], -1.0)
        y, x = np.unravel_index(int(np.argmax(d)), d.shape)
        out[n] = (x + sl[1].start, y + sl[0].start)
    return out


def _box_at(x: int, y: int, w: int, h: int, vw: int, vh: int) -> tuple[int, int, int, int]:
    """A ``w x h`` box centred on (x, y), moved inside the ``vw x vh`` picture."""
    x0 = int(np.clip(x - w // 2, 0, vw - w))
    y0 = int(np.clip(y - h // 2, 0, vh - h))
    return x0, y0, x0 + w, y0 + h


def _overlaps(box, boxes) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in boxes)


def _draw_label(img: np.ndarray, text: str, box, colour, scale: float, thick: int) -> None:
    x0, y0, x1, y1 = box
    cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), colour, -1)
    cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), (0, 0, 0), 1)
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
    pad = (y1 - y0 - th) // 2
    cv2.putText(img, text, (x0 + 3, y1 - pad), _FONT, scale, text_colour(colour), thick, cv2.LINE_AA)


def render_field(field: np.ndarray, mask: np.ndarray, cell_ids: Sequence[int], conf: np.ndarray, title: str = "",
                 size: int = 1024, font_scale: float = 0.5) -> np.ndarray:
    """The viewer picture of one field, uint8 RGB ``(vh + strip, vw, 3)`` (see the module docstring).

    Args:
        field: ``(4, H, W)`` uint8/uint16 field (red, green, blue, yellow).
        mask: int ``(H, W)`` instance mask, cells 1..K (0 background).
        cell_ids: the ids in ``mask`` of the rows of ``conf``.
        conf: float ``(N, 19)`` confidences in [0, 1]; a cell's top class is its argmax.
        title: written in the strip below the field (e.g. the field's ID).
        size: longest side of the field's view in pixels (>= 64).
        font_scale: OpenCV font scale of the labels (0.5: letters about 9 px high).
    """
    field, mask = np.asarray(field), np.asarray(mask)
    if field.ndim != 3 or field.shape[0] != 4 or field.shape[1:] != mask.shape:
        raise ValueError(f"expected a (4, H, W) field and an (H, W) mask of the same size, got {field.shape} "
                         f"and {mask.shape}")
    conf = np.asarray(conf, np.float32).reshape(-1, NUM_CLASSES)
    ids = np.asarray(cell_ids, np.int64)
    if len(ids) != len(conf):
        raise ValueError(f"{len(ids)} cell ids for {len(conf)} rows of confidences")
    if size < 64:
        raise ValueError(f"viewer size must be >= 64 px, got {size}")
    h, w = mask.shape
    vh, vw = view_shape(h, w, int(size))
    view = rgb_composite(resize_field(field, (vh, vw)))
    small = cv2.resize(mask.astype(np.float32), (vw, vh), interpolation=cv2.INTER_NEAREST).astype(np.int32)
    top = conf.argmax(1) if len(conf) else np.zeros(0, np.int64)
    lut = np.zeros((max(int(small.max()), int(ids.max()) if len(ids) else 0) + 1, 3), np.uint8)
    lut[ids] = np.asarray(CLASS_COLOURS, np.uint8)[top]
    width = max(1, round(max(vh, vw) / 512))
    edges = _label_edges(small, width)
    view[edges] = lut[small[edges]]
    thick = 1
    (_, th), _ = cv2.getTextSize("0", _FONT, font_scale, thick)
    box_h = th + 8
    placed: list[tuple[int, int, int, int]] = []
    present = np.isin(ids, small)
    order = np.argsort(-(conf.max(1) if len(conf) else np.zeros(0)), kind="stable")
    anchors = _anchors(small, edges, ids[present]) if present.any() else np.zeros((0, 2), np.int64)
    anchor_of = dict(zip(ids[present].tolist(), map(tuple, anchors.tolist())))
    for n in order:
        cid = int(ids[n])
        if cid not in anchor_of:
            continue  # the cell vanished at this scale: only the table lists it
        ax, ay = anchor_of[cid]
        c = int(top[n])
        colour = CLASS_COLOURS[c]
        for text in (f"{cid} {SHORT_NAMES[c]} {conf[n, c]:.2f}", f"{cid}"):
            tw = cv2.getTextSize(text, _FONT, font_scale, thick)[0][0] + 6
            if tw > vw or box_h > vh:
                continue
            boxes = [_box_at(ax, ay + dy, tw, box_h, vw, vh) for dy in (0, -box_h, box_h)]
            box = next((b for b in boxes if not _overlaps(b, placed)), None)
            if box is None:
                if text != f"{cid}":
                    continue
                box = boxes[0]  # crowded: the number goes where the cell is, even over another label
            _draw_label(view, text, box, colour, font_scale, thick)
            placed.append(box)
            break
    return np.concatenate([view, _legend_strip(vw, title, top, font_scale)], 0)


def _legend_strip(width: int, title: str, top: np.ndarray, scale: float) -> np.ndarray:
    """The strip under the field: its title, then a colour chip, short name and cell count per top class present."""
    counts = np.bincount(np.asarray(top, np.int64), minlength=NUM_CLASSES)
    (_, th), _ = cv2.getTextSize("0", _FONT, scale, 1)
    line_h = th + 12
    items = [(c, f"{SHORT_NAMES[c]} ({counts[c]})") for c in np.argsort(-counts, kind="stable") if counts[c]]
    lines: list[list[tuple[int, str, int]]] = [[]]
    x = 8
    for c, text in items:
        tw = cv2.getTextSize(text, _FONT, scale, 1)[0][0] + th + 18
        if x + tw > width - 4 and lines[-1]:
            lines.append([])
            x = 8
        lines[-1].append((c, text, x))
        x += tw
    strip = np.full((line_h * (1 + len(lines)) + 4, width, 3), _BG, np.uint8)
    summary = f"{title}   {len(top)} cells" if title else f"{len(top)} cells"
    cv2.putText(strip, summary, (8, line_h - 6), _FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)
    for row, line in enumerate(lines, start=1):
        y = line_h * (row + 1) - 6
        for c, text, x in line:
            cv2.rectangle(strip, (x, y - th), (x + th, y), CLASS_COLOURS[c], -1)
            cv2.putText(strip, text, (x + th + 6, y), _FONT, scale, (220, 220, 220), 1, cv2.LINE_AA)
    return strip
