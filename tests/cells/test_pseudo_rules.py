"""Cell table scores and pseudo-label rules on hand-made cells and CAMs."""

import numpy as np
import pytest

from hpa.cells.pseudo_rules import (
    assign_labels,
    cam_evidence,
    class_thresholds,
    diagnostics,
    fill_labels,
    fill_targets,
    top_cell_per_label,
)
from hpa.cells.table import cell_cam_scores, cell_geometry, image_cell_rows
from hpa.constants import NEGATIVE, NUM_CLASSES


def two_squares():
    mask = np.zeros((40, 40), np.int32)
    mask[5:15, 5:15] = 1
    mask[25:35, 25:35] = 2
    return mask


def test_geometry_bbox_area_border():
    mask = two_squares()
    mask[0:3, 30:40] = 3  # touches the top and right border
    geo = cell_geometry(mask).set_index("cell_id")
    assert geo.loc[1, ["x0", "y0", "x1", "y1", "area"]].tolist() == [5, 5, 15, 15, 100]
    assert geo.loc[3, "area"] == 30 and bool(geo.loc[3, "touches_border"]) and not geo.loc[1, "touches_border"]
    assert geo.loc[2, "rel_area"] == pytest.approx(1.0)


def test_cam_scores_mean_and_topk():
    mask = two_squares()
    cam = np.zeros((1, 40, 40), np.float32)
    cam[0, 5:15, 5:15] = 1.0
    cam[0, 25:35, 25:30] = 0.4  # half of cell 2 at 0.4
    mean, topk = cell_cam_scores(mask, cam, topk_frac=0.5, work_size=512)
    assert mean[:, 0] == pytest.approx([1.0, 0.2])
    assert topk[:, 0] == pytest.approx([1.0, 0.4])


def test_cam_scores_from_feature_grid_match_upsampled():
    # a 4x4 CAM grid over a 40x40 field: cell 1 lies in grid cell (0,0), cell 2 in (3,3)
    mask = two_squares()
    grid = np.zeros((1, 4, 4), np.float32)
    grid[0, 0, 0] = 1.0
    mean, _ = cell_cam_scores(mask, grid, 0.25, 512)
    # bilinear upsampling ramps from 1 at the grid cell's centre (x=5) to 0 at the next
    # centre (x=15) in each axis: the mean over the square 5..15 is about 0.5 * 0.5
    assert mean[0, 0] == pytest.approx(0.25, abs=0.03) and mean[1, 0] == pytest.approx(0.0, abs=1e-6)


def test_two_cells_give_class_and_negative():
    mask = two_squares()
    cam = np.zeros((1, 40, 40), np.float32)
    cam[0, 5:15, 5:15] = 1.0
    probs = np.zeros(NUM_CLASSES, np.float32)
    probs[3] = 0.9
    rows = image_cell_rows("img", mask, probs, cam, [3], topk_frac=0.25, work_size=512)
    labels = np.zeros((2, NUM_CLASSES), np.uint8)
    labels[:, 3] = 1
    ev = cam_evidence(rows, labels, "topk_mean", times_image_prob=True)
    assert ev[:, 3] == pytest.approx([0.9, 0.0])
    assert ev[:, [c for c in range(NUM_CLASSES) if c != 3]].max() == 0
    label, conf, thr = assign_labels(ev, np.zeros(2, bool), pos_quantile=0.5, pos_min=0.3, neg_threshold=0.1)
    assert label.tolist() == [3, NEGATIVE]
    assert conf[0] == pytest.approx(0.9)


def test_evidence_restricted_to_image_labels():
    mask = two_squares()
    cams = np.ones((2, 40, 40), np.float32)
    probs = np.full(NUM_CLASSES, 0.8, np.float32)
    rows = image_cell_rows("img", mask, probs, cams, [3, 7], 0.25, 512)
    labels = np.zeros((2, NUM_CLASSES), np.uint8)
    labels[:, 7] = 1  # only class 7 is the image's label
    ev = cam_evidence(rows, labels)
    assert ev[:, 3].max() == 0 and ev[:, 7] == pytest.approx([0.8, 0.8])


def test_ambiguous_cells_left_out_and_negative_images():
    ev = np.zeros((4, NUM_CLASSES), np.float32)
    ev[:, 0] = [0.9, 0.2, 0.05, 0.9]
    label, _, thr = assign_labels(ev, np.array([False, False, False, True]), pos_quantile=0.0, pos_min=0.3,
                                  neg_threshold=0.1)
    assert label.tolist() == [0, -1, NEGATIVE, NEGATIVE]


def test_thresholds_follow_distribution_per_class():
    ev = np.zeros((6, NUM_CLASSES), np.float32)
    ev[:3, 0] = [0.4, 0.6, 0.8]
    ev[3:, 5] = [0.9, 0.95, 1.0]
    thr = class_thresholds(ev, pos_quantile=0.5, pos_min=0.3)
    assert thr[0] == pytest.approx(0.6) and thr[5] == pytest.approx(0.95) and thr[1] == pytest.approx(0.3)


def test_cycle2_cell_model_adds_negatives_and_positives():
    ev = np.zeros((3, NUM_CLASSES), np.float32)
    ev[:, 2] = [0.25, 0.2, 0.9]  # cells 0 and 1 ambiguous in cycle 1
    l1, _, _ = assign_labels(ev, np.zeros(3, bool), 0.0, 0.3, 0.1)
    assert l1.tolist() == [-1, -1, 2]
    probs = np.zeros((3, NUM_CLASSES), np.float32)
    probs[0, 2] = 1.0  # the cell model is sure cell 0 shows class 2
    probs[1, NEGATIVE] = 1.0  # ... and that cell 1 shows nothing
    probs[2, 2] = 1.0
    l2, _, _ = assign_labels(ev, np.zeros(3, bool), 0.0, 0.3, 0.1, cell_probs=probs, cycle2_weight=0.5)
    assert l2.tolist() == [2, NEGATIVE, 2]


def test_diagnostics_precision_recall():
    labels = np.array([0, 0, NEGATIVE, -1])
    truth = [[0], [5], [NEGATIVE], [0]]
    d = diagnostics(labels, truth)
    assert d["precision"][0] == pytest.approx(0.5)
    assert d["recall"][0] == pytest.approx(0.5)
    assert d["overall_precision"] == pytest.approx(2 / 3)


def test_label_sets_add_passing_classes_to_positives_only():
    from hpa.cells.pseudo_rules import label_sets

    ev = np.zeros((3, NUM_CLASSES), np.float32)
    ev[0, [2, 5, 9]] = [0.9, 0.6, 0.2]  # positive 2; 5 passes its threshold, 9 does not
    ev[1, 5] = 0.05  # Negative: stays single
    thr = np.full(NUM_CLASSES, 0.5, np.float32)
    assert label_sets(ev, np.array([2, NEGATIVE, -1]), thr) == [[2, 5], [NEGATIVE], [-1]]
    # relative: 9 joins when its evidence is at least 0.2 x the label's (0.2 >= 0.2 x 0.9); Negative stays single
    assert label_sets(ev, np.array([2, NEGATIVE, -1]), thr, relative=0.2) == [[2, 5, 9], [NEGATIVE], [-1]]
    assert label_sets(ev, np.array([2, NEGATIVE, -1]), thr, relative=0.25) == [[2, 5], [NEGATIVE], [-1]]


def test_membership_evidence_counts_a_cells_second_class_fully():
    from hpa.cells.pseudo_rules import cell_model_evidence

    p = np.zeros((2, NUM_CLASSES), np.float32)
    p[0, [0, 2, NEGATIVE]] = [0.45, 0.45, 0.1]  # a positive cell showing two classes
    p[1, [0, NEGATIVE]] = [0.2, 0.8]  # a probably negative cell
    m = cell_model_evidence(p)
    assert m[0, 0] == pytest.approx(0.9) and m[0, 2] == pytest.approx(0.9) and m[0, NEGATIVE] == pytest.approx(0.1)
    assert m[1, 0] == pytest.approx(0.2) and m[1, NEGATIVE] == pytest.approx(0.8) and m[1, 5] == 0
    np.testing.assert_array_equal(cell_model_evidence(p, "softmax"), p)
    with pytest.raises(ValueError, match="unknown cell-model evidence 'max'; valid: membership, softmax"):
        cell_model_evidence(p, "max")


def test_cycle2_label_sets_keep_the_secondary_classes_of_cycle1():
    from hpa.cells.pseudo_rules import label_sets, mixed_evidence

    ev = np.zeros((1, NUM_CLASSES), np.float32)
    ev[0, [0, 2]] = [0.9, 0.6]  # cycle 1: nucleoplasm, and nucleoli passes too
    thr1 = np.full(NUM_CLASSES, 0.5, np.float32)
    probs = np.zeros((1, NUM_CLASSES), np.float32)
    probs[0, 0] = 1.0  # the cycle-1 cell model learnt nucleoplasm only
    mixed = mixed_evidence(ev, probs, 0.7)
    assert mixed[0, 2] == pytest.approx(0.18) and mixed[0, 5] == 0  # 0.3 * 0.6; classes outside the image stay 0
    thr2 = np.full(NUM_CLASSES, 0.3, np.float32)
    assert label_sets(mixed, np.array([0]), thr2) == [[0]]
    assert label_sets(mixed, np.array([0]), thr2, also=(ev, thr1)) == [[0, 2]]


def test_diagnostics_of_label_sets():
    labels = np.array([0, 2, NEGATIVE])
    truth = [[0, 2], [2], None]
    d = diagnostics(labels, truth, sets=[[0, 2], [2, 5], [NEGATIVE]])
    assert d["set_precision"][2] == pytest.approx(1.0) and d["set_precision"][5] == pytest.approx(0.0)
    assert d["set_recall"][2] == pytest.approx(1.0) and d["set_recall"][0] == pytest.approx(1.0)
    assert d["set_precision_all"] == pytest.approx(3 / 4)  # the unmatched Negative cell is not counted


def test_fill_labels_gives_left_out_cells_the_best_allowed_class():
    label = np.array([3, -1, -1, -1, NEGATIVE])
    img = np.zeros((5, NUM_CLASSES))
    img[:, [3, 7]] = 1
    img[3] = 0
    img[3, NEGATIVE] = 1  # a Negative-only image
    p = np.full((5, NUM_CLASSES), 0.01, np.float32)
    p[1, 7], p[1, 12] = 0.4, 0.5  # 12 is not among the image's classes: 7 wins
    p[2, NEGATIVE], p[2, 3] = 0.6, 0.3  # Negative is always allowed
    p[3, 0] = 0.9  # only Negative is allowed
    p[0, 7] = p[4, 3] = 0.9  # labelled cells keep their labels
    assert fill_labels(label, p, img).tolist() == [3, 7, NEGATIVE, NEGATIVE, NEGATIVE]
    with pytest.raises(ValueError, match="disagree"):
        fill_labels(label[:3], p, img)


def test_fill_targets_are_the_cell_models_probabilities_over_the_allowed_classes():
    img = np.zeros((2, NUM_CLASSES))
    img[:, [3, 7]] = 1
    p = np.zeros((2, NUM_CLASSES), np.float32)
    p[0, 3], p[0, 7], p[0, 12], p[0, NEGATIVE] = 0.3, 0.1, 0.5, 0.1  # 12 is not allowed: dropped
    t = fill_targets(p, img)  # row 1: no allowed probability at all -> uniform over 3, 7, Negative
    assert t[0, [3, 7, NEGATIVE]] == pytest.approx([0.6, 0.2, 0.2]) and t[0, 12] == 0
    assert t[1, [3, 7, NEGATIVE]] == pytest.approx([1 / 3] * 3) and t.sum(1) == pytest.approx([1, 1])
    with pytest.raises(ValueError, match="disagree"):
        fill_targets(p[:1], img)


def test_top_cell_per_label_names_the_best_cell_of_each_image_class_nobody_took():
    # image 0: cells 0-2, classes 3 (taken by cell 0) and 11 (nobody: cell 2 has the most evidence);
    # image 1: cells 3-4, class 11 (nobody, cell 3); image 2: cell 5, Negative only (no evidence)
    ev = np.zeros((6, NUM_CLASSES), np.float32)
    ev[0:3, 3] = [0.9, 0.2, 0.1]
    ev[0:3, 11] = [0.05, 0.01, 0.08]
    ev[3:5, 11] = [0.02, 0.01]
    label = np.array([3, -1, NEGATIVE, -1, NEGATIVE, NEGATIVE])
    image = np.array([5, 5, 5, 1, 1, 7])  # any image keys, rows need not be sorted by image
    assert sorted(top_cell_per_label(label, ev, image)) == [(2, 11), (3, 11)]
    # rows in another order give the same cells
    perm = np.array([4, 0, 5, 2, 3, 1])
    got = top_cell_per_label(label[perm], ev[perm], image[perm])
    assert sorted((int(perm[j]), c) for j, c in got) == [(2, 11), (3, 11)]
    assert top_cell_per_label(label[:0], ev[:0], image[:0]) == []
    with pytest.raises(ValueError, match="disagree"):
        top_cell_per_label(label, ev[:3], image)
