"""Cell and nucleus layout of one synthetic field of view (geometry only, no intensities).

Cells are irregular blobs (an ellipse with random low harmonics and sometimes a long
protrusion) around seed points placed with a minimum spacing. Every pixel goes to the blob
in whose own normalised radius it lies deepest (``argmin_k |x - c_k| / R_k(theta)``), so
blobs that overlap split the overlap along a shared curved boundary: touching cells, as in
a confluent culture. Each cell holds one irregular elliptical nucleus; mitotic cells are
round and hold condensed chromosomes (a metaphase plate, or two anaphase plates) instead.

Every length is a fraction of the field size ``S`` times the cell scale ``c``
(``s = c * S / 256`` scales pixel widths), so the same seed gives the same picture at 128, 256
or 512 px, up to resolution. ``c`` (``--cell-scale``) changes the cells' size without changing
the field's: at ``c = 0.5`` cells are half as wide and a field holds about four times as many
(the number drawn is divided by ``c**2``); ``c = 1`` is the default benchmark, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from skimage.measure import label as connected_components

__all__ = ["Layout", "make_layout", "smooth_noise", "MITOTIC_SHRINK"]

#: A rounded mitotic cell's radius as a fraction of its nominal radius.
MITOTIC_SHRINK = 0.7


@dataclass
class Layout:
    """Geometry of one field; K cells numbered 1..K.

    Attributes (S = field size):
        cell_mask: int32 (S, S), 0 background, k = cell k.
        nuclei_mask: int32 (S, S), k = nucleus of cell k, always inside cell k, non-empty.
        nucleoli: bool (S, S), nucleoli (inside nuclei of interphase cells).
        center: float (K+1, 2) (y, x) cell seed points (row 0 unused).
        nuc_center: float (K+1, 2) nucleus centres (may lie just outside the field).
        radius: float (K+1,) nominal cell radius in px; nuc_radius: float (K+1,) mean nucleus radius.
        mitotic: bool (K+1,) rounded mitotic cell (row 0 False).
        toward: float (K+1, 2) unit vector from the nucleus to the bulk of the cytoplasm.
        centrosome: float (K+1, 2) position of the microtubule-organising centre.
        spindle_axis: float (K+1,) angle (rad) of the spindle axis of mitotic cells.
        nucleoli_list: per cell, list of (y, x, radius) of its nucleoli.
        size: S; scale: c * S / 256 (c: the cell scale), the factor of every width in pixels.
    """

    cell_mask: np.ndarray
    nuclei_mask: np.ndarray
    nucleoli: np.ndarray
    center: np.ndarray
    nuc_center: np.ndarray
    radius: np.ndarray
    nuc_radius: np.ndarray
    mitotic: np.ndarray
    toward: np.ndarray
    centrosome: np.ndarray
    spindle_axis: np.ndarray
    nucleoli_list: list = field(default_factory=list)
    size: int = 256
    scale: float = 1.0

    @property
    def n_cells(self) -> int:
        return int(len(self.radius) - 1)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, float32 ``shape``, zero mean, unit standard deviation.

    Large ``sigma`` is made at a coarser grid and resized (same look, much faster).
    """
    h, w = shape
    step = max(1, int(sigma // 4))
    small = rng.standard_normal(((h + step - 1) // step + 1, (w + step - 1) // step + 1)).astype(np.float32)
    sm = cv2.GaussianBlur(small, (0, 0), sigma / step, borderType=cv2.BORDER_REFLECT)
    if step > 1:
        sm = cv2.resize(sm, (small.shape[1] * step, small.shape[0] * step), interpolation=cv2.INTER_LINEAR)
    out = sm[:h, :w]
    out = out - out.mean()
    sd = float(out.std())
    return out / sd if sd > 0 else out


def _blob_radius(theta: np.ndarray, base: float, elong: float, angle: float, harm: np.ndarray,
                 phase: np.ndarray, bumps: list[tuple[float, float, float]]) -> np.ndarray:
    """Radius of an irregular blob in direction ``theta`` (any shape array, radians)."""
    c, s = np.cos(theta - angle), np.sin(theta - angle)
    a, b = base * np.sqrt(elong), base / np.sqrt(elong)
    r = a * b / np.sqrt((b * c) ** 2 + (a * s) ** 2)
    mod = 1.0
    for m, (amp, ph) in enumerate(zip(harm, phase), start=2):
        mod = mod + amp * np.cos(m * theta - ph)
    for ang, height, width in bumps:  # protrusions: narrow bumps of the radius
        d = np.angle(np.exp(1j * (theta - ang)))
        mod = mod + height * np.exp(-0.5 * (d / width) ** 2)
    return r * np.maximum(mod, 0.35)


def _place_centres(rng, size, radii, spacing, margin, fixed_margin):
    """Rejection-sample seed points; cells flagged in ``fixed_margin`` (mitotic) stay clear of the border.

    Returns ``(indices of placed cells, (n, 2) centres)`` or ``None`` when a flagged cell found no place.
    """
    idx, pts = [], np.zeros((len(radii), 2))
    for i, r in enumerate(radii):
        m = max(margin, r * 1.05) if fixed_margin[i] else margin
        n = len(idx)
        need = spacing * (r + radii[np.array(idx, dtype=int)])
        for _ in range(80):
            p = rng.uniform(m, size - m, 2)
            d = pts[:n] - p
            if np.all(np.hypot(d[:, 0], d[:, 1]) >= need):
                idx.append(i)
                pts[n] = p
                break
        else:
            if fixed_margin[i]:
                return None
    if not idx:
        return None
    return np.array(idx), pts[:len(idx)].copy()


def make_layout(rng: np.random.Generator, size: int = 256, n_mitotic: int = 0, min_interphase: int = 4,
                max_tries: int = 20, cell_scale: float = 1.0) -> Layout:
    """Draw the cells and nuclei of one field.

    Args:
        rng: random generator (the only source of randomness).
        size: field side S in pixels (>= 64).
        n_mitotic: number of rounded mitotic cells that must appear (kept away from the border).
        min_interphase: the layout is redrawn until at least this many interphase cells remain.
        max_tries: redraws before giving up (RuntimeError).
        cell_scale: cell size factor ``c`` (0.1..4): cells ``c`` times as wide, about ``1 / c**2``
            times as many per field.

    Returns:
        a :class:`Layout` with 8-20 cells for typical draws at ``c = 1`` (some cut by the border,
        some touching).
    """
    if size < 64:
        raise ValueError(f"field size must be >= 64 px, got {size}")
    if not 0.1 <= cell_scale <= 4.0:
        raise ValueError(f"cell_scale must lie in 0.1..4, got {cell_scale}")
    for _ in range(max_tries):
        lay = _try_layout(rng, size, n_mitotic, float(cell_scale))
        if lay is not None and int((~lay.mitotic[1:]).sum()) >= min_interphase and int(lay.mitotic.sum()) == n_mitotic:
            return lay
    raise RuntimeError(f"could not draw a layout with {n_mitotic} mitotic and >= {min_interphase} interphase cells")


def _try_layout(rng: np.random.Generator, size: int, n_mitotic: int, cell_scale: float = 1.0) -> Layout | None:
    S = size
    s = S / 256.0 * cell_scale
    n_target = int(rng.integers(9, 22))
    if cell_scale != 1.0:
        n_target = max(1, int(round(n_target / cell_scale ** 2)))
    coverage = rng.uniform(0.35, 0.95)
    r_mean = np.sqrt(coverage * S * S / (n_target * np.pi))
    elong_img = rng.uniform(1.0, 2.2)  # per-image "cell line": rounder or more spread cells
    irregular = rng.uniform(0.05, 0.14)
    radii = r_mean * np.exp(rng.normal(0, 0.22, n_target))
    mit = np.zeros(n_target, bool)
    mit[: min(n_mitotic, n_target)] = True
    spacing = rng.uniform(0.75, 1.1)
    placed = _place_centres(rng, S, radii, spacing, 0.02 * S * min(cell_scale, 1.0), mit)
    if placed is None:
        return None
    idx, centres = placed
    radii, mit = radii[idx], mit[idx]
    n = len(centres)

    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    edge_noise = smooth_noise(rng, (S, S), 6.0 * s) * 0.035
    best = np.full((S, S), np.inf, np.float32)
    lab = np.zeros((S, S), np.int32)
    nuc_shape = np.zeros((S, S), np.int32)
    nuc_c = np.zeros((n, 2))
    nuc_r = np.zeros(n)
    nuc_par = []
    spindle = np.zeros(n)
    for k in range(n):
        cy, cx = centres[k]
        if mit[k]:
            base = radii[k] * MITOTIC_SHRINK
            elong, angle = rng.uniform(1.0, 1.12), rng.uniform(0, np.pi)
            harm, phase, bumps = rng.normal(0, 0.015, 3), rng.uniform(0, 2 * np.pi, 3), []
        else:
            base = radii[k]
            elong = max(1.0, elong_img * np.exp(rng.normal(0, 0.15)))
            angle = rng.uniform(0, np.pi)
            harm = rng.normal(0, irregular, 4) / np.arange(2, 6) ** 0.6
            phase = rng.uniform(0, 2 * np.pi, 4)
            bumps = [(rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.9), rng.uniform(0.15, 0.35))
                     for _ in range(rng.poisson(0.8 * (elong_img - 0.8)))]
        rmax = base * np.sqrt(elong) * (1 + np.abs(harm).sum() + sum(b[1] for b in bumps)) + 2
        y0, y1 = int(max(0, cy - rmax)), int(min(S, cy + rmax + 1))
        x0, x1 = int(max(0, cx - rmax)), int(min(S, cx + rmax + 1))
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        r = np.hypot(dy, dx)
        th = np.arctan2(dy, dx)
        d = r / _blob_radius(th, base, elong, angle, harm, phase, bumps) + edge_noise[y0:y1, x0:x1]
        sub = best[y0:y1, x0:x1]
        win = d < sub
        sub[win] = d[win]
        lab[y0:y1, x0:x1][win] = k + 1

        # nucleus (interphase) or condensed chromosomes (mitotic), drawn in its own shape map
        if mit[k]:
            nuc_c[k] = centres[k]
            spindle[k] = rng.uniform(0, np.pi)
            nuc_r[k] = base * 0.42
            nuc_par.append(("mitotic", base, rng.random() < 0.3))
        else:
            frac = rng.uniform(0.42, 0.56)
            off = rng.uniform(0, 0.14) * base
            oa = rng.uniform(0, 2 * np.pi)
            nuc_c[k] = (cy + off * np.sin(oa), cx + off * np.cos(oa))
            nuc_c[k] = np.clip(nuc_c[k], 0.01 * S, 0.99 * S)
            ne = 1.0 + (elong - 1.0) * rng.uniform(0.3, 0.7) + abs(rng.normal(0, 0.08))
            nb = frac * base / np.sqrt(min(elong, 1.6)) * np.sqrt(ne) ** 0.3
            nuc_r[k] = nb
            nuc_par.append(("interphase", nb, ne, angle + rng.normal(0, 0.25), rng.normal(0, 0.05, 3),
                            rng.uniform(0, 2 * np.pi, 3)))

    lab[best >= 1.0] = 0
    # each cell keeps only the connected piece holding its nucleus centre
    comps = connected_components(lab, background=0, connectivity=1)
    keep_comp = np.zeros(comps.max() + 1, bool)
    for k in range(n):
        y, x = np.clip(np.round(nuc_c[k]).astype(int), 0, S - 1)
        if lab[y, x] == k + 1:
            keep_comp[comps[y, x]] = True
    keep_comp[0] = False
    lab[~keep_comp[comps]] = 0

    # nucleus shapes, clipped to their own cell
    for k in range(n):
        cy, cx = nuc_c[k]
        p = nuc_par[k]
        if p[0] == "mitotic":
            _, base, anaphase = p
            plate_half, plate_w = 0.46 * base, 0.13 * base
            ax = spindle[k]
            offs = (-0.2 * base, 0.2 * base) if anaphase else (0.0,)
            for o in offs:
                py, px = cy + o * np.sin(ax), cx + o * np.cos(ax)
                rr = plate_half + 2
                y0, y1 = int(max(0, py - rr)), int(min(S, py + rr + 1))
                x0, x1 = int(max(0, px - rr)), int(min(S, px + rr + 1))
                dy, dx = yy[y0:y1, x0:x1] - py, xx[y0:y1, x0:x1] - px
                along = dx * np.cos(ax) + dy * np.sin(ax)  # along the spindle axis: plate thickness
                across = -dx * np.sin(ax) + dy * np.cos(ax)
                half = plate_half * (0.7 if anaphase else 1.0)
                inside = (along / plate_w) ** 2 + (across / half) ** 4 < 1
                nuc_shape[y0:y1, x0:x1][inside] = k + 1
        else:
            _, nb, ne, na, harm, phase = p
            rr = nb * np.sqrt(ne) * 1.3 + 2
            y0, y1 = int(max(0, cy - rr)), int(min(S, cy + rr + 1))
            x0, x1 = int(max(0, cx - rr)), int(min(S, cx + rr + 1))
            if y0 >= y1 or x0 >= x1:
                continue
            dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
            d = np.hypot(dy, dx) / _blob_radius(np.arctan2(dy, dx), nb, ne, na, harm, phase, [])
            nuc_shape[y0:y1, x0:x1][d < 1] = k + 1
    nuc_shape[nuc_shape != lab] = 0

    # drop cells whose nucleus or body is mostly outside the field or eaten by neighbours
    ids = np.arange(1, n + 1)
    nuc_area = np.bincount(nuc_shape.ravel(), minlength=n + 1)[1:]
    cell_area = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    full_nuc = np.where(mit, 2 * 0.46 * 0.13 * np.pi * (radii * MITOTIC_SHRINK) ** 2 * 0.8, np.pi * nuc_r ** 2)
    ok = (nuc_area >= 0.3 * full_nuc) & (cell_area >= 0.2 * np.pi * radii ** 2 * np.where(mit, 0.38, 1.0))
    ok &= nuc_area >= max(6, int(8 * s * s))
    if mit.any() and not ok[mit].all():
        return None
    remap = np.zeros(n + 1, np.int32)
    remap[ids[ok]] = np.arange(1, ok.sum() + 1)
    lab = remap[lab]
    nuc_shape = remap[nuc_shape]
    sel = np.flatnonzero(ok)
    K = len(sel)
    if K == 0:
        return None

    def pad(a):
        return np.concatenate([np.zeros((1,) + a.shape[1:], a.dtype), a], 0)

    centre_k, nucc_k = pad(centres[sel]), pad(nuc_c[sel])
    rad_k, nucr_k, mit_k, spindle_k = pad(radii[sel]), pad(nuc_r[sel]), pad(mit[sel]), pad(spindle[sel])

    # direction from nucleus to the cytoplasm's centre of mass; centrosome just beyond the nucleus there
    cnt = np.bincount(lab.ravel(), minlength=K + 1).astype(float)
    cnt[0] = 1
    my = np.bincount(lab.ravel(), weights=yy.ravel(), minlength=K + 1) / cnt
    mx = np.bincount(lab.ravel(), weights=xx.ravel(), minlength=K + 1) / cnt
    vec = np.stack([my, mx], 1) - nucc_k
    norm = np.hypot(vec[:, 0], vec[:, 1])
    rand_ang = rng.uniform(0, 2 * np.pi, K + 1)
    rand_vec = np.stack([np.sin(rand_ang), np.cos(rand_ang)], 1)
    toward = np.where((norm > 0.05 * rad_k)[:, None], vec / np.maximum(norm, 1e-6)[:, None], rand_vec)
    toward[0] = 0
    centrosome = nucc_k + toward * (nucr_k + 0.12 * rad_k)[:, None]
    centrosome = np.clip(centrosome, 0, S - 1)
    for k in range(1, K + 1):  # keep the centrosome inside its own cell
        y, x = np.round(centrosome[k]).astype(int)
        if mit_k[k]:
            centrosome[k] = nucc_k[k]
        elif lab[y, x] != k:
            centrosome[k] = nucc_k[k] + toward[k] * nucr_k[k] * 0.8

    # nucleoli: 1-4 small blobs inside each interphase nucleus
    nucleoli = np.zeros((S, S), bool)
    nl_list: list = [[]]
    for k in range(1, K + 1):
        items = []
        if not mit_k[k]:
            for _ in range(int(rng.integers(1, 5))):
                a = rng.uniform(0, 2 * np.pi)
                d = rng.uniform(0, 0.5) * nucr_k[k]
                r = nucr_k[k] * rng.uniform(0.11, 0.2)
                y, x = nucc_k[k][0] + d * np.sin(a), nucc_k[k][1] + d * np.cos(a)
                items.append((y, x, r))
                y0, y1 = int(max(0, y - r - 1)), int(min(S, y + r + 2))
                x0, x1 = int(max(0, x - r - 1)), int(min(S, x + r + 2))
                if y0 < y1 and x0 < x1:
                    e = rng.uniform(0.8, 1.25)
                    nucleoli[y0:y1, x0:x1] |= ((yy[y0:y1, x0:x1] - y) * e) ** 2 + ((xx[y0:y1, x0:x1] - x) / e) ** 2 < r * r
        nl_list.append(items)
    nucleoli &= nuc_shape > 0
    return Layout(cell_mask=lab, nuclei_mask=nuc_shape, nucleoli=nucleoli, center=centre_k, nuc_center=nucc_k,
                  radius=rad_k, nuc_radius=nucr_k, mitotic=mit_k.astype(bool), toward=toward, centrosome=centrosome,
                  spindle_axis=spindle_k, nucleoli_list=nl_list, size=S, scale=s)
