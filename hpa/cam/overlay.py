"""CAM overlays people can inspect: one PNG per image and a gallery page.

An overlay (:func:`render_overlay`) is a grid of panels of the same field, each scaled so
its longest side is ``panel_size`` pixels with the field's own aspect:

1. the field as an RGB composite (microtubules red, protein green, nucleus blue, ER yellow);
2. one panel per class shown (train: the image's labels; test: the ``top_k`` most probable
   stored classes): the class's CAM, normalised to [0, 1] (:func:`hpa.cam.maps.normalize_cams`),
   as a "turbo" heat map (dark blue 0 -> red 1) over the protein channel in grey; where the
   map is 0 the grey protein shows through. The title gives the class, its image-level
   probability and the raw peak and minimum of the map (for ``cam``: ``w_k . F``), since the
   normalisation hides magnitudes: a flat map (peak close to minimum) is red everywhere.

Cell outlines (white) are drawn on every panel when a cell mask is given. A header names the
image and its labels and shows the colour scale.

The gallery (:func:`write_gallery`) is one static ``index.html`` beside the PNGs: every image
with its labels, its top probabilities and its overlay, linked relatively so the folder
opens in a browser from disk (or from any copy of it).
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import cv2
import numpy as np

from hpa.cam.maps import CamRecord, normalize_cams, upsample_cam
from hpa.constants import CLASS_NAMES
from hpa.io.fields import resize_field, rgb_composite, to_float, write_png
from hpa.utils.fs import write_text

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BG = (24, 24, 24)
_TITLE_H = 40
_HEADER_H = 44
_GAP = 6


@lru_cache(maxsize=4)
def colormap_lut(name: str = "turbo") -> np.ndarray:
    """uint8 ``(256, 3)`` RGB lookup table of a matplotlib colormap."""
    import matplotlib

    return (matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def panel_shape(h: int, w: int, panel_size: int) -> tuple[int, int]:
    """``(ph, pw)``: the field's size scaled so its longest side is ``panel_size`` (aspect kept)."""
    scale = panel_size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def cell_outlines(cell_mask: np.ndarray) -> np.ndarray:
    """bool ``(H, W)``: pixels of a cell whose right or lower neighbour has another label."""
    m = np.asarray(cell_mask)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D instance mask, got shape {m.shape}")
    edge = np.zeros(m.shape, bool)
    dy = m[1:, :] != m[:-1, :]
    dx = m[:, 1:] != m[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    return edge & (m > 0)


def heat_over(base_gray: np.ndarray, heat: np.ndarray, max_alpha: float = 0.75) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)``: ``heat`` in [0, 1] coloured over a uint8 grey image.

    The colour's opacity grows with the value: ``max_alpha * sqrt(heat)`` (0: grey only)."""
    heat = np.clip(np.asarray(heat, np.float32), 0, 1)
    if heat.shape != base_gray.shape:
        raise ValueError(f"heat {heat.shape} and base {base_gray.shape} must have the same size")
    color = colormap_lut()[(heat * 255).round().astype(np.uint8)].astype(np.float32)
    alpha = (max_alpha * np.sqrt(heat))[..., None]
    grey = np.repeat(base_gray[..., None].astype(np.float32), 3, axis=2)
    return np.clip(grey * (1 - alpha) + color * alpha, 0, 255).astype(np.uint8)


def _fit_text(text: str, width: int, scale: float) -> str:
    while text and cv2.getTextSize(text, _FONT, scale, 1)[0][0] > width:
        text = text[:-2] + "~" if len(text) > 2 else ""
    return text


def _titled(panel: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    h, w = panel.shape[:2]
    out = np.full((h + _TITLE_H, w, 3), _BG, np.uint8)
    out[_TITLE_H:] = panel
    for n, line in enumerate(lines[:2]):
        scale = 0.5 if n == 0 else 0.42
        cv2.putText(out, _fit_text(line, w - 8, scale), (4, 16 + 18 * n), _FONT, scale,
                    (255, 255, 255) if n == 0 else (200, 200, 200), 1, cv2.LINE_AA)
    return out


def _classes_to_show(rec: CamRecord, labels: Sequence[int] | None, top_k: int) -> list[int]:
    stored = [int(c) for c in rec.classes]
    if labels is not None:
        wanted = [c for c in sorted(set(int(c) for c in labels)) if c in stored]
        if wanted:
            return wanted
    return sorted(stored, key=lambda c: -float(rec.probs[c]))[: max(int(top_k), 0)]


def render_overlay(field: np.ndarray, rec: CamRecord, labels: Sequence[int] | None = None,
                   cell_mask: np.ndarray | None = None, panel_size: int = 512, top_k: int = 3, title: str = "",
                   columns: int = 4) -> np.ndarray:
    """One image's overlay as uint8 RGB ``(H', W', 3)``.

    Args:
        field: ``(4, H, W)`` uint8/uint16/float field (red, green, blue, yellow), any size.
        rec: its stored CAMs (:func:`hpa.cam.maps.load_cam`).
        labels: image labels (train): their maps are shown; None (test): the ``top_k`` most
            probable stored classes.
        cell_mask: optional ``(H, W)`` instance mask of the same field: outlines drawn.
        panel_size: longest side of each panel in pixels. columns: panels per row.
    """
    field = np.asarray(field)
    if field.ndim != 3 or field.shape[0] != 4:
        raise ValueError(f"expected a (4, H, W) field, got shape {field.shape}")
    h, w = field.shape[1:]
    if cell_mask is not None and np.asarray(cell_mask).shape != (h, w):
        raise ValueError(f"cell mask {np.asarray(cell_mask).shape} does not match the field {(h, w)}")
    ph, pw = panel_shape(h, w, int(panel_size))
    small = resize_field(field, (ph, pw))
    rgb = rgb_composite(small)
    green = to_float(small[1])
    hi = float(np.percentile(green, 99.5)) or 1.0
    grey = (np.clip(green / hi, 0, 1) * 200).astype(np.uint8)
    edge = None
    if cell_mask is not None:
        edge = cell_outlines(cv2.resize(np.asarray(cell_mask, np.int32).astype(np.float32), (pw, ph),
                                        interpolation=cv2.INTER_NEAREST).astype(np.int32))

    def outline(img):
        if edge is not None:
            img = img.copy()
            img[edge] = (255, 255, 255)
        return img

    names = [CLASS_NAMES[c] if c < len(CLASS_NAMES) else str(c) for c in range(len(rec.probs))]
    label_text = ", ".join(names[c] for c in labels) if labels is not None else "unlabelled"
    panels = [_titled(outline(rgb), ["field (RGB composite)", "MT red, protein green, nucleus blue, ER yellow"])]
    shown = _classes_to_show(rec, labels, top_k)
    if shown:
        idx = [int(np.flatnonzero(rec.classes == c)[0]) for c in shown]
        raw = rec.cams[idx]
        heat = upsample_cam(normalize_cams(raw), (ph, pw))
        for c, r, hm in zip(shown, raw, heat):
            note = "" if r.max() > 0 else "   (no positive value: map empty)"
            panels.append(_titled(outline(heat_over(grey, hm)),
                                  [f"{c}: {names[c]}", f"p={rec.probs[c]:.2f}   peak {float(r.max()):+.2f}, "
                                                       f"min {float(r.min()):+.2f}{note}"]))
    else:
        blank = np.full((ph, pw, 3), _BG, np.uint8)
        panels.append(_titled(blank, ["no CAM stored", "test_prob_floor left no class"]))
    return _grid(panels, columns, _header(title, label_text, rec.method, min(len(panels), columns) * (pw + _GAP) - _GAP))


def _header(title: str, labels: str, method: str, width: int) -> np.ndarray:
    head = np.full((_HEADER_H, max(width, 320), 3), _BG, np.uint8)
    bar_w = 160
    text_w = head.shape[1] - bar_w - 40
    cv2.putText(head, _fit_text(title, text_w, 0.55), (4, 18), _FONT, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    cv2.putText(head, _fit_text(f"labels: {labels}", text_w, 0.45), (4, 37), _FONT, 0.45, (210, 210, 210), 1,
                cv2.LINE_AA)
    x0 = head.shape[1] - bar_w - 8
    head[8:20, x0:x0 + bar_w] = colormap_lut()[np.linspace(0, 255, bar_w).astype(int)][None]
    cv2.putText(head, "0", (x0, 36), _FONT, 0.4, (210, 210, 210), 1, cv2.LINE_AA)
    cv2.putText(head, f"1 = map max ({method})", (x0 + 18, 36), _FONT, 0.4, (210, 210, 210), 1, cv2.LINE_AA)
    return head


def _grid(panels: list[np.ndarray], columns: int, header: np.ndarray) -> np.ndarray:
    ph, pw = panels[0].shape[:2]
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    width = max(columns * (pw + _GAP) - _GAP, header.shape[1])
    out = np.full((header.shape[0] + rows * (ph + _GAP), width, 3), _BG, np.uint8)
    out[: header.shape[0], : header.shape[1]] = header
    for n, p in enumerate(panels):
        r, c = divmod(n, columns)
        y, x = header.shape[0] + r * (ph + _GAP), c * (pw + _GAP)
        out[y:y + ph, x:x + pw] = p
    return out


def save_overlay(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an overlay (uint8 RGB) as PNG atomically."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    return write_png(path, image)


# --------------------------------------------------------------------------- gallery
@dataclass
class GalleryEntry:
    """One image of the gallery: ``href`` is its overlay PNG relative to ``index.html``;
    ``labels`` None for unlabelled (test) images; ``probs`` float (19,)."""

    split: str
    image_id: str
    href: str
    labels: list[int] | None
    probs: np.ndarray
    method: str = "cam"


_CSS = """
body{font-family:system-ui,sans-serif;background:#151515;color:#ddd;margin:16px}
h1{font-size:20px;margin:0 0 6px}h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #444}
p.help{max-width:980px;color:#bbb;font-size:13px;line-height:1.45}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:14px}
.card{background:#222;border-radius:6px;padding:8px}
.card h3{font-size:14px;margin:0 0 4px;font-family:monospace}
.card p{margin:2px 0;font-size:12.5px}.card img{width:100%;height:auto;display:block;margin-top:6px}
.lab{display:inline-block;background:#2d4a2d;border-radius:3px;padding:0 4px;margin:1px}
.top{display:inline-block;background:#333;border-radius:3px;padding:0 4px;margin:1px}
nav a{color:#9cf;margin-right:12px}
"""


def _prob_span(c: int, p: float, cls: str) -> str:
    name = CLASS_NAMES[c] if c < len(CLASS_NAMES) else str(c)
    return f'<span class="{cls}">{html.escape(name)} {p:.2f}</span>'


def gallery_html(entries: Sequence[GalleryEntry], title: str = "CAM overlays", top_k: int = 3) -> str:
    """The gallery page's HTML: one section per split, one card per image."""
    splits = list(dict.fromkeys(e.split for e in entries))
    methods = sorted({e.method for e in entries})
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             '<p class="help">Each overlay shows the field as an RGB composite (microtubules red, protein green, '
             "nucleus blue, ER yellow), then, for each label (train) or top prediction (test), that class's "
             "activation map normalised to its own maximum, coloured dark blue (0) to red (1) over the protein "
             "channel in grey, with cell outlines in white when segmentation masks exist. A good map lights the "
             "cells that show the pattern and leaves the others dark; a map that lights the whole field or the "
             "background means the image model has not learnt the pattern. Method: "
             f"{html.escape(', '.join(methods) or '-')}. Click an overlay to open it full size.</p>"]
    if not entries:
        parts.append("<p>No overlays yet: run stages/02_cam.py.</p>")
    if len(splits) > 1:
        parts.append("<nav>" + "".join(f'<a href="#{quote(s)}">{html.escape(s)}</a>' for s in splits) + "</nav>")
    for split in splits:
        group = [e for e in entries if e.split == split]
        parts.append(f'<h2 id="{html.escape(split)}">{html.escape(split)} ({len(group)} images)</h2><div class="grid">')
        for e in group:
            probs = np.asarray(e.probs, np.float64)
            href = quote(e.href)
            lab = ("labels: " + " ".join(_prob_span(c, probs[c], "lab") for c in e.labels)) if e.labels is not None \
                else "labels: unknown (test)"
            top = "top predictions: " + " ".join(_prob_span(int(c), probs[c], "top")
                                                 for c in np.argsort(-probs)[:top_k])
            parts.append(f'<div class="card"><h3>{html.escape(e.image_id)}</h3><p>{lab}</p><p>{top}</p>'
                         f'<a href="{href}"><img src="{href}" loading="lazy" alt="CAM overlay of '
                         f'{html.escape(e.image_id)}"></a></div>')
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_gallery(path: str | os.PathLike, entries: Sequence[GalleryEntry], title: str = "CAM overlays") -> Path:
    """Write the gallery page atomically; every ``href`` must point to an existing file
    relative to the page's folder (checked, so the page never has a broken link)."""
    path = Path(path)
    missing = [e.href for e in entries if not (path.parent / e.href).is_file()]
    if missing:
        raise FileNotFoundError(f"gallery {path}: {len(missing)} overlay(s) not found, e.g. {missing[:3]}")
    return write_text(path, gallery_html(entries, title))
