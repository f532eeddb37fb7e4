"""Isolated-cell probabilities: windows, masking, and the model call (hpa/cell_view.py)."""

import numpy as np
import pandas as pd
import pytest
import torch

from hpa.cells.pseudo_rules import cam_evidence
from hpa.cells.table import VIEW_COLS, image_cell_rows
from hpa.cells.view import cell_windows, isolated_cell_probs, window_side
from hpa.constants import NUM_CLASSES


def field_and_mask():
    """A 64-px field (4 channels) at the model scale and its 128-px full-resolution mask."""
    field = np.zeros((4, 64, 64), np.uint8)
    field[:, 4:14, 4:14] = 200  # cell 1 (full res 8:28)
    field[:, 40:56, 40:56] = 100  # cell 2 (full res 80:112)
    mask = np.zeros((128, 128), np.int32)
    mask[8:28, 8:28] = 1
    mask[80:112, 80:112] = 2
    return field, mask


def test_window_side_multiple_of_32_and_bounded():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 40, 20]])
    assert window_side(boxes, 256) == 64  # 40 * 1.2 = 48 -> 64
    assert window_side(boxes[:1], 256) == 32
    assert window_side(np.array([[0, 0, 300, 300]]), 256) == 256
    assert window_side(np.zeros((0, 4)), 256) == 32


def test_windows_hold_only_their_cell_centred():
    field, mask = field_and_mask()
    win, present = cell_windows(field, mask, 3)  # id 3 is absent
    assert win.shape == (3, 4, 32, 32) and present.tolist() == [True, True, False]
    assert win.dtype == np.float32
    # cell 1 is 10 px at the model scale, 16 px cell 2: every kept pixel belongs to its own cell
    assert np.unique(win[0][win[0] > 0]) == pytest.approx([200 / 255])
    assert np.unique(win[1][win[1] > 0]) == pytest.approx([100 / 255])
    assert (win[0] > 0).sum() == 4 * 10 * 10 and (win[1] > 0).sum() == 4 * 16 * 16
    ys, xs = np.nonzero(win[1, 0])
    assert abs((ys.min() + ys.max()) / 2 - 15.5) <= 1 and abs((xs.min() + xs.max()) / 2 - 15.5) <= 1
    assert not win[2].any()


def test_tiny_cell_keeps_its_box():
    field = np.full((4, 16, 16), 50, np.uint8)
    mask = np.zeros((128, 128), np.int32)
    mask[64:66, 64:66] = 1  # 2 px at full res: vanishes at 16 px by nearest sampling
    win, present = cell_windows(field, mask, 1)
    assert present[0] and win[0].any()


class Bright(torch.nn.Module):
    """Class 3 logit = mean brightness of channel 1 (green) minus a bias; others constant."""

    def forward(self, x):
        out = torch.full((x.shape[0], NUM_CLASSES), -5.0)
        out[:, 3] = x[:, 1].mean(dim=(1, 2)) * 40 - 1
        return out


def test_isolated_probs_follow_each_cell_alone():
    field, mask = field_and_mask()
    p = isolated_cell_probs(Bright(), field, mask)
    assert p.shape == (2, NUM_CLASSES) and np.isfinite(p).all()
    # each window sees only its own cell: the brighter (and in the window larger share) cell 1 scores higher
    win, _ = cell_windows(field, mask, 2)
    expect = 1 / (1 + np.exp(-(win[:, 1].mean(axis=(1, 2)) * 40 - 1)))
    assert p[:, 3] == pytest.approx(expect, rel=1e-5)
    assert p[:, 0] == pytest.approx(1 / (1 + np.exp(5)), rel=1e-5)


def test_isolated_probs_real_model_shapes():
    from hpa.models.factory import build_model

    torch.manual_seed(0)
    model = build_model("efficientnet-b0", dropout=0.0, input_norm="per_image").eval()
    field, mask = field_and_mask()
    p = isolated_cell_probs(model, field, mask, mean=[0.1] * 4, std=[0.2] * 4, batch_size=1)
    assert p.shape == (2, NUM_CLASSES) and ((p >= 0) & (p <= 1)).all()
    p2 = isolated_cell_probs(model, field, mask, mean=[0.1] * 4, std=[0.2] * 4, batch_size=64)
    np.testing.assert_allclose(p, p2, atol=1e-5)


def test_evidence_mixes_view_and_cam():
    mask = np.zeros((20, 20), np.int32)
    mask[2:8, 2:8] = 1
    mask[12:18, 12:18] = 2
    cams = np.zeros((1, 20, 20), np.float32)
    cams[0, 2:8, 2:8] = 1.0
    probs = np.zeros(NUM_CLASSES, np.float32)
    probs[5] = 0.8
    table = image_cell_rows("a", mask, probs, cams, [5], 0.25, 512)
    view = np.zeros((2, NUM_CLASSES), np.float32)
    view[:, 5] = [0.2, 0.9]
    table[VIEW_COLS] = view
    labels = np.zeros((2, NUM_CLASSES), bool)
    labels[:, 5] = True
    e = cam_evidence(table, labels, "topk_mean", True, view_weight=0.75)
    assert e[:, 5] == pytest.approx([0.25 * 0.8 + 0.75 * 0.2, 0.75 * 0.9])
    assert (np.delete(e, 5, axis=1) == 0).all()
    with pytest.raises(ValueError, match="view_p"):
        cam_evidence(pd.DataFrame(table.drop(columns=VIEW_COLS)), labels, view_weight=0.5)
