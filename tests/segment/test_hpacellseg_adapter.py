"""Tests of the HPA-Cell-Segmentation adapter against a STAND-IN hpacellseg package.

The real package cannot be installed here (no weights, not on PyPI), so each test injects
a stand-in into ``sys.modules``. It is written for these tests from a description of the
real 0.1.8 (not copied from it) and behaves like it wherever the adapter could notice:

* ``CellSegmentator(nuclei_model, cell_model, scale_factor, device, padding,
  multi_channel_model)``: a model given as a path would be loaded or DOWNLOADED (here: an
  error); models are used as given, ``eval()`` is never called;
* ``pred_nuclei`` / ``pred_cells``: ``skimage.transform.rescale(..., multichannel=True)``
  (uint8 / 255, uint16 / 65535), nuclei from the blue channel only, cells from
  (red, yellow, blue) with ER required by the 3-channel model and refused by the
  2-channel one; the package's reflect padding (32 px top/left, 32 - n % 32
  bottom/right) or an error when the scaled size is no multiple of 32; normalisation with
  the package's mean and std; probabilities to uint8 before (nuclei) or after (cells) the
  restore; channel 0 zeroed; the resize back with ``(shape[0], shape[1])`` as
  (width, height), which swaps height and width for non-square inputs. Output uint8
  ``(H, W, 3)``: channel 1 border, channel 2 interior probability x 255. The "networks"
  are smooth thresholds of the input (interior) and their local range (border);
* ``utils.label_cell``: the real rules step by step (areas 500/1000/8/2500/5500 px, the
  uint8 sum of the border channels, Otsu-based cell threshold, the uint8 narrowing of the
  first cell labels, closing with disk(6), boundary removal and hole filling, growth
  into the border channel, 8-connected relabelling, uint16 output), calling
  scikit-image's filters with the same arguments, so that area bounds behave as the
  package's do on the installed scikit-image (inclusive from 0.26).

Hand-built predictions (rectangles whose fate follows from those rules) pin the
stand-in's ``label_cell`` down pixel for pixel, and the project's own implementation of
the rules (``hpa.segment.hpacellseg_labels``) is checked against both.
"""

from __future__ import annotations

import logging
import sys
import types
import warnings

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from test_segment import draw_field, grid_centres  # noqa: E402  (tests/ is on sys.path under pytest)

from hpa.eval.matching import match_cells
from hpa.segment import get_segmenter, resolve_segmenter
from hpa.segment import hpacellseg_adapter as adapter
from hpa.segment import hpacellseg_labels as labels
from hpa.segment.common import check_masks

REF = 512  # reference_size of these tests: 128-px fields are enlarged 4x, so cells reach label_cell's areas
NORM_MEAN = np.array([124, 117, 104]) / 255.0  # the package's normalisation
NORM_STD = np.full(3, 1 / (0.0167 * 255))


def _skimage_inclusive() -> bool:
    """Does ``remove_small_objects(x, n)`` drop objects of exactly n px on this scikit-image (0.26+)?"""
    from skimage.morphology import remove_small_objects

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return not remove_small_objects(np.ones((1, 2), bool), 2).any()


INCLUSIVE = _skimage_inclusive()


# ------------------------------------------------------------------ the stand-in package
def fake_unet(x: np.ndarray, kind: str, multi_channel: bool) -> np.ndarray:
    """Stand-in network: normalised (1, 3, h, w) input -> (1, 3, h, w) probabilities (sum 1).

    Interior = ramp of the signal (nuclei: blue; cells: mean of red and yellow, or red);
    border = half the 3x3 range of the interior; background = the rest.
    """
    img = x[0] * NORM_STD[:, None, None] + NORM_MEAN[:, None, None]
    if kind == "nuclei":
        s, lo, hi = img[2], 0.25, 0.55
    else:
        s, lo, hi = ((img[0] + img[1]) / 2 if multi_channel else img[0]), 0.06, 0.2
    p = np.clip((s - lo) / (hi - lo), 0, 1)
    ring = 0.5 * np.clip(ndi.grey_dilation(p, size=3) - ndi.grey_erosion(p, size=3), 0, 1)
    interior = p * (1 - ring)
    return np.stack([1 - interior - ring, ring, interior])[None].astype(np.float32)


def fake_label_cell(nuclei_pred, cell_pred):
    """label_cell of 0.1.8, from its description (uint8 narrowing and uint16 output included)."""
    from skimage import filters, measure, morphology, segmentation

    def cut_and_fill(lab):  # boundaries (thick, 4-connected) off, holes filled, 4-connected relabel
        kept = lab * ~segmentation.find_boundaries(lab)
        return ndi.label(ndi.binary_fill_holes(kept > 0))[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-image 0.26 deprecates the positional sizes the package passes
        n1, n2, c1, c2 = nuclei_pred[..., 1], nuclei_pred[..., 2], cell_pred[..., 1], cell_pred[..., 2]
        # A: nuclei
        not_border = 1 - (n1 + c1) / 255.0 > 0.05  # uint8 + uint8 wraps
        seeds = morphology.remove_small_objects(n2 / 255 * not_border > 0.4 + (-0.25), 500)
        markers = ndi.label(seeds.astype(np.uint8), output=np.uint32)[0]
        mask = morphology.remove_small_holes(n2 / 255.0 > 0.4, 1000)
        mask = morphology.remove_small_objects(mask, 8).astype(np.uint8)
        nuclei = segmentation.watershed(mask, markers, mask=mask, watershed_line=True)
        nuclei = measure.label(morphology.remove_small_objects(nuclei, 2500))
        # B, C: first cells, narrowed to uint8
        t = max(0.22, filters.threshold_otsu(c2 / 255) * 0.5)
        distance = c2.astype(np.float64)
        cells = segmentation.watershed(-distance, nuclei, mask=c2 / 255 > t)
        cells = morphology.remove_small_objects(cells, 5500).astype(np.uint8)
        # D, E, F
        cells = cut_and_fill(morphology.closing(cells, morphology.disk(6)))
        cells = cut_and_fill(segmentation.watershed(-distance, cells, mask=(cells > 0) | (c1 / 255 > 0.05)))
        # G, H
        cells = measure.label(morphology.remove_small_objects(measure.label(cells > 0), 5500))
        cells = cells.astype(np.uint16)
        pieces = morphology.remove_small_objects(measure.label((cells > 0) & (nuclei > 0)), 2500)
        return (cells * (pieces > 0)).astype(np.uint16), cells


def make_standin():
    """Fresh stand-in modules (hpacellseg, .cellsegmentator, .utils) and a call log."""
    from skimage import transform
    from skimage.util import img_as_ubyte

    calls = {"constructed": 0, "padding": [], "inputs": [], "training": []}
    pkg = types.ModuleType("hpacellseg")
    cs = types.ModuleType("hpacellseg.cellsegmentator")
    ut = types.ModuleType("hpacellseg.utils")
    cs.transform = transform  # as the real module: `from skimage import transform`

    class CellSegmentator:
        def __init__(self, nuclei_model="./nuclei_model.pth", cell_model="./cell_model.pth", scale_factor=0.25,
                     device="cuda", padding=False, multi_channel_model=True):
            for m in (nuclei_model, cell_model):
                if isinstance(m, str):
                    raise AssertionError(f"stand-in: the real constructor would load or DOWNLOAD {m}")
            if device != "cpu" and not device.startswith("cuda"):
                raise ValueError(f"{device} is not a valid device (cpu/cuda)")
            calls["constructed"] += 1
            calls["training"] += [nuclei_model.training, cell_model.training]
            self.scale_factor, self.padding, self.multi_channel_model = scale_factor, padding, multi_channel_model

        def _run(self, image, kind):
            """rescale, pad, normalise, network (probabilities (3, h, w) float32)."""
            self.target_shape = image.shape
            img = cs.transform.rescale(image, self.scale_factor, multichannel=True)  # the 0.1.8 call
            self.scaled_shape = img.shape
            calls["inputs"].append((kind, image.dtype, image.shape))
            calls["padding"].append(self.padding)
            if kind == "nuclei":
                img = np.dstack([img[..., 2]] * 3)
            rows, cols = img.shape[:2]
            if self.padding:
                img = cv2.copyMakeBorder(img, 32, 32 - rows % 32, 32, 32 - cols % 32, cv2.BORDER_REFLECT)
            elif rows % 32 or cols % 32:
                raise RuntimeError(f"stand-in U-Net: {rows}x{cols} is not a multiple of 32 (use padding=True)")
            x = ((img - NORM_MEAN) / NORM_STD).transpose(2, 0, 1)[None]
            return fake_unet(x, kind, self.multi_channel_model)[0]

        def _restore(self, pred):
            pred = pred.transpose(1, 2, 0).copy()
            if self.padding:
                rows, cols = self.scaled_shape[:2]
                pred = pred[32:32 + rows, 32:32 + cols]
            pred[..., 0] = 0
            if self.scale_factor != 1:  # 0.1.8 passes (rows, cols) where cv2 wants (width, height)
                pred = cv2.resize(pred, (self.target_shape[0], self.target_shape[1]), interpolation=cv2.INTER_AREA)
            return pred

        def pred_nuclei(self, images):
            out = []
            for image in images:
                if image.ndim == 2:
                    image = np.dstack([image] * 3)
                out.append(self._restore(img_as_ubyte(self._run(image, "nuclei"))))
            return out

        def pred_cells(self, images, precombined=False):
            mt, er, nuc = images
            if self.multi_channel_model and er is None:
                raise ValueError("Please specify the image path(s) for er channels!")
            if not self.multi_channel_model:
                if er is not None:
                    raise ValueError("second channel should be None for two channel model predition!")
                er = [np.zeros_like(m) for m in mt]
            return [img_as_ubyte(self._restore(self._run(np.dstack([a, b, c]), "cells"))) for a, b, c in zip(mt, er, nuc)]

    cs.CellSegmentator = CellSegmentator
    ut.label_cell = fake_label_cell
    pkg.cellsegmentator, pkg.utils = cs, ut
    return pkg, cs, ut, calls


@pytest.fixture
def standin(monkeypatch):
    pkg, cs, ut, calls = make_standin()
    monkeypatch.setitem(sys.modules, "hpacellseg", pkg)
    monkeypatch.setitem(sys.modules, "hpacellseg.cellsegmentator", cs)
    monkeypatch.setitem(sys.modules, "hpacellseg.utils", ut)
    return cs, ut, calls


@pytest.fixture
def weights(tmp_path):
    nuc, cell = tmp_path / "dpn_unet_nuclei_v1.pth", tmp_path / "dpn_unet_cell_3ch_v1.pth"
    torch.save(torch.nn.Conv2d(3, 3, 1), nuc)  # whole pickled modules, like the real files (train mode)
    torch.save(torch.nn.Conv2d(3, 3, 1).eval(), cell)
    return str(nuc), str(cell)


def make(weights, **kw):
    kw.setdefault("reference_size", REF)
    return get_segmenter("hpacellseg", nuclei_model=weights[0], cell_model=weights[1], device="cpu", **kw)


def direct(cs, scale_factor=0.25, padding=False, multi_channel_model=True):
    """The stand-in package used directly, as a user of hpacellseg would."""
    adapter.import_hpacellseg()  # the rescale shim: scikit-image >= 0.19 lacks multichannel=
    return cs.CellSegmentator(torch.nn.Identity(), torch.nn.Identity(), scale_factor=scale_factor, device="cpu",
                              padding=padding, multi_channel_model=multi_channel_model)


def _field(size, nuc_r=10, cell_r=17, step=32, rng_seed=0, dtype=np.uint8):
    H, W = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(rng_seed)
    centres = grid_centres(int(H // step), int(W // step), step, step / 2, jitter=step * 0.1, rng=rng)
    return draw_field(centres, (H, W), nuc_r=nuc_r, cell_r=cell_r, rng=rng, dtype=dtype)


# ------------------------------------------------------------------ hand-built predictions
def _rect(a, ch, r, v):
    y, x, h, w = r
    a[y:y + h, x:x + w, ch] = v


def rules_layout():
    """uint8 (760, 740, 3) nuclei and cell predictions, and the cells label_cell makes of them.

    Returns ``(nuc_pred, cell_pred, expected)``: ``expected`` maps each cell whose shape
    follows exactly from the rules, as ``(y, x, h, w)``, to its nuclear pixel count.
    Cell probability 255 (or as noted) inside rectangles, nuclei 51 x 51 px (2601 > 2500)
    unless noted, borders 0 unless noted. Every kept cell ends 2 px inside its rectangle
    on each side: the boundary removal (step E) runs twice and takes one ring each time
    (none of them touches the image edge, which does not count as a boundary).
    """
    n = np.zeros((760, 740, 3), np.uint8)
    c = np.zeros((760, 740, 3), np.uint8)
    expected = {}

    def cell(r, v=255):
        _rect(c, 2, r, v)

    def nuc(r, v=255):
        _rect(n, 2, r, v)

    # two touching cells, nuclei 29/30 px from their common side: split there, 4 px apart in the end
    cell((20, 20, 100, 200))
    nuc((45, 40, 51, 51))
    nuc((45, 149, 51, 51))
    expected[(22, 22, 96, 96)] = 2601
    expected[(22, 122, 96, 96)] = 2601
    # 6084 px: passes 5500 at C, 74 x 74 = 5476 at G: dropped
    cell((20, 260, 78, 78))
    nuc((33, 273, 51, 51))
    # 75 x 75 = 5625 at G: kept
    cell((20, 370, 79, 79))
    nuc((34, 384, 51, 51))
    expected[(22, 372, 75, 75)] = 2601
    # nucleus of 2450 px: no seed survives, no cell
    cell((20, 480, 100, 100))
    nuc((45, 505, 49, 50))
    # nucleus of exactly 2500 px: kept unless bounds are inclusive
    cell((20, 610, 100, 100))
    nuc((45, 635, 50, 50))
    if not INCLUSIVE:
        expected[(22, 612, 96, 96)] = 2500
    # 57/255 = 0.224: above 0.22, below Otsu/2: no cell
    cell((170, 20, 100, 100), 57)
    nuc((195, 45, 51, 51))
    # border channels 140 + 120 = 260 wrap to 4 as uint8: not a border, the nucleus is seeded
    cell((170, 150, 100, 100))
    nuc((195, 175, 51, 51), 115)
    _rect(n, 1, (195, 175, 51, 51), 140)
    _rect(c, 1, (195, 175, 51, 51), 120)
    expected[(172, 152, 96, 96)] = 2601
    # border 250 all over the nucleus but a border-free core: 22 x 22 = 484 < 500 px (no seed) vs 23 x 23 = 529
    cell((170, 280, 100, 100))
    nuc((195, 305, 51, 51))
    _rect(n, 1, (195, 305, 51, 51), 250)
    _rect(n, 1, (209, 319, 22, 22), 0)
    cell((170, 410, 100, 100))
    nuc((195, 435, 51, 51))
    _rect(n, 1, (195, 435, 51, 51), 250)
    _rect(n, 1, (209, 449, 23, 23), 0)
    expected[(172, 412, 96, 96)] = 2601
    # nucleus in the cell's corner: 49 x 49 = 2401 of it stay inside the final cell, under 2500: a cell without nucleus
    cell((170, 540, 100, 100))
    nuc((170, 540, 51, 51))
    expected[(172, 542, 96, 96)] = 0
    # cell border channel 60 (> 0.05) around the cell: it grows into that 120 x 120 square, then loses one ring
    _rect(c, 1, (320, 20, 120, 120), 60)
    cell((330, 30, 100, 100))
    nuc((355, 55, 51, 51))
    expected[(321, 21, 118, 118)] = 2601
    # two touching nuclei whose seeds a border line parts: two nuclei (watershed line), two cells (not pinned)
    cell((330, 180, 100, 200))
    nuc((350, 230, 60, 100))
    _rect(n, 1, (350, 279, 60, 2), 250)
    # a 6-px slot 30 px deep into a cell from its top: the closing with disk(6) fills it (not pinned beyond that)
    cell((330, 420, 100, 100))
    _rect(c, 2, (330, 467, 30, 6), 0)
    nuc((370, 445, 51, 51))
    # no nuclei: two large regions that put Otsu at 120/255 (threshold 0.235 > 57/255)
    cell((470, 20, 280, 350), 120)
    cell((470, 390, 280, 330))
    return n, c, expected


def wrap_layout():
    """uint8 (1030, 1010, 3) predictions with 257 nuclei, numbered in raster order.

    Nucleus 1 (top left) lies in a 100-px band of cell probability down the left edge;
    nuclei 2..255, a grid of 51 x 51 px with no cell probability, get no cells; nucleus 256
    (top row 920) and 257 (top row 921, left of 256) get 100 x 100 cells, 257's touching
    the band across a 1-px valley (probability 200). Narrowed to uint8, cell 256 becomes 0
    (lost) and 257 becomes 1: it merges with the band.
    """
    n = np.zeros((1030, 1010, 3), np.uint8)
    c = np.zeros((1030, 1010, 3), np.uint8)
    _rect(c, 2, (0, 0, 1030, 100), 255)
    _rect(n, 2, (10, 20, 51, 51), 255)
    for k in range(254):
        _rect(n, 2, (20 + 55 * (k // 16), 120 + 55 * (k % 16), 51, 51), 255)
    _rect(c, 2, (910, 100, 100, 100), 255)
    _rect(c, 2, (910, 100, 100, 1), 200)
    _rect(n, 2, (921, 125, 51, 51), 255)  # 257
    _rect(c, 2, (910, 300, 100, 100), 255)
    _rect(n, 2, (920, 325, 51, 51), 255)  # 256
    return n, c


def _rect_labels(lab):
    """{(y, x, h, w): label} of the labels that fill their bounding box exactly."""
    out = {}
    for k, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is not None and (lab[sl] == k).all():
            out[(sl[0].start, sl[1].start, sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)] = k
    return out


# ------------------------------------------------------------------ the stand-in itself
def test_standin_predictions_have_the_packages_format(standin):
    cs, _, calls = standin
    field, _, true_nuclei = _field((96, 160))
    seg = direct(cs, scale_factor=0.5, padding=True)
    nuc = seg.pred_nuclei([field[2]])[0]
    cell = seg.pred_cells([[field[0]], [field[3]], [field[2]]])[0]
    for pred in (nuc, cell):
        assert pred.dtype == np.uint8 and pred.shape == (160, 96, 3)  # height and width swapped, as 0.1.8 does
        assert pred[..., 0].max() == 0 and pred[..., 2].max() == 255 and 0 < pred[..., 1].max() < 255
    square, _, true_nuclei = _field(128)
    nuc = seg.pred_nuclei([square[2]])[0]
    inside = cv2.erode((true_nuclei > 0).astype(np.uint8), np.ones((9, 9))) > 0
    assert nuc.shape == (128, 128, 3) and (nuc[..., 2][inside] >= 250).all()
    assert (nuc[..., 2][true_nuclei == 0] < 103).mean() > 0.95
    with pytest.raises(ValueError, match="er channels"):
        seg.pred_cells([[square[0]], None, [square[2]]])
    with pytest.raises(ValueError, match="two channel"):
        direct(cs, multi_channel_model=False).pred_cells([[square[0]], [square[3]], [square[2]]])
    with pytest.raises(RuntimeError, match="multiple of 32"):
        direct(cs, scale_factor=0.3).pred_nuclei([square[2]])  # 38 px, no padding


def test_label_cell_rules_on_hand_built_predictions(standin):
    _, ut, _ = standin
    n, c, expected = rules_layout()
    assert 0.22 < 57 / 255 < labels.cell_threshold(c) < 0.25  # the layout's premise (Otsu at 120/255)
    nuclei, cells = ut.label_cell(n, c)
    assert nuclei.dtype == np.uint16 and cells.dtype == np.uint16 and cells.shape == (760, 740)
    assert cells.max() == len(expected) + 3 and np.array_equal(np.unique(cells), np.arange(cells.max() + 1))
    found = _rect_labels(cells)
    slotted = cells[400, 470]
    assert slotted > 0 and cells[335:358, 467:473].min() == slotted and (nuclei == slotted).sum() == 2601
    for rect, nuc_px in expected.items():
        assert rect in found, f"no cell exactly {rect}; rectangles found: {sorted(found)}"
        k = found[rect]
        assert (nuclei == k).sum() == nuc_px, (rect, (nuclei == k).sum())
    assert set(np.unique(nuclei[nuclei > 0])) == set(np.unique(cells[cells > 0])) - {found[(172, 542, 96, 96)]}
    assert (nuclei[cells == 0] == 0).all() and (nuclei[nuclei > 0] == cells[nuclei > 0]).all()
    # the pair of touching nuclei: two cells with a nucleus each, the nuclei parted by the watershed line
    pair = sorted(set(np.unique(cells[330:430, 180:380])) - {0})
    assert len(pair) == 2 and not set(pair) & {found[r] for r in expected}
    assert all((nuclei == k).sum() > 2500 for k in pair)
    assert (cells[330:430, 180:380] > 0).sum() < 200 * 100 - 2 * 96 * 2  # a gap between them
    # the project's own implementation of the rules agrees pixel for pixel
    wide_nuclei, wide_cells = labels.label_cell_wide(n, c)
    assert np.array_equal(wide_cells, cells) and np.array_equal(wide_nuclei, nuclei)
    assert labels.AREA_BOUNDS_INCLUSIVE == INCLUSIVE


def test_label_cell_narrowing_past_255_nuclei_and_the_adapters_guard(standin, weights, caplog):
    _, ut, _ = standin
    n, c = wrap_layout()
    nuclei = labels.package_nuclei(n, c)
    assert nuclei.max() == 257 and nuclei[10, 20] == 1 and nuclei[921, 125] == 257 and nuclei[920, 325] == 256
    # the package: 256 -> 0 (lost), 257 -> 1 (merged with the band across the valley)
    pkg_nuclei, pkg_cells = ut.label_cell(n, c)
    assert pkg_cells.max() == 1 and pkg_cells[950, 350] == 0
    assert pkg_cells[500, 50] == pkg_cells[950, 150] == pkg_cells[950, 100] == 1
    assert set(np.unique(pkg_nuclei)) == {0, 1} and pkg_nuclei[30, 40] == pkg_nuclei[940, 150] == 1
    # the same rules with int32 labels: three cells, each 2 px inside its region where it does not touch the image
    # edge (boundary removal does not count the edge); the valley column went to cell 257
    wide_nuclei, wide_cells = labels.label_cell_wide(n, c)
    assert wide_cells.max() == 3
    ids = [wide_cells[500, 50], wide_cells[950, 150], wide_cells[950, 350]]
    assert sorted(ids) == [1, 2, 3]
    assert (wide_cells[:, :98] == ids[0]).all() and (wide_cells[:900, 98:] != ids[0]).all()
    for k, (y, x) in zip(ids[1:], ((912, 102), (912, 302))):
        assert (wide_cells == k).sum() == 96 * 96 and (wide_cells[y:y + 96, x:x + 96] == k).all()
    assert all((wide_nuclei == k).sum() == 2601 for k in ids)
    # the adapter labels such a field with the wide rules and says so; below 256 nuclei it calls label_cell
    seg = make(weights)
    with caplog.at_level(logging.WARNING):
        got_nuclei, got_cells = seg.label(n, c)
    assert np.array_equal(got_cells, wide_cells) and np.array_equal(got_nuclei, wide_nuclei)
    assert any("257 nuclei" in r.getMessage() and "uint8" in r.getMessage() for r in caplog.records)
    n2, c2, _ = rules_layout()
    got = seg.label(n2, c2)
    assert all(np.array_equal(a, b) for a, b in zip(got, ut.label_cell(n2, c2))) and got[1].dtype == np.uint16


# ------------------------------------------------------------------ construction
def test_missing_weight_file_is_reported_before_the_package_can_download(standin, tmp_path):
    _, _, calls = standin
    with pytest.raises(FileNotFoundError, match=r"nuclei_model file .*nope\.pth does not exist.*zenodo"):
        get_segmenter("hpacellseg", nuclei_model=str(tmp_path / "nope.pth"), cell_model=str(tmp_path / "c.pth"))
    with pytest.raises(FileNotFoundError, match="needs cell_model: no path given"):
        get_segmenter("hpacellseg", nuclei_model=__file__, cell_model=None)
    assert calls["constructed"] == 0


def test_missing_package_says_how_to_install(monkeypatch, weights):
    monkeypatch.setitem(sys.modules, "hpacellseg", None)  # import fails as when not installed
    with pytest.raises(ImportError, match=r"pip install https://github.com/CellProfiling/HPA-Cell-Segmentation/archive/master.zip"):
        make(weights)


def test_models_are_loaded_locally_and_keep_the_mode_they_were_saved_in(standin, weights, caplog):
    _, _, calls = standin
    with caplog.at_level(logging.WARNING):
        seg = make(weights)
    assert calls["constructed"] == 1 and calls["training"] == [True, False]  # the package never calls eval()
    assert seg.labeler == "hpacellseg"  # the default: the package's own label_cell
    warned = [r.getMessage() for r in caplog.records if "train mode" in r.getMessage()]
    assert len(warned) == 1 and "dpn_unet_nuclei_v1.pth" in warned[0]


def test_shims_for_np_bool_and_rescale_multichannel(monkeypatch, standin, weights):
    cs, _, _ = standin
    monkeypatch.delattr(np, "bool", raising=False)  # as on NumPy 1.24-1.26
    make(weights)
    assert np.bool is bool or np.bool is np.bool_
    out = cs.transform.rescale(np.zeros((8, 6, 3)), 0.5, multichannel=True)
    assert out.shape == (4, 3, 3)


# ------------------------------------------------------------------ sizes
def test_network_plan():
    plan = adapter.network_plan
    for side, pad in ((2048, False), (3072, False), (1728, True)):  # HPA fields run at their own size
        p = plan(side, side)
        assert (p.size, p.net_shape, p.padding, p.enlarged) == ((side, side), (side, side), pad, False)
    p = plan(512, 512)
    assert (p.size, p.net_shape, p.padding, p.enlarged) == ((2048, 2048), (2048, 2048), False, True)
    p = plan(96, 160)  # x 12.8; squared for the networks
    assert (p.size, p.net_shape, p.padding) == ((1229, 2048), (2048, 2048), False)
    assert plan(1800, 1800).size == (1800, 1800) and plan(1800, 1800).padding  # 450 px scaled
    assert plan(1000, 1000, native_min_size=900).size == (1000, 1000)
    assert plan(1000, 1000).size == (2048, 2048)
    assert plan(2048, 2048, padding=True).padding
    p = plan(120, 200, scale_factor=1.0, reference_size=400)  # no resize in the package: no swap, no square
    assert (p.size, p.net_shape, p.padding) == ((240, 400), (240, 400), True)


def test_network_inputs_and_padding(standin, weights):
    _, _, calls = standin
    seg = make(weights)
    seg.segment(_field(128)[0])  # -> 512 (128 scaled): no padding
    assert calls["inputs"] == [("nuclei", np.uint8, (512, 512, 3)), ("cells", np.uint8, (512, 512, 3))]
    assert calls["padding"] == [False, False]
    calls["inputs"].clear()
    make(weights, reference_size=432).segment(_field(120)[0])  # a 1728-px field's case: 108 px scaled
    assert calls["inputs"] == [("nuclei", np.uint8, (432, 432, 3)), ("cells", np.uint8, (432, 432, 3))]
    assert calls["padding"][2:] == [True, True]  # the package's own reflect padding, no zero band
    calls["inputs"].clear()
    make(weights, scale_factor=0.3).segment(_field((90, 120))[0])  # 384 x 512, squared to 512; 154 px scaled
    assert [s for _, _, s in calls["inputs"]] == [(512, 512, 3)] * 2 and calls["padding"][4:] == [True, True]


def test_uint16_fields_reach_the_package_unconverted(standin, weights):
    _, _, calls = standin
    field8, true_cells, _ = _field(512, nuc_r=36, cell_r=68, step=128)  # not enlarged
    field16 = field8.astype(np.uint16) * 257  # v * 257 / 65535 == v / 255: the same images to the networks
    seg = make(weights)
    c8, n8 = seg.segment(field8)
    c16, n16 = seg.segment(field16)
    assert [d for _, d, _ in calls["inputs"]] == [np.uint8, np.uint8, np.uint16, np.uint16]
    assert np.array_equal(c8, c16) and np.array_equal(n8, n16) and c8.max() >= 14


# ------------------------------------------------------------------ segment()
def test_default_labelling_is_the_packages_label_cell(standin, weights):
    cs, ut, _ = standin
    field, true_cells, _ = _field(512, nuc_r=36, cell_r=68, step=128)  # not enlarged (reference_size 512)
    cells, nuclei = make(weights).segment(field)
    pkg = direct(cs)
    nuc_pred = pkg.pred_nuclei([field[2]])[0]
    cell_pred = pkg.pred_cells([[field[0]], [field[3]], [field[2]]])[0]
    ref_nuclei, ref_cells = ut.label_cell(nuc_pred, cell_pred)
    assert ref_cells.max() == 16
    assert np.array_equal(cells, ref_cells.astype(np.int32)) and np.array_equal(nuclei, ref_nuclei.astype(np.int32))
    m = match_cells(cells, true_cells, 0.6)
    assert m.recall >= 0.9 and m.unmatched_pred_frac <= 0.1, (m.recall, m.unmatched_pred_frac)


@pytest.mark.parametrize("labeler", ["hpacellseg", "relative"])
def test_small_field_is_enlarged_so_absolute_area_thresholds_work(standin, weights, labeler):
    cs, ut, _ = standin
    field, true_cells, _ = _field(128)
    pkg = direct(cs, scale_factor=1.0)
    np_, cp_ = pkg.pred_nuclei([field[2]])[0], pkg.pred_cells([[field[0]], [field[3]], [field[2]]])[0]
    assert ut.label_cell(np_, cp_)[1].max() == 0  # the trap: empty masks at a small size
    cells, nuclei = make(weights, labeler=labeler).segment(field)
    check_masks(cells, nuclei, require_nucleus=labeler == "relative")
    m = match_cells(cells, true_cells, 0.6)
    assert m.n_true == 16 and m.recall >= 0.9 and m.unmatched_pred_frac <= 0.1, (m.recall, m.unmatched_pred_frac)


def test_non_square_field_keeps_its_shape(standin, weights):
    cs, _, _ = standin
    field, true_cells, _ = _field((96, 160))
    assert direct(cs, padding=True).pred_nuclei([field[2]])[0].shape[:2] == (160, 96)  # the trap: swapped
    cells, nuclei = make(weights).segment(field)
    assert cells.shape == (96, 160)
    check_masks(cells, nuclei, require_nucleus=False)
    m = match_cells(cells, true_cells, 0.6)
    assert m.recall >= 0.9 and m.unmatched_pred_frac <= 0.1, (m.recall, m.unmatched_pred_frac)


@pytest.mark.parametrize("labeler", ["hpacellseg", "relative"])
def test_cells_without_nucleus_are_kept_only_by_the_packages_labelling(standin, weights, labeler, monkeypatch):
    n, c, expected = rules_layout()
    seg = make(weights, labeler=labeler, reference_size=256)
    monkeypatch.setattr(seg, "predict", lambda field: (n, c))
    cells, nuclei = seg.segment(np.zeros((4, 760, 740), np.uint8))
    nucleus_less = set(np.unique(cells[cells > 0])) - set(np.unique(nuclei[nuclei > 0]))
    if labeler == "hpacellseg":
        check_masks(cells, nuclei, require_nucleus=False)
        assert cells.max() == len(expected) + 3 and len(nucleus_less) == 1
        assert (cells[172:268, 542:638] == next(iter(nucleus_less))).all()
    else:
        check_masks(cells, nuclei)
        assert not nucleus_less


def test_two_channel_cell_model(standin, weights):
    field, true_cells, _ = _field(128)
    cells, nuclei = make(weights, multi_channel_model=False).segment(field)  # the stand-in refuses ER here
    m = match_cells(cells, true_cells, 0.6)
    assert m.recall >= 0.9 and m.unmatched_pred_frac <= 0.1, (m.recall, m.unmatched_pred_frac)


def test_field_without_nuclei_gives_empty_masks(standin, weights, caplog):
    field, _, _ = _field(128)
    field[2] = 0
    cells, nuclei = make(weights).segment(field)
    assert cells.shape == (128, 128) and cells.max() == 0 and nuclei.max() == 0
    assert any("no cells" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ segment.segmenter=auto
def test_auto_uses_hpacellseg_when_importable_with_both_weight_files(standin, weights):
    name, reason = resolve_segmenter("auto", *weights)
    assert name == "hpacellseg" and "package imports" in reason and weights[0] in reason


def test_auto_falls_back_to_classical_and_says_why(monkeypatch, standin, weights, tmp_path, caplog):
    name, reason = resolve_segmenter("auto", None, "")
    assert name == "classical" and "no hpacellseg weights set" in reason
    with caplog.at_level(logging.WARNING):
        name, reason = resolve_segmenter("auto", weights[0], str(tmp_path / "gone.pth"))
    assert name == "classical" and "cell_weights file" in reason and "gone.pth does not exist" in reason
    assert any("gone.pth" in r.getMessage() for r in caplog.records)
    name, reason = resolve_segmenter("auto", weights[0], None)
    assert name == "classical" and "cell_weights not set" in reason
    monkeypatch.setitem(sys.modules, "hpacellseg", None)  # not installed
    name, reason = resolve_segmenter("auto", *weights)
    assert name == "classical" and "hpacellseg package does not import" in reason


def test_explicit_segmenter_names_are_kept(monkeypatch):
    monkeypatch.setitem(sys.modules, "hpacellseg", None)
    assert resolve_segmenter("classical", "a", "b") == ("classical", "segment.segmenter=classical")
    assert resolve_segmenter("hpacellseg") == ("hpacellseg", "segment.segmenter=hpacellseg")
    with pytest.raises(ValueError, match=r"unknown segmenter 'cellpose'.*valid: auto, classical, hpacellseg"):
        resolve_segmenter("cellpose")
