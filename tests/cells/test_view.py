"""Isolated-cell probabilities: windows, masking, and the model call (hpa/cells/view.py)."""

import numpy as np
import pandas as pd
import pytest
import torch

from hpa.cells.pseudo_rules import cam_evidence
from hpa.cells.table import VIEW_COLS, image_cell_rows
from hpa.cells.view import cell_windows, isolated_cell_probs, window_side
from hpa.constants import NUM_CLASSES

BG = 30  # background intensity: every window pixel outside its cell must come out 0, not BG


def field_and_mask():
    """A 64-px field (4 channels) at the model scale and its 128-px full-resolution mask (scale 1/2).

    Cells (full res -> model scale): 1 rows/cols 8:28 -> 4:14 (value 200); 2 rows/cols 80:112 ->
    40:56 (100); 3 rows 8:28, cols 28:40 -> 4:14, 14:20 (150), touching cell 1 inside its window;
    4 rows 120:128, cols 0:8 -> 60:64, 0:4 (250), in the field's corner. The largest box is
    16 px at the model scale: 16 x 1.2 rounds up to windows of 32 px.
    """
    field = np.full((4, 64, 64), BG, np.uint8)
    mask = np.zeros((128, 128), np.int32)
    for k, (ys, xs, value) in enumerate([((4, 14), (4, 14), 200), ((40, 56), (40, 56), 100),
                                         ((4, 14), (14, 20), 150), ((60, 64), (0, 4), 250)], start=1):
        field[:, ys[0]:ys[1], xs[0]:xs[1]] = value
        mask[2 * ys[0]:2 * ys[1], 2 * xs[0]:2 * xs[1]] = k
    return field, mask


def hand_windows():
    """The windows :func:`cell_windows` must return for :func:`field_and_mask`, worked out by hand.

    A window is centred on the cell's box at the model scale (centre (y0 + y1) // 2, origin
    centre - 16): cell 1 centre (9, 9), origin (-7, -7): its pixels land on 11:21 x 11:21; cell 2
    centre (48, 48), origin (32, 32): 8:24 x 8:24; cell 3 centre (9, 17), origin (-7, 1): 11:21 x
    13:19; cell 4 centre (62, 2), origin (46, -14): 14:18 x 14:18 (centred, not shifted into the
    field). Everything else is 0: the background, the neighbour, the outside of the field.
    """
    win = np.zeros((5, 4, 32, 32), np.float32)  # id 5 is absent from the mask
    win[0, :, 11:21, 11:21] = 200 / 255
    win[1, :, 8:24, 8:24] = 100 / 255
    win[2, :, 11:21, 13:19] = 150 / 255
    win[3, :, 14:18, 14:18] = 250 / 255
    return win


def test_window_side_multiple_of_32_and_bounded():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 40, 20]])
    assert window_side(boxes, 256) == 64  # 40 * 1.2 = 48 -> 64
    assert window_side(boxes[:1], 256) == 32
    assert window_side(np.array([[0, 0, 300, 300]]), 256) == 256
    assert window_side(np.zeros((0, 4)), 256) == 32


def test_windows_hold_only_their_cell_centred_pixel_by_pixel():
    field, mask = field_and_mask()
    win, present = cell_windows(field, mask, 5)
    assert win.shape == (5, 4, 32, 32) and win.dtype == np.float32
    assert present.tolist() == [True, True, True, True, False]
    np.testing.assert_array_equal(win, hand_windows())
    # float fields are taken as they are (no /255)
    np.testing.assert_allclose(cell_windows(field.astype(np.float32) / 255, mask, 5)[0], hand_windows(), rtol=1e-6)


def test_tiny_cell_keeps_its_box():
    field = np.full((4, 16, 16), 50, np.uint8)
    mask = np.zeros((128, 128), np.int32)
    mask[64:66, 64:66] = 1  # 2 px at full res: at 16 px (scale 1/8) its box is the one pixel (8, 8)
    win, present = cell_windows(field, mask, 1)
    want = np.zeros((1, 4, 16, 16), np.float32)  # the window is the whole 16-px field, centred on (8, 8)
    want[0, :, 8, 8] = 50 / 255
    assert present.tolist() == [True]
    np.testing.assert_array_equal(win, want)


class Bright(torch.nn.Module):
    """Class 3 logit = 40 x the mean of channel 1 (green) over the window, minus 1; the others -5."""

    def forward(self, x):
        out = torch.full((x.shape[0], NUM_CLASSES), -5.0)
        out[:, 3] = x[:, 1].mean(dim=(1, 2)) * 40 - 1
        return out


def _sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, np.float64)))


def test_isolated_probs_follow_each_cell_alone():
    field, mask = field_and_mask()
    p = isolated_cell_probs(Bright(), field, mask)
    assert p.shape == (4, NUM_CLASSES)
    # green mean of a 32 x 32 window = (cell pixels x value / 255) / 1024: the background and the
    # neighbouring cell 3 (which lies in cell 1's window) add nothing
    green = np.array([100 * 200, 256 * 100, 60 * 150, 16 * 250]) / 255 / 1024
    np.testing.assert_allclose(p[:, 3], _sigmoid(40 * green - 1), rtol=1e-5)
    np.testing.assert_allclose(p[:, 0], _sigmoid(-5.0), rtol=1e-6)
    # normalised with the checkpoint's mean and std (the zeroed pixels too): mean green (g - 0.3) / 0.25
    p = isolated_cell_probs(Bright(), field, mask, mean=[0.1, 0.3, 0.2, 0.2], std=[0.2, 0.25, 0.2, 0.2])
    np.testing.assert_allclose(p[:, 3], _sigmoid(40 * (green - 0.3) / 0.25 - 1), rtol=1e-5)
    # cell ids missing from the mask: NaN rows
    mask[mask == 2] = 0
    p = isolated_cell_probs(Bright(), field, mask)
    assert np.isnan(p[1]).all() and not np.isnan(p[[0, 2, 3]]).any()


def test_isolated_probs_of_a_real_model_are_its_output_on_the_hand_windows():
    from hpa.models.factory import build_model

    torch.manual_seed(0)
    model = build_model("efficientnet-b0", dropout=0.0, input_norm="per_image").eval()
    field, mask = field_and_mask()
    mean, std = [0.1, 0.3, 0.2, 0.2], [0.2, 0.25, 0.2, 0.2]
    x = (torch.from_numpy(hand_windows()[:4]) - torch.tensor(mean).view(1, 4, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1)
    with torch.no_grad():
        want = torch.sigmoid(model(x)).numpy()
    for batch_size in (1, 3, 64):  # batches of any size give each cell the same answer
        p = isolated_cell_probs(model, field, mask, mean=mean, std=std, batch_size=batch_size)
        np.testing.assert_allclose(p, want, atol=1e-5)


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
