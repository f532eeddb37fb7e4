"""Intensities of a synthetic field: reference channels and the 19 green class patterns.

Red (microtubules) are filaments drawn from each cell's centrosome to its periphery; yellow
(ER) is a reticular network (the zero set of band-pass noise) dense around the nucleus; blue
is the nucleus with chromatin texture and darker nucleoli. Green is the sum over classes c of
a pattern layer tied to the cell's own structures times a per-cell brightness that is zero in
cells not showing c (see :data:`PATTERNS`). The image then gets optical blur, uneven
illumination, a per-image gain per channel, background and shot/read noise.

All widths are ``pixels_at_256 * s`` with ``s = c * S / 256`` (``Layout.scale``: the field size ``S``
times the cell scale ``c``); only the illumination and the vignette follow the field itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import cv2
import numpy as np
from scipy import ndimage

from hpa.synth.cells import MITOTIC_SHRINK, Layout, smooth_noise
from hpa.synth.difficulty import DIFFICULTIES, Difficulty

__all__ = ["Maps", "compute_maps", "render_field", "PATTERNS", "NUCLEAR_CLASSES", "MITOTIC_ALLOWED"]

#: Classes whose pattern lives inside the interphase nucleus.
NUCLEAR_CLASSES = frozenset({0, 1, 2, 3, 4, 5})
#: Classes a mitotic (rounded) cell may show besides 11 (no nuclear patterns, no 10 which would
#: look like the spindle itself).
MITOTIC_ALLOWED = frozenset({6, 7, 8, 9, 12, 13, 14, 15, 16, 17})


@dataclass
class Maps:
    """Per-pixel helper maps shared by all layers of one field (float32 (S, S) unless said)."""

    lay: Layout
    cell: np.ndarray  # int32 cell ids
    nuc: np.ndarray  # bool nucleus
    cyto: np.ndarray  # bool cytoplasm (cell and not nucleus)
    d_edge: np.ndarray  # distance (px) to the cell's boundary, inside cells
    d_nuc_in: np.ndarray  # distance (px) to the nuclear edge, inside nuclei
    d_nuc_out: np.ndarray  # distance (px) to the nearest nucleus, outside nuclei
    t: np.ndarray  # 0 at the nuclear edge .. 1 at the plasma membrane, in the cytoplasm
    dome: np.ndarray  # 0 at the nuclear edge .. 1 in the middle of the nucleus
    pix: list  # pix[k]: flat indices of cell k's pixels
    cyto_pix: list  # cyto_pix[k]: flat indices of cell k's cytoplasm pixels
    s: float


def compute_maps(lay: Layout) -> Maps:
    """Distance and index maps of a layout (vectorised, a few ms at 256 px)."""
    lab = lay.cell_mask
    S = lab.shape[0]
    nuc = lay.nuclei_mask > 0
    cell = lab > 0
    # boundary pixels: any 4-neighbour with a different label (background included)
    pad = np.pad(lab, 1, mode="edge")
    bnd = np.zeros_like(cell)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        bnd |= pad[dy:dy + S, dx:dx + S] != lab
    d_edge = cv2.distanceTransform((cell & ~bnd).astype(np.uint8), cv2.DIST_L2, 3)
    d_nuc_in = cv2.distanceTransform(nuc.astype(np.uint8), cv2.DIST_L2, 3)
    d_nuc_out = cv2.distanceTransform((~nuc).astype(np.uint8), cv2.DIST_L2, 3)
    cyto = cell & ~nuc
    t = np.where(cyto, d_nuc_out / (d_nuc_out + d_edge + 1.0), 0).astype(np.float32)
    k_max = int(lab.max())
    peak = ndimage.maximum(d_nuc_in, labels=lay.nuclei_mask, index=np.arange(k_max + 1)) if k_max else np.zeros(1)
    peak = np.maximum(np.asarray(peak, np.float32), 1.0)
    dome = np.where(nuc, np.clip(d_nuc_in / peak[lay.nuclei_mask], 0, 1), 0).astype(np.float32)
    flat = lab.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(k_max + 2))
    pix = [order[bounds[k]:bounds[k + 1]] for k in range(k_max + 1)]
    cflat = cyto.ravel()
    cyto_pix = [p[cflat[p]] for p in pix]
    return Maps(lay, lab, nuc, cyto, d_edge, d_nuc_in, d_nuc_out, t, dome, pix, cyto_pix, lay.scale)


# ----------------------------------------------------------------------------- drawing helpers
def splat(shape, ys, xs, amps, sigma: float) -> np.ndarray:
    """Gaussian dots of peak about ``amps`` at (ys, xs): float32 ``shape``."""
    out = np.zeros(shape, np.float32)
    if len(ys) == 0:
        return out
    yi = np.clip(np.round(ys).astype(int), 0, shape[0] - 1)
    xi = np.clip(np.round(xs).astype(int), 0, shape[1] - 1)
    np.add.at(out, (yi, xi), np.asarray(amps, np.float32))
    sigma = max(float(sigma), 0.55)  # narrower dots would fall between pixels at small field sizes
    ks = 2 * int(np.ceil(3 * sigma)) + 1
    centre = float(cv2.getGaussianKernel(ks, sigma)[ks // 2, 0]) ** 2
    return cv2.GaussianBlur(out, (ks, ks), sigma) / np.float32(centre)


def draw_lines(shape, lines: list, amps, s: float, blur: float = 0.6) -> np.ndarray:
    """Poly-lines (each an (n, 2) array of (y, x)) of brightness ``amps``, blurred: float32 ``shape``."""
    out = np.zeros(shape, np.float32)
    if not lines:
        return out
    th = max(1, int(round(s)))
    amps = np.asarray(amps, np.float32)
    # group by quantised brightness: one polylines call per level
    levels = np.clip(np.round(amps * 8), 1, 8).astype(int)
    for lv in np.unique(levels):
        pts = [np.round(lines[i][:, ::-1] * 16).astype(np.int32) for i in np.flatnonzero(levels == lv)]
        layer = np.zeros(shape, np.float32)
        cv2.polylines(layer, pts, False, 1.0, th, cv2.LINE_8, shift=4)
        out = np.maximum(out, layer * (lv / 8.0))
    return cv2.GaussianBlur(out, (0, 0), max(blur * s, 0.35))


def bezier(p0: np.ndarray, p1: np.ndarray, bend: np.ndarray, n: int = 8) -> np.ndarray:
    """Quadratic Bezier curves from p0 to p1 bowed sideways by ``bend`` (fraction of length).

    p0, p1: (L, 2); bend: (L,). Returns (L, n, 2).
    """
    mid = 0.5 * (p0 + p1)
    d = p1 - p0
    perp = np.stack([-d[:, 1], d[:, 0]], 1)
    ctrl = mid + perp * bend[:, None]
    u = np.linspace(0, 1, n)[None, :, None]
    return (1 - u) ** 2 * p0[:, None] + 2 * (1 - u) * u * ctrl[:, None] + u ** 2 * p1[:, None]


def _sample_pix(rng, pix: np.ndarray, n: int, S: int, weights: np.ndarray | None = None):
    """n random pixels (y, x floats with sub-pixel jitter) from flat indices ``pix``."""
    if len(pix) == 0 or n <= 0:
        return np.zeros(0), np.zeros(0)
    p = None if weights is None else weights / weights.sum()
    idx = rng.choice(pix, size=n, p=p)
    return idx // S + rng.uniform(-0.5, 0.5, n), idx % S + rng.uniform(-0.5, 0.5, n)


def _w(px_at_256: float, s: float, lo: float = 0.8) -> float:
    """A width of ``px_at_256`` pixels scaled to the field, but never below ``lo`` pixels."""
    return max(px_at_256 * s, lo)


def paint_cells(values: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Per-cell values (K+1,) painted on the cell mask: float32 (S, S) (0 outside cells)."""
    v = np.asarray(values, np.float32).copy()
    v[0] = 0
    return v[cell]


# ----------------------------------------------------------------------------- reference structures
def microtubules(rng, m: Maps) -> tuple[np.ndarray, np.ndarray]:
    """Red structure: radial filament arrays of interphase cells and spindles of mitotic cells.

    Returns (interphase microtubules, spindles), float32 (S, S) in about [0, 1].
    """
    lay, S, s = m.lay, m.cell.shape[0], m.s
    lines, amps, sp_lines, sp_amps = [], [], [], []
    for k in range(1, lay.n_cells + 1):
        R = lay.radius[k]
        if lay.mitotic[k]:
            sp, sa = _spindle_lines(rng, lay, k)
            sp_lines += sp
            sp_amps += sa
            continue
        n = int(np.clip(1.3 * R / s, 12, 90))
        w = m.t.ravel()[m.cyto_pix[k]] + 0.3
        ey, ex = _sample_pix(rng, m.cyto_pix[k], n, S, w)
        if len(ey) == 0:
            continue
        p1 = np.stack([ey, ex], 1)
        # half of the filaments start at the centrosome, the rest around the nucleus edge
        nc = lay.nuc_center[k]
        d = p1 - nc[None]
        d /= np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-6)[:, None]
        p0 = nc[None] + d * lay.nuc_radius[k] * rng.uniform(0.7, 1.05, len(ey))[:, None]
        from_c = (rng.random(len(ey)) < 0.6) & ((d @ lay.toward[k]) > 0.1)  # only toward the cell's bulk
        p0[from_c] = lay.centrosome[k][None] + rng.normal(0, 1.0 * s, (int(from_c.sum()), 2))
        p1 = p0 + (p1 - p0) * rng.uniform(1.0, 1.15, len(ey))[:, None]
        curves = bezier(p0, p1, rng.normal(0, 0.25, len(ey)), 10)
        lines += list(curves)
        amps += list(rng.uniform(0.3, 1.0, len(ey)) ** 2)
        # a meshwork of shorter curved filaments in the cell body
        n2 = n // 2
        y, x = _sample_pix(rng, m.cyto_pix[k], n2, S)
        ang = rng.uniform(0, 2 * np.pi, n2)
        half = (rng.uniform(0.15, 0.35, n2) * R)[:, None] * np.stack([np.sin(ang), np.cos(ang)], 1)
        mid = np.stack([y, x], 1)
        lines += list(bezier(mid - half, mid + half, rng.normal(0, 0.3, n2), 6))
        amps += list(rng.uniform(0.1, 0.5, n2))
    mt = draw_lines((S, S), lines, amps, s, 0.55)
    sp = draw_lines((S, S), sp_lines, sp_amps, s, 0.6)
    mt = np.clip(mt, 0, 1) * (m.cell > 0) * np.where(m.nuc, 0.25, 0.3 + 0.7 * np.sqrt(m.t))  # sparse near the nucleus
    return mt, np.clip(sp, 0, 1) * (m.cell > 0)

def _spindle_lines(rng, lay: Layout, k: int):
    """Spindle of mitotic cell k: fibres from two poles to the chromosome plate, plus astral rays."""
    c = lay.nuc_center[k]
    R = lay.radius[k] * MITOTIC_SHRINK
    ax = lay.spindle_axis[k]
    u = np.array([np.sin(ax), np.cos(ax)])  # (y, x) along the spindle axis
    v = np.array([u[1], -u[0]])
    lines, amps = [], []
    for sign in (-1, 1):
        pole = c + sign * 0.55 * R * u
        n = 14
        across = rng.uniform(-0.42, 0.42, n) * R
        ends = c[None] + across[:, None] * v[None] + rng.normal(0, 0.03 * R, (n, 1)) * u[None]
        p0 = np.repeat(pole[None], n, 0)
        curves = bezier(p0, ends, -np.sign(across) * sign * rng.uniform(0.05, 0.15, n), 8)
        lines += list(curves)
        amps += list(rng.uniform(0.5, 1.0, n))
        ang = rng.uniform(0, 2 * np.pi, 6)  # astral microtubules
        dirs = np.stack([np.sin(ang), np.cos(ang)], 1)
        keep = (dirs @ u) * sign > -0.2
        for d in dirs[keep]:
            lines.append(np.stack([pole, pole + d * R * rng.uniform(0.2, 0.4)]))
            amps.append(rng.uniform(0.3, 0.6))
    return lines, amps


def er_network(rng, m: Maps) -> np.ndarray:
    """Yellow structure: reticular ER network, dense around the nucleus, float32 (S, S) in [0, 1]."""
    S, s = m.cell.shape[0], m.s
    white = rng.standard_normal((S, S)).astype(np.float32)
    band = cv2.GaussianBlur(white, (0, 0), 0.9 * s) - cv2.GaussianBlur(white, (0, 0), 2.2 * s)
    band /= float(band.std()) + 1e-6
    ridge = np.exp(-(band / 0.45) ** 2)
    dens = np.exp(-m.t / 0.5) * 0.8 + 0.2
    env = np.exp(-((m.d_nuc_out - 1) / _w(1.2, s)) ** 2) * m.cyto  # nuclear envelope is part of the ER
    grain = np.clip(1 + 0.35 * cv2.GaussianBlur(white, (0, 0), 0.6 * s) / 0.4, 0.3, 2)
    er = m.cyto * dens * (0.45 + 0.55 * ridge) * grain + 0.5 * env
    return er.astype(np.float32)


# ----------------------------------------------------------------------------- green class patterns
def _own(m: Maps, amp: np.ndarray) -> np.ndarray:
    """float32 (S, S): 1 inside the cells that show the pattern (amp > 0), so no dot spills into a neighbour."""
    return (amp[m.cell] > 0).astype(np.float32) * (m.cell > 0)


def _nuc_texture(rng, m: Maps, sigma: float = 1.5) -> np.ndarray:
    return 0.75 + 0.25 * np.clip(smooth_noise(rng, m.cell.shape, sigma * m.s), -2, 2) / 2


def p_nucleoplasm(rng, m, amp, ctx):
    if ctx.get("confusable"):  # granular, closer to speckles
        tex = 0.6 + 0.4 * np.clip(smooth_noise(rng, m.cell.shape, 1.0 * m.s), -2, 2) / 2
    else:
        tex = _nuc_texture(rng, m)
    return amp[m.lay.nuclei_mask] * m.nuc * tex * (1 - 0.75 * m.lay.nucleoli) * (0.55 + 0.45 * np.sqrt(m.dome))


def p_nuclear_membrane(rng, m, amp, ctx):
    s = m.s
    rim = np.where(m.nuc, np.exp(-((m.d_nuc_in - 1) / _w(1.0, s)) ** 2), np.exp(-((m.d_nuc_out - 1) / _w(0.8, s)) ** 2) * 0.7)
    beads = 0.7 + 0.3 * np.clip(smooth_noise(rng, m.cell.shape, 1.0 * s), -2, 2) / 2
    return amp[m.cell] * rim * beads * (m.cell > 0)


def p_nucleoli(rng, m, amp, ctx):
    nl = cv2.GaussianBlur(m.lay.nucleoli.astype(np.float32), (0, 0), 0.6 * m.s)
    return amp[m.cell] * (nl * (0.8 + 0.2 * _nuc_texture(rng, m, 0.8)) + 0.06 * m.nuc)


def p_fibrillar_center(rng, m, amp, ctx):
    ys, xs, a = [], [], []
    for k in np.flatnonzero(amp > 0):
        for (y, x, r) in m.lay.nucleoli_list[k]:
            n = int(rng.integers(2, 6))
            ang, rad = rng.uniform(0, 2 * np.pi, n), np.sqrt(rng.uniform(0, 1, n)) * r * 0.7
            ys += list(y + rad * np.sin(ang))
            xs += list(x + rad * np.cos(ang))
            a += list(amp[k] * rng.uniform(0.6, 1.0, n))
    dots = splat(m.cell.shape, np.array(ys), np.array(xs), a, 0.6 * m.s)
    return dots * m.nuc * _own(m, amp) + 0.03 * amp[m.lay.nuclei_mask] * m.nuc


def p_speckles(rng, m, amp, ctx):
    if ctx.get("confusable"):  # fewer, rounder spots, closer to nuclear bodies
        n = smooth_noise(rng, m.cell.shape, 1.5 * m.s)
        sp = np.clip((n - 1.0) / 0.8, 0, 1) ** 0.5
    else:
        n = smooth_noise(rng, m.cell.shape, 1.1 * m.s)
        sp = np.clip((n - 0.6) / 1.0, 0, 1) ** 0.7
    return amp[m.lay.nuclei_mask] * m.nuc * (1 - m.lay.nucleoli) * (sp + 0.12)


def p_nuclear_bodies(rng, m, amp, ctx):
    ys, xs, a, sig = [], [], [], (1.0 if ctx.get("confusable") else 1.3) * m.s
    S = m.cell.shape[0]
    inner = m.nuc & (m.dome > 0.25) & ~m.lay.nucleoli
    inner_flat = inner.ravel()
    lo, hi = (3, 13) if ctx.get("confusable") else (1, 7)  # confusable: more, smaller bodies, closer to speckles
    for k in np.flatnonzero(amp > 0):
        pk = m.pix[k][inner_flat[m.pix[k]]]
        y, x = _sample_pix(rng, pk, int(rng.integers(lo, hi)), S)
        ys += list(y)
        xs += list(x)
        a += list(amp[k] * rng.uniform(0.6, 1.0, len(y)))
    return splat(m.cell.shape, np.array(ys), np.array(xs), a, sig) * m.nuc * _own(m, amp) + 0.04 * amp[m.lay.nuclei_mask] * m.nuc


def p_er(rng, m, amp, ctx):
    if ctx.get("confusable"):  # half the network's contrast, closer to cytosol
        return amp[m.cell] * (0.5 * ctx["er"] + 0.35 * m.cyto * (1 - 0.4 * m.t))
    return amp[m.cell] * ctx["er"]


def p_golgi(rng, m, amp, ctx):
    ys, xs, a = [], [], []
    lay, s = m.lay, m.s
    for k in np.flatnonzero(amp > 0):
        R, u = lay.radius[k], lay.toward[k]
        if lay.mitotic[k]:  # fragmented Golgi scattered through the rounded cell
            n = 30
            ang, rad = rng.uniform(0, 2 * np.pi, n), rng.uniform(0.3, 0.55, n) * R * MITOTIC_SHRINK
            ys += list(lay.nuc_center[k][0] + rad * np.sin(ang))
            xs += list(lay.nuc_center[k][1] + rad * np.cos(ang))
            a += list(amp[k] * rng.uniform(0.4, 0.9, n))
            continue
        g = lay.nuc_center[k] + u * (lay.nuc_radius[k] + 0.06 * R)
        v = np.array([u[1], -u[0]])
        n = int(rng.integers(14, 26))
        spread = (0.35, 0.16) if ctx.get("confusable") else (0.22, 0.07)  # confusable: dispersed, like vesicles
        along = rng.normal(0, spread[0] * R, n)  # ribbon hugging the nucleus
        out = np.abs(rng.normal(0, spread[1] * R, n))
        p = g[None] + along[:, None] * v[None] + out[:, None] * u[None] - (along ** 2 / (2.5 * lay.nuc_radius[k]))[:, None] * u[None]
        ys += list(p[:, 0])
        xs += list(p[:, 1])
        a += list(amp[k] * rng.uniform(0.5, 1.0, n))
    dots = splat(m.cell.shape, np.array(ys), np.array(xs), a, 0.9 * s)
    return np.minimum(dots, amp[m.cell] * 1.2) * _own(m, amp)


def p_intermediate_filaments(rng, m, amp, ctx):
    lay, s, S = m.lay, m.s, m.cell.shape[0]
    lines, la = [], []
    for k in np.flatnonzero(amp > 0):
        R = lay.radius[k]
        n = int(np.clip(0.55 * R / s, 10, 40))
        y, x = _sample_pix(rng, m.pix[k], n, S)
        steps = 14
        heading = rng.uniform(0, 2 * np.pi, n)[:, None] + np.cumsum(rng.normal(0, 0.28, (n, steps)), 1)
        step = 0.16 * R
        pts = np.stack([y[:, None] + np.cumsum(step * np.sin(heading), 1), x[:, None] + np.cumsum(step * np.cos(heading), 1)], 2)
        pts = np.concatenate([np.stack([y, x], 1)[:, None], pts], 1)
        lines += list(pts)
        la += list(rng.uniform(0.4, 1.0, n))
    f = draw_lines(m.cell.shape, lines, la, s, 0.65)
    return amp[m.cell] * np.clip(f * 1.3, 0, 1) * (1.2 - 0.5 * m.t) * (1 - 0.5 * m.nuc)


def p_actin(rng, m, amp, ctx):
    lay, s = m.lay, m.s
    lines, la = [], []
    for k in np.flatnonzero(amp > 0):
        R = lay.radius[k]
        c = lay.center[k]
        th = rng.uniform(0, np.pi)
        u = np.array([np.sin(th), np.cos(th)])
        v = np.array([u[1], -u[0]])
        offs = np.arange(-1.6 * R, 1.6 * R, rng.uniform(3.0, 5.0) * s)
        offs = offs + rng.uniform(-1, 1, len(offs)) * s
        keep = rng.random(len(offs)) < 0.75
        for o in offs[keep]:
            a = th + rng.normal(0, 0.05)
            ua = np.array([np.sin(a), np.cos(a)])
            p = c + o * v
            lines.append(np.stack([p - 2 * R * ua, p + 2 * R * ua]))
            la.append(rng.uniform(0.3, 1.0))
    f = draw_lines(m.cell.shape, lines, la, s, 0.5)
    cortex = np.exp(-(m.d_edge / _w(1.2, s)) ** 2) * 0.5
    return amp[m.cell] * np.clip(f + cortex, 0, 1) * (m.cell > 0)


def p_microtubules(rng, m, amp, ctx):
    return amp[m.cell] * ctx["mt"]


def p_spindle(rng, m, amp, ctx):
    lay = m.lay
    poles_y, poles_x, a = [], [], []
    for k in np.flatnonzero(amp > 0):
        c, ax, R = lay.nuc_center[k], lay.spindle_axis[k], lay.radius[k] * MITOTIC_SHRINK
        for sign in (-1, 1):
            poles_y.append(c[0] + sign * 0.55 * R * np.sin(ax))
            poles_x.append(c[1] + sign * 0.55 * R * np.cos(ax))
            a.append(amp[k])
    poles = splat(m.cell.shape, np.array(poles_y), np.array(poles_x), a, 1.0 * m.s)
    return amp[m.cell] * ctx["spindle"] * 1.2 + poles * _own(m, amp)


def p_centrosome(rng, m, amp, ctx):
    lay, s = m.lay, m.s
    ys, xs, a = [], [], []
    for k in np.flatnonzero(amp > 0):
        if lay.mitotic[k]:  # the two spindle poles
            c, ax, R = lay.nuc_center[k], lay.spindle_axis[k], lay.radius[k] * MITOTIC_SHRINK
            for sign in (-1, 1):
                ys.append(c[0] + sign * 0.55 * R * np.sin(ax))
                xs.append(c[1] + sign * 0.55 * R * np.cos(ax))
                a.append(amp[k])
            continue
        c = lay.centrosome[k]
        ys.append(c[0])
        xs.append(c[1])
        a.append(amp[k])
        if ctx.get("confusable"):  # a small cloud of satellites, like a compact Golgi
            n = int(rng.integers(2, 5))
            ang, rad = rng.uniform(0, 2 * np.pi, n), rng.uniform(2.0, 5.0, n) * s
            ys += list(c[0] + rad * np.sin(ang))
            xs += list(c[1] + rad * np.cos(ang))
            a += list(amp[k] * rng.uniform(0.3, 0.7, n))
        elif rng.random() < 0.6:
            ang = rng.uniform(0, 2 * np.pi)
            ys.append(c[0] + 2.2 * s * np.sin(ang))
            xs.append(c[1] + 2.2 * s * np.cos(ang))
            a.append(amp[k] * rng.uniform(0.6, 1.0))
    return splat(m.cell.shape, np.array(ys), np.array(xs), a, 0.85 * s) * _own(m, amp) + 0.02 * amp[m.cell]


def p_plasma_membrane(rng, m, amp, ctx):
    rim = np.exp(-(m.d_edge / _w(1.1, m.s)) ** 2)
    beads = 0.75 + 0.25 * np.clip(smooth_noise(rng, m.cell.shape, 1.5 * m.s), -2, 2) / 2
    return amp[m.cell] * (rim * beads + 0.05 * m.cyto) * (m.cell > 0)


def p_mitochondria(rng, m, amp, ctx):
    s, S = m.s, m.cell.shape[0]
    lines, la = [], []
    tflat = m.t.ravel()
    for k in np.flatnonzero(amp > 0):
        dense, length, most = (12, (1.0, 2.5), 300) if ctx.get("confusable") else (22, (1.5, 4.5), 200)  # granular
        n = int(np.clip(len(m.cyto_pix[k]) / (dense * s * s), 10, most))
        w = (1.05 - tflat[m.cyto_pix[k]]) ** 1.5 + 0.05
        y, x = _sample_pix(rng, m.cyto_pix[k], n, S, w)
        ang = rng.uniform(0, 2 * np.pi, len(y))
        L = rng.uniform(*length, len(y)) * s
        d = np.stack([np.sin(ang), np.cos(ang)], 1) * L[:, None]
        p0 = np.stack([y, x], 1) - d
        p1 = np.stack([y, x], 1) + d
        lines += list(bezier(p0, p1, rng.normal(0, 0.25, len(y)), 5))
        la += list(rng.uniform(0.5, 1.0, len(y)))
    f = draw_lines(m.cell.shape, lines, la, s, 0.55)
    return amp[m.cell] * np.clip(f * 1.4, 0, 1) * m.cyto


def p_aggresome(rng, m, amp, ctx):
    lay, s = m.lay, m.s
    ys, xs, a = [], [], []
    for k in np.flatnonzero(amp > 0):
        ang = np.arctan2(*lay.toward[k]) + rng.normal(0, 0.5)
        u = np.array([np.sin(ang), np.cos(ang)])
        c = lay.nuc_center[k] + u * (lay.nuc_radius[k] + 0.12 * lay.radius[k])
        for _ in range(3):
            p = c + rng.normal(0, 1.2 * s, 2)
            ys.append(p[0])
            xs.append(p[1])
            a.append(amp[k] * rng.uniform(0.5, 0.8))
    blob = splat(m.cell.shape, np.array(ys), np.array(xs), a, 2.3 * s)
    return np.minimum(blob, 1.3) * _own(m, amp) + 0.05 * amp[m.cell] * m.cyto


def p_cytosol(rng, m, amp, ctx):
    if ctx.get("confusable"):  # a fine grain, closer to ER and mitochondria
        tex = 0.65 + 0.35 * np.clip(smooth_noise(rng, m.cell.shape, 0.8 * m.s), -2, 2) / 2
    else:
        tex = 0.8 + 0.2 * np.clip(smooth_noise(rng, m.cell.shape, 2.0 * m.s), -2, 2) / 2
    return amp[m.cell] * (m.cyto * tex * (1 - 0.25 * m.t) * np.minimum(1, 0.4 + m.d_edge / (3 * m.s)) + 0.15 * m.nuc)


def p_vesicles(rng, m, amp, ctx):
    s, S = m.s, m.cell.shape[0]
    ys, xs, a = [], [], []
    for k in np.flatnonzero(amp > 0):
        n = int(np.clip(len(m.cyto_pix[k]) / (45 * s * s), 12, 90))
        w = (1.05 - m.t.ravel()[m.cyto_pix[k]]) ** 2 + 0.05 if ctx.get("confusable") else None  # perinuclear, like Golgi
        y, x = _sample_pix(rng, m.cyto_pix[k], n, S, w)
        ys += list(y)
        xs += list(x)
        a += list(amp[k] * rng.uniform(0.4, 1.0, len(y)))
    return splat(m.cell.shape, np.array(ys), np.array(xs), a, 0.8 * s) * m.cyto * _own(m, amp)


#: Green pattern per class: ``f(rng, maps, amp (K+1,) per-cell brightness, ctx) -> float32 (S, S)``.
PATTERNS: dict[int, Callable] = {
    0: p_nucleoplasm, 1: p_nuclear_membrane, 2: p_nucleoli, 3: p_fibrillar_center, 4: p_speckles,
    5: p_nuclear_bodies, 6: p_er, 7: p_golgi, 8: p_intermediate_filaments, 9: p_actin, 10: p_microtubules,
    11: p_spindle, 12: p_centrosome, 13: p_plasma_membrane, 14: p_mitochondria, 15: p_aggresome,
    16: p_cytosol, 17: p_vesicles,
}

#: Typical peak brightness of each pattern (before per-cell variation); small dots are brighter.
_BASE_AMP = np.array([0.55, 0.7, 0.8, 1.0, 0.75, 0.9, 0.6, 0.8, 0.7, 0.7, 0.65, 0.85, 1.0, 0.7, 0.7, 0.9, 0.45, 0.85])


# ----------------------------------------------------------------------------- the field
def render_field(rng: np.random.Generator, lay: Layout, cell_labels: list[tuple[int, ...]],
                 difficulty: Difficulty = DIFFICULTIES["default"]) -> np.ndarray:
    """Render a layout and per-cell classes into a ``(4, S, S)`` uint8 field (red, green, blue, yellow).

    Args:
        rng: random generator.
        lay: the geometry from :func:`hpa.synth.cells.make_layout`.
        cell_labels: ``cell_labels[k - 1]`` = classes shown by cell k (``(18,)`` for negative).
        difficulty: expression spread, pattern variants and confusable classes
            (:mod:`hpa.synth.difficulty`); the default draws exactly what it always drew.
    """
    K = lay.n_cells
    if len(cell_labels) != K:
        raise ValueError(f"cell_labels has {len(cell_labels)} entries for {K} cells")
    m = compute_maps(lay)
    S, s = lay.size, lay.scale
    shape = (S, S)
    cellm = m.cell > 0
    mt, spindle = microtubules(rng, m)
    er = er_network(rng, m)
    ctx = {"mt": mt, "er": er, "spindle": spindle, "confusable": difficulty.confusable}
    mitm = lay.mitotic[m.cell] & cellm

    # per-cell expression of the reference markers
    g_red = paint_cells(np.exp(rng.normal(0, 0.2, K + 1)), m.cell)
    g_yel = paint_cells(np.exp(rng.normal(0, 0.2, K + 1)), m.cell)
    g_blue = paint_cells(np.exp(rng.normal(0, 0.18, K + 1)), lay.nuclei_mask)

    diffuse = m.cyto * (1 - 0.5 * m.t)
    red = 0.8 * mt + 0.1 * diffuse + 0.05 * m.nuc + 0.9 * spindle
    red = np.where(mitm, 0.45 * (0.7 + 0.3 * _nuc_texture(rng, m, 2.0)) + 0.9 * spindle, red) * g_red
    yellow = np.where(mitm, 0.55 * (0.6 + 0.4 * np.exp(-(m.d_nuc_out / (6 * s)) ** 2)) * er.clip(0.4, 1) / 0.7,
                      er + 0.04 * m.nuc) * g_yel
    chrom = 0.8 + 0.2 * np.clip(smooth_noise(rng, shape, 0.8 * s), -2, 2) / 2 + 0.12 * np.clip(smooth_noise(rng, shape, 2.5 * s), -2, 2) / 2
    blue = m.nuc * (0.45 + 0.55 * np.sqrt(m.dome)) * chrom * (1 - 0.35 * lay.nucleoli) * g_blue
    blue = np.where(lay.mitotic[lay.nuclei_mask] & m.nuc, 1.0 * chrom, blue)

    # green: class patterns with per-cell brightness
    green = np.zeros(shape, np.float32)
    shown = np.zeros((K + 1, 18), bool)
    for k, labs in enumerate(cell_labels, start=1):
        for c in labs:
            if c != 18:
                shown[k, c] = True
    cell_gain = _cell_gain(rng, K, difficulty)
    for c in np.flatnonzero(shown.any(0)):
        amp = np.where(shown[:, c], _BASE_AMP[c] * cell_gain * np.exp(rng.normal(0, 0.15, K + 1)), 0.0)
        amp[0] = 0
        if difficulty.variants:
            green += variant_pattern(rng, m, int(c), int(rng.integers(len(VARIANTS))), amp.astype(np.float32), ctx)
        else:
            green += PATTERNS[int(c)](rng, m, amp.astype(np.float32), ctx).astype(np.float32)
    # faint non-specific staining in every cell (what a Negative cell shows)
    green += (0.03 * diffuse + 0.015 * m.nuc) * paint_cells(np.exp(rng.normal(0, 0.3, K + 1)), m.cell)

    chans = [red, green, blue, yellow]
    illum = 1.0 + 0.22 * np.clip(smooth_noise(rng, shape, S / 3.0), -2, 2) / 2
    illum = illum * (1 - 0.15 * _vignette(S))
    out = np.empty((4,) + shape, np.uint8)
    gains = np.exp(rng.normal(0, 0.25, 4)) * np.array([0.7, rng.uniform(0.6, 1.1), 0.8, 0.75])
    for i, ch in enumerate(chans):
        x = cv2.GaussianBlur(ch.astype(np.float32), (0, 0), 0.5 * s) * illum * gains[i]
        bg = rng.uniform(0.0, 0.012)
        x = x + bg + np.sqrt(np.maximum(x, 0) * 0.0015) * rng.standard_normal(shape).astype(np.float32)
        x = x + rng.uniform(0.002, 0.006) * rng.standard_normal(shape).astype(np.float32)
        out[i] = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    return out


def _cell_gain(rng, K: int, d: Difficulty) -> np.ndarray:
    """Per-cell brightness factor (K+1,): log-normal (sd 0.35) by default; with ``d.expression_range``
    log-uniform over it, and a share ``d.weak_frac`` of cells barely above a negative cell."""
    if d.expression_range is None:
        return np.exp(rng.normal(0, 0.35, K + 1))
    lo, hi = np.log(d.expression_range)
    gain = np.exp(rng.uniform(lo, hi, K + 1))
    weak = rng.random(K + 1) < d.weak_frac
    gain[weak] = rng.uniform(*d.weak_range, int(weak.sum()))
    return gain


#: The three variants of a class (``variant_pattern``): (size factor of its structures, where in the
#: cell they sit, patchy). Nuclear classes read "inner"/"outer" within the nucleus, the others
#: within the cytoplasm ("outer": the side of the cell away from the nucleus).
VARIANTS = ((1.0, "all", False), (1.6, "inner", False), (0.7, "outer", True))
#: Classes whose pattern lives in the nucleus; classes drawn from a shared structure (no size variant).
_NUCLEAR = frozenset({0, 1, 2, 3, 4, 5})
_SHARED = frozenset({6, 10, 11})


def variant_pattern(rng, m: Maps, c: int, v: int, amp: np.ndarray, ctx: dict) -> np.ndarray:
    """Class ``c``'s pattern in variant ``v`` of :data:`VARIANTS`: float32 (S, S).

    The size factor scales the widths (and with them the number) of its dots, rods and
    filaments; the location weights the pattern towards the middle or the edge of the nucleus
    (nuclear classes) or towards the nucleus or the far side of the cell (the others; the
    plasma membrane's "inner" variant is a rim on one side); patchy multiplies it by smooth
    blotches. Variant 0 is the class's ordinary pattern.
    """
    size, where, patchy = VARIANTS[v]
    mm = m if size == 1.0 or c in _SHARED else replace(m, s=m.s * size)
    pat = PATTERNS[c](rng, mm, amp, ctx).astype(np.float32)
    if where != "all":
        if c in _NUCLEAR:
            w = m.dome if where == "inner" else 1.0 - m.dome
            pat *= np.where(m.nuc, 0.2 + 0.8 * w, 1.0).astype(np.float32)
        elif c == 13 or where == "outer":  # one side of the cell: away from the nucleus
            pat *= (0.15 + 0.85 * _polarity(m)).astype(np.float32)
        else:
            pat *= np.where(m.cyto, 0.2 + 0.8 * np.exp(-m.t / 0.35), 1.0).astype(np.float32)
    if patchy:
        pat *= (0.3 + 0.7 * np.clip((smooth_noise(rng, m.cell.shape, 3.0 * m.s) + 1) / 2, 0, 1)).astype(np.float32)
    return pat


def _polarity(m: Maps) -> np.ndarray:
    """float32 (S, S) in [0, 1]: how far each cell pixel lies towards its cell's bulk (``Layout.toward``)."""
    lay = m.lay
    yy, xx = np.mgrid[0:m.cell.shape[0], 0:m.cell.shape[1]].astype(np.float32)
    k = m.cell
    dy, dx = yy - lay.nuc_center[k, 0], xx - lay.nuc_center[k, 1]
    along = (dy * lay.toward[k, 0] + dx * lay.toward[k, 1]) / np.maximum(lay.radius[k], 1.0)
    return (np.clip(0.5 + along, 0, 1) * (k > 0)).astype(np.float32)


def _vignette(S: int) -> np.ndarray:
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    r2 = ((yy - S / 2) ** 2 + (xx - S / 2) ** 2) / (S * S / 2)
    return r2
