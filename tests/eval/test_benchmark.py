"""Scoring methods side by side (hpa.eval.benchmark): every true test image counts, both modes, by hand."""

import numpy as np
import pandas as pd
import pytest

from hpa.eval.benchmark import read_ground_truth, score_methods, segmentation_quality, true_cells_per_class
from hpa.io.fields import write_mask


def square_cells(n, size=12):
    """``n`` disjoint 4 x 4 cells on a row of a (size, size * n) image, ids 1..n."""
    m = np.zeros((size, size * n), np.int32)
    for k in range(n):
        m[2:6, size * k + 2 : size * k + 6] = k + 1
    return m


@pytest.fixture()
def folders(tmp_path):
    """Ground truth A (2 cells), B (1 cell), E (no cell, listed in test.csv); predicted masks: A exact,
    B none (skipped by stage 03), E one cell where there is none."""
    data, run = tmp_path / "data", tmp_path / "run"
    write_mask(data / "gt" / "A_cellmask.png", square_cells(2))
    write_mask(data / "gt" / "B_cellmask.png", square_cells(1))
    write_mask(data / "gt" / "E_cellmask.png", np.zeros((12, 12), np.int32))
    (data / "gt" / "cell_labels.csv").write_text("ID,cell_id,Label,split\nA,1,0,test\nA,2,1,test\nB,1,0,test\n")
    (data / "test.csv").write_text("ID\nA\nB\nE\n")
    write_mask(run / "masks" / "test" / "A_cellmask.png", square_cells(2))
    write_mask(run / "masks" / "test" / "E_cellmask.png", square_cells(1))
    return data, run


def test_ground_truth_holds_images_without_cells(folders):
    data, _ = folders
    gt = read_ground_truth(data, "test")
    assert list(gt) == ["A", "B", "E"] and gt["E"][1] == {} and gt["E"][0].max() == 0


def test_true_cells_per_class_counts_cells_and_images(folders):
    data, _ = folders
    n = true_cells_per_class(read_ground_truth(data, "test"))
    assert n["cells"][:3] == [2, 1, 0] and n["images"][:3] == [2, 1, 0] and sum(n["cells"]) == 3
    both = {"X": (None, {1: [0, 5], 2: [5], 3: [18]})}  # a cell of two classes counts for both
    n = true_cells_per_class(both)
    assert (n["cells"][0], n["cells"][5], n["cells"][18], n["images"][5]) == (1, 2, 1, 1)


def test_segmentation_recall_counts_every_true_test_image(folders):
    data, run = folders
    s = segmentation_quality(run, data)
    # true cells: A 2 + B 1 (B has no predicted mask) = 3, matched 2; predicted: A 2 + E 1 = 3, 1 unmatched
    assert (s["images"], s["images_without_mask"], s["true_cells"], s["matched"], s["predicted_cells"]) == (3, 1, 3, 2, 3)
    assert s["recall"] == pytest.approx(2 / 3) and s["unmatched_predicted"] == pytest.approx(1 / 3)


def test_score_methods_both_modes_by_hand(folders):
    data, run = folders
    table = pd.DataFrame({"ID": ["A", "A", "E"], "cell_id": [1, 2, 1]})
    conf = np.full((3, 19), np.nan)
    conf[0, 0], conf[1, 1], conf[2, 0] = 0.9, 0.8, 0.95
    flat = np.full((3, 19), np.nan)
    flat[:, 0] = flat[:, 1] = 0.5  # every cell both classes at one confidence (ties: input order)
    res = score_methods(run, data, table, {"m": conf, "flat": flat}, ("oid", "strict"), n_boot=4, seed=0)
    assert list(res) == ["oid", "strict"]
    # oid: E's prediction ignored (E has no class). class 0: A1 .9 TP; 2 true cells (A1, B1) -> AP 1/2;
    #      class 1: A2 TP -> AP 1; mAP 3/4
    assert res["oid"]["m"]["mAP"] == pytest.approx(0.75) and res["oid"]["m"]["ap_per_class"][:2] == [0.5, 1.0]
    # strict: class 0: E .95 FP, A1 .9 TP -> precision 0, 1/2 -> monotone 1/2 -> AP (1/2) / 2 = 1/4; mAP 5/8
    assert res["strict"]["m"]["mAP"] == pytest.approx(0.625) and res["strict"]["m"]["ap_per_class"][0] == 0.25
    # flat, oid (equal confidences keep the input order): class 0: A1 TP, A2 FP -> AP 1/2 (2 true cells);
    #   class 1: A1 FP, A2 TP -> precision 0, 1/2 -> AP 1/2; mAP 1/2
    # flat, strict: class 0: A1 TP, A2 FP, E FP -> AP 1/2; class 1: A1 FP, A2 TP, E FP -> AP 1/2
    assert res["oid"]["flat"]["mAP"] == pytest.approx(0.5) and res["strict"]["flat"]["mAP"] == pytest.approx(0.5)
    for mode in ("oid", "strict"):
        assert len(res[mode]["m"]["bootstrap"]) == 4
    one = score_methods(run, data, table, {"m": conf}, "strict")  # one mode: {method: ...}
    assert one["m"]["mAP"] == res["strict"]["m"]["mAP"] and "bootstrap" not in one["m"]


def test_score_methods_names_a_predicted_image_outside_the_ground_truth(folders):
    data, run = folders
    (data / "test.csv").write_text("ID\nA\nB\n")  # E no longer a test image
    table = pd.DataFrame({"ID": ["A", "E"], "cell_id": [1, 1]})
    with pytest.raises(ValueError, match=r"predicted image ID\(s\) not in the ground truth: \['E'\]"):
        score_methods(run, data, table, {"m": np.full((2, 19), 0.5)})
