"""One-to-one IoU matching of instance masks."""

import numpy as np
import pytest

from hpa.eval.matching import iou_matrix, match_cells, match_from_iou


def test_iou_matrix_exact_and_both_paths_agree():
    true = np.zeros((10, 10), np.int32)
    true[0:5, 0:5] = 1
    true[5:10, 5:10] = 7
    pred = np.zeros_like(true)
    pred[0:5, 0:4] = 2  # 20 px inside true 1 (25 px): IoU 0.8
    pred[5:10, 5:10] = 3
    iou, pids, tids = iou_matrix(pred, true)
    assert pids.tolist() == [2, 3] and tids.tolist() == [1, 7]
    assert iou == pytest.approx(np.array([[0.8, 0.0], [0.0, 1.0]]))
    big = iou_matrix(pred * 100000, true)  # large labels take the sorting path
    assert big[0] == pytest.approx(iou) and big[1].tolist() == [200000, 300000]


def test_match_cells_threshold_and_rates():
    true = np.zeros((10, 10), np.int32)
    true[0:5, 0:5] = 1
    true[5:10, 5:10] = 2
    pred = np.zeros_like(true)
    pred[0:5, 0:3] = 1  # IoU 0.6 exactly: a match
    pred[5:10, 5:7] = 2  # IoU 0.4: no match
    pred[0:2, 8:10] = 3  # a false cell
    res = match_cells(pred, true, 0.6)
    assert [(p, t) for p, t, _ in res.pairs] == [(1, 1)]
    assert res.recall == 0.5 and res.unmatched_pred_frac == pytest.approx(2 / 3)


def test_greedy_is_one_to_one_below_half():
    iou = np.array([[0.45, 0.40], [0.44, 0.10]])
    assert match_from_iou(iou, 0.3) == [(0, 0, 0.45)]  # (1, 0) and (0, 1) lose their partner
    pairs = match_from_iou(np.array([[0.45, 0.40], [0.44, 0.35]]), 0.3)
    assert [(r, c) for r, c, _ in pairs] == [(0, 0), (1, 1)]
    with pytest.raises(ValueError, match="shapes differ"):
        iou_matrix(np.zeros((2, 2), int), np.zeros((3, 2), int))
