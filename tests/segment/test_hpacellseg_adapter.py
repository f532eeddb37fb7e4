"""Contract tests of the HPA-Cell-Segmentation adapter against a STAND-IN hpacellseg package.

The real package cannot be installed here (no network beyond PyPI, weights are never
downloaded), so each test injects a small stand-in into ``sys.modules``. The stand-in
copies the real 0.1.8 API (``CellSegmentator(nuclei_model, cell_model, scale_factor,
device, padding, multi_channel_model)``, ``pred_nuclei``, ``pred_cells``,
``utils.label_cell``) and reproduces its known traps, so the adapter's guards are
tested against them:

* the constructor "downloads" (here: raises) when a model path does not exist;
* images are rescaled with ``skimage.transform.rescale(..., multichannel=True)``;
* network inputs whose scaled size is not a multiple of 32 fail unless ``padding``;
* the resize back uses ``(shape[0], shape[1])`` as (width, height): wrong for non-square;
* ``label_cell`` drops objects by absolute pixel areas (tuned here for a 512-px
  reference, as the real one is for 2048 px) and casts cell labels to uint8.

The "networks" are thresholds of the input channels, which is all the adapter needs.
"""

from __future__ import annotations

import sys
import types

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from test_segment import draw_field, grid_centres  # noqa: E402  (tests/ is on sys.path under pytest)

from hpa.eval.matching import match_cells
from hpa.segment import get_segmenter
from hpa.segment import hpacellseg_adapter as adapter
from hpa.segment.common import check_masks

REF = 512  # reference field side of the stand-in's absolute thresholds (2048 in the real package)
NUC_MIN = 2500 * (REF / 2048) ** 2
CELL_MIN = 5500 * (REF / 2048) ** 2


def make_standin():
    """Fresh stand-in modules (hpacellseg, .cellsegmentator, .utils) and a call log."""
    from skimage import transform
    from skimage.segmentation import watershed

    calls = {"constructed": 0, "padding": [], "models": []}
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
            calls["constructed"] += 1
            calls["models"] += [type(nuclei_model).__name__, type(cell_model).__name__]
            self.scale_factor, self.padding, self.multi_channel_model = scale_factor, padding, multi_channel_model

        def _net(self, image, kind):
            self.target_shape = image.shape
            small = cs.transform.rescale(image, self.scale_factor, multichannel=True)  # the 0.1.8 call
            calls["padding"].append(self.padding)
            h, w = small.shape[:2]
            if not self.padding and (h % 32 or w % 32):
                raise RuntimeError(f"stand-in U-Net: {h}x{w} is not a multiple of 32 (use padding=True)")
            out = np.zeros((h, w, 3), np.uint8)
            if kind == "nuclei":
                out[..., 2] = 255 * (small[..., 2] > 0.35)
            else:
                sig = small[..., 0] / max(small[..., 0].max(), 1e-6)
                out[..., 2] = np.clip(255 * sig, 0, 255)
            # 0.1.8's restore: cv2 takes (width, height), it passes (rows, cols)
            return cv2.resize(out, (self.target_shape[0], self.target_shape[1]), interpolation=cv2.INTER_AREA)

        def pred_nuclei(self, images):
            out = []
            for im in images:
                if im.ndim == 2:
                    im = np.dstack([im, im, im])
                out.append(self._net(im, "nuclei"))
            return out

        def pred_cells(self, images, precombined=False):
            mt, er, nuc = images
            if self.multi_channel_model and er is None:
                raise ValueError("Please specify the image path(s) for er channels!")
            er = er or [np.zeros_like(m) for m in mt]
            return [self._net(np.dstack([a, b, c]), "cells") for a, b, c in zip(mt, er, nuc)]

    def label_cell(nuclei_pred, cell_pred):
        assert np.bool is not None  # 0.1.8 uses np.bool
        nuclei = ndi.label(nuclei_pred[..., 2] > 0.4 * 255)[0]
        areas = np.bincount(nuclei.ravel())
        nuclei[(areas < NUC_MIN)[nuclei]] = 0
        nuclei = ndi.label(nuclei > 0)[0]
        cell = cell_pred[..., 2] / 255
        cells = watershed(-cell, nuclei, mask=(cell > 0.22) | (nuclei > 0))
        areas = np.bincount(cells.ravel())
        cells[(areas < CELL_MIN)[cells]] = 0
        cells = cells.astype(np.uint8)  # the 0.1.8 wrap
        return np.where(nuclei > 0, cells, 0), cells

    cs.CellSegmentator = CellSegmentator
    ut.label_cell = label_cell
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
    torch.save(torch.nn.Conv2d(3, 3, 1), nuc)  # whole pickled modules, like the real files
    torch.save(torch.nn.Conv2d(3, 3, 1), cell)
    return str(nuc), str(cell)


def make(weights, **kw):
    kw.setdefault("reference_size", REF)
    return get_segmenter("hpacellseg", nuclei_model=weights[0], cell_model=weights[1], device="cpu", **kw)


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


def test_models_are_loaded_locally_and_passed_as_modules(standin, weights):
    _, _, calls = standin
    make(weights)
    assert calls["constructed"] == 1 and calls["models"] == ["Conv2d", "Conv2d"]


def test_shims_for_np_bool_and_rescale_multichannel(monkeypatch, standin, weights):
    cs, _, _ = standin
    monkeypatch.delattr(np, "bool", raising=False)  # as on NumPy 1.24-1.26
    make(weights)
    assert np.bool is bool or np.bool is np.bool_
    out = cs.transform.rescale(np.zeros((8, 6, 3)), 0.5, multichannel=True)
    assert out.shape == (4, 3, 3)


# ------------------------------------------------------------------ size traps
def _field(size, nuc_r, cell_r, step, rng_seed=0):
    H, W = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(rng_seed)
    centres = grid_centres(int(H // step), int(W // step), step, step / 2, jitter=step * 0.1, rng=rng)
    return draw_field(centres, (H, W), nuc_r=nuc_r, cell_r=cell_r, rng=rng)


@pytest.mark.parametrize("labeler", ["hpacellseg", "relative"])
def test_small_field_is_enlarged_so_absolute_area_thresholds_work(standin, weights, labeler):
    cs, ut, _ = standin
    field, true_cells, _ = _field(128, nuc_r=6, cell_r=17, step=32)  # nuclei of ~113 px < NUC_MIN at 128 px
    adapter.import_hpacellseg()  # the rescale shim: scikit-image >= 0.19 lacks multichannel=
    direct = cs.CellSegmentator(torch.nn.Identity(), torch.nn.Identity(), scale_factor=1.0, padding=True)
    np_, cp_ = direct.pred_nuclei([field[2]])[0], direct.pred_cells([[field[0]], [field[3]], [field[2]]])[0]
    assert ut.label_cell(np_, cp_)[1].max() == 0  # the trap: empty masks at a small size
    cells, nuclei = make(weights, labeler=labeler).segment(field)
    check_masks(cells, nuclei)
    m = match_cells(cells, true_cells, 0.6)
    assert m.n_true == 16 and m.recall >= 0.9 and m.unmatched_pred_frac <= 0.1, (m.recall, m.unmatched_pred_frac)


def test_non_square_field_keeps_its_shape(standin, weights):
    cs, _, _ = standin
    field, true_cells, _ = _field((96, 160), nuc_r=6, cell_r=17, step=32)
    adapter.import_hpacellseg()  # the rescale shim: scikit-image >= 0.19 lacks multichannel=
    direct = cs.CellSegmentator(torch.nn.Identity(), torch.nn.Identity(), scale_factor=1.0, padding=True)
    assert direct.pred_nuclei([field[2]])[0].shape[:2] == (160, 96)  # the trap: height and width swapped
    cells, nuclei = make(weights).segment(field)
    assert cells.shape == (96, 160)
    check_masks(cells, nuclei)
    m = match_cells(cells, true_cells, 0.6)
    assert m.recall >= 0.9 and m.unmatched_pred_frac <= 0.1


def test_network_sizes_are_padded_to_multiples_of_32(standin, weights):
    _, _, calls = standin
    assert adapter.padded_side(1728, 0.25) == (1792, False)  # 448 px after scaling
    assert adapter.padded_side(2048, 0.25) == (2048, False)
    assert adapter.padded_side(1000, 0.3)[1] is True
    field, _, _ = _field((90, 120), nuc_r=6, cell_r=17, step=30)
    make(weights, scale_factor=0.25).segment(field)  # 120 px -> 512 -> 128 after scaling: no padding needed
    assert calls["padding"] == [False, False]
    make(weights, scale_factor=0.3).segment(field)  # 512 * 0.3 is no multiple of 32: the package pads
    assert calls["padding"][2:] == [True, True]


def test_more_than_255_cells_are_not_wrapped(standin, weights):
    cs, ut, _ = standin
    field, true_cells, _ = _field(512, nuc_r=8, cell_r=19, step=28)
    assert true_cells.max() == 324
    adapter.import_hpacellseg()  # the rescale shim: scikit-image >= 0.19 lacks multichannel=
    direct = cs.CellSegmentator(torch.nn.Identity(), torch.nn.Identity(), scale_factor=1.0, padding=False)
    raw = ut.label_cell(direct.pred_nuclei([field[2]])[0], direct.pred_cells([[field[0]], [field[3]], [field[2]]])[0])[1]
    assert len(np.unique(raw)) - 1 < 324  # the trap: uint8 labels merge/lose cells
    for labeler in ("hpacellseg", "relative"):
        cells, nuclei = make(weights, labeler=labeler, scale_factor=1.0).segment(field)
        check_masks(cells, nuclei)
        m = match_cells(cells, true_cells, 0.6)
        assert m.recall >= 0.97 and m.unmatched_pred_frac <= 0.03, (labeler, m.recall, m.unmatched_pred_frac)


def test_field_without_nuclei_gives_empty_masks(standin, weights, caplog):
    field, _, _ = _field(128, nuc_r=6, cell_r=17, step=32)
    field[2] = 0
    cells, nuclei = make(weights).segment(field)
    assert cells.shape == (128, 128) and cells.max() == 0 and nuclei.max() == 0
    assert any("no cells" in r.getMessage() for r in caplog.records)
