"""Cell-level mAP (hpa.eval.metric) and the scoring CLI (hpa.score), with hand-computed answers."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from shared_data import HPA_REAL, needs

from hpa.eval import metric
from hpa.eval.metric import cell_map, submission_map
from hpa.eval.score import main as score_main
from hpa.eval.submission import read_submission, write_submission
from hpa.io.fields import write_mask

NAN = np.nan


def conf_matrix(rows):
    """{row: {class: conf}} -> (K, 19) float64 with NaN elsewhere."""
    k = max(rows) + 1
    c = np.full((k, 19), NAN)
    for r, d in rows.items():
        for cls, v in d.items():
            c[r, cls] = v
    return c


def both_paths(tmp_path, gt, pred, **kw):
    """Score through the fast path and through write -> read -> submission_map; return both."""
    fast = cell_map(gt, pred, **kw)
    path = write_submission(tmp_path / f"sub_{len(list(tmp_path.iterdir()))}.csv", pred)
    slow = submission_map(gt, read_submission(path), **kw)
    return fast, slow


def assert_same(a, b):
    assert a.map == b.map or (np.isnan(a.map) and np.isnan(b.map))
    np.testing.assert_array_equal(a.ap_per_class, b.ap_per_class)
    np.testing.assert_array_equal(a.n_gt_per_class, b.n_gt_per_class)
    np.testing.assert_array_equal(a.n_pred_per_class, b.n_pred_per_class)
    np.testing.assert_array_equal(a.n_tp_per_class, b.n_tp_per_class)


def three_cells():
    g = np.zeros((10, 10), np.int32)
    g[0:4, 0:4] = 1
    g[0:4, 5:9] = 2
    g[5:9, 0:4] = 3
    return g


@pytest.mark.parametrize("mode", ["oid", "strict"])
def test_ground_truth_as_prediction_scores_one(tmp_path, mode):
    g1 = three_cells()
    g2 = np.zeros((7, 12), np.int32)  # non-square
    g2[1:6, 1:5] = 2
    g2[1:6, 6:11] = 5
    gt = {"A": (g1, {1: [0], 2: [0, 1], 3: [18]}), "B": (g2, {2: [1, 7], 5: [11]})}
    pred = {}
    for k, (m, labels) in gt.items():
        ids = sorted(labels)
        c = np.full((len(ids), 19), NAN)
        for r, i in enumerate(ids):
            c[r, labels[i]] = 1.0
        pred[k] = (m, ids, c)
    fast, slow = both_paths(tmp_path, gt, pred, mode=mode)
    assert fast.map == 1.0 and slow.map == 1.0
    assert fast.n_gt_per_class.tolist()[:2] == [2, 2] and fast.n_gt_per_class[18] == 1
    assert np.isnan(fast.ap_per_class[2])  # no ground truth of class 2
    assert_same(fast, slow)


def test_hand_computed_two_classes(tmp_path):
    g = three_cells()  # true: cell 1 -> {0}, cell 2 -> {0, 1}, cell 3 -> {1}
    p = g.copy()
    p[5:9, 5:9] = 4  # predicted cell 4 covers background: matches nothing
    gt = {"A": (g, {1: [0], 2: [0, 1], 3: [1]})}
    conf = conf_matrix({0: {0: 0.9, 1: 0.5, 5: 0.4}, 1: {0: 0.3, 1: 0.7}, 2: {0: 0.6, 1: 0.2}, 3: {0: 0.8}})
    # class 0 (2 true): c1 .9 TP, c4 .8 FP, c3 .6 FP, c2 .3 TP -> precision 1, 1/2, 1/3, 1/2
    #   monotone from the right: 1, 1/2, 1/2, 1/2 -> AP = (1 + 1/2) / 2 = 0.75
    # class 1 (2 true): c2 .7 TP, c1 .5 FP, c3 .2 TP -> precision 1, 1/2, 2/3 -> monotone 1, 2/3, 2/3
    #   AP = (1 + 2/3) / 2 = 5/6
    # class 5: no true cell anywhere -> NaN (oid: the prediction is ignored, the image has no class 5)
    # mAP = (3/4 + 5/6) / 2 = 19/24
    fast, slow = both_paths(tmp_path, gt, {"A": (p, [1, 2, 3, 4], conf)})
    assert fast.ap_per_class[0] == pytest.approx(0.75, abs=1e-15)
    assert fast.ap_per_class[1] == pytest.approx(5 / 6, abs=1e-15)
    assert fast.map == pytest.approx(19 / 24, abs=1e-15)
    assert fast.n_pred_per_class[:2].tolist() == [4, 3] and fast.n_tp_per_class[:2].tolist() == [2, 2]
    assert fast.n_ignored == 1 and fast.n_pred_per_class[5] == 0
    assert_same(fast, slow)
    strict = cell_map(gt, {"A": (p, [1, 2, 3, 4], conf)}, mode="strict")
    assert strict.map == fast.map and strict.n_pred_per_class[5] == 1  # counted, but class 5 has no GT


def test_iou_just_under_and_over_threshold(tmp_path):
    g = np.zeros((12, 30), np.int32)
    g[0:10, 0:10] = 1  # 100 pixels
    gt = {"A": (g, {1: [3]})}
    conf = conf_matrix({0: {3: 0.5}})
    results = {}
    for name, extra in [("over", 66), ("under", 67)]:  # IoU 100/166 = 0.6024, 100/167 = 0.5988
        p = (g > 0).astype(np.int32)
        flat = p.reshape(-1)
        free = np.flatnonzero(flat == 0)[:extra]
        flat[free] = 1
        results[name] = both_paths(tmp_path, gt, {"A": (p, [1], conf)})
    p = np.zeros_like(g)
    p[0:6, 0:10] = 1  # 60 of the 100 pixels: IoU exactly 0.6 -> a match (>=)
    results["exact"] = both_paths(tmp_path, gt, {"A": (p, [1], conf)})
    for name, expected in [("over", 1.0), ("exact", 1.0), ("under", 0.0)]:
        fast, slow = results[name]
        assert fast.map == expected, name
        assert_same(fast, slow)


def test_swapping_true_and_false_positive_confidence_lowers_ap():
    g = three_cells()
    p = g.copy()
    p[5:9, 5:9] = 4
    gt = {"A": (g, {1: [0], 2: [0], 3: [1]})}
    good = conf_matrix({0: {0: 0.9}, 1: {0: 0.3}, 3: {0: 0.5}})
    # TP .9, FP .5, TP .3 -> precision 1, 1/2, 2/3 -> AP(0) = (1 + 2/3) / 2 = 5/6
    swapped = conf_matrix({0: {0: 0.5}, 1: {0: 0.3}, 3: {0: 0.9}})
    # FP .9, TP .5, TP .3 -> precision 0, 1/2, 2/3 -> monotone 2/3, 2/3, 2/3 -> AP(0) = 2/3
    a = cell_map(gt, {"A": (p, [1, 2, 3, 4], good)})
    b = cell_map(gt, {"A": (p, [1, 2, 3, 4], swapped)})
    assert a.ap_per_class[0] == pytest.approx(5 / 6, abs=1e-15)
    assert b.ap_per_class[0] == pytest.approx(2 / 3, abs=1e-15)
    assert b.map < a.map  # class 1 has one true cell and no prediction: AP 0 in both


def test_oid_ignores_classes_absent_from_image_strict_counts_them(tmp_path):
    g = np.zeros((6, 6), np.int32)
    g[1:5, 1:5] = 1
    gt = {"A": (g, {1: [0]}), "B": (g, {1: [2]})}
    pred = {
        "A": (g, [1], conf_matrix({0: {0: 0.9, 2: 0.95}})),  # class 2 in A: A's true cells have no class 2
        "B": (g, [1], conf_matrix({0: {2: 0.5}})),
    }
    oid, oid_sub = both_paths(tmp_path, gt, pred, mode="oid")
    # oid: A's class-2 prediction is ignored -> class 0 AP 1, class 2 AP 1
    assert oid.map == 1.0 and oid.n_ignored == 1
    strict, strict_sub = both_paths(tmp_path, gt, pred, mode="strict")
    # strict: class 2 = A .95 FP, B .5 TP -> precision 0, 1/2 -> monotone 1/2, 1/2 -> AP 1/2; mAP = (1 + 1/2) / 2
    assert strict.ap_per_class[2] == 0.5 and strict.map == 0.75 and strict.n_ignored == 0
    assert_same(oid, oid_sub)
    assert_same(strict, strict_sub)


def test_duplicates_of_a_matched_cell_are_false_positives(tmp_path):
    g = three_cells()
    gt = {"A": (g, {1: [0], 2: [0], 3: [5]})}
    # cell 1 predicted twice for class 0: .9 TP, .8 duplicate FP, then cell 2 .7 TP
    # precision 1, 1/2, 2/3 -> monotone 1, 2/3, 2/3 -> AP(0) = (1 + 2/3) / 2 = 5/6 (1.0 without the duplicate)
    conf = conf_matrix({0: {0: 0.9}, 1: {0: 0.8}, 2: {0: 0.7}, 3: {5: 0.1}})
    fast, slow = both_paths(tmp_path, gt, {"A": (g, [1, 1, 2, 3], conf)})
    assert fast.ap_per_class[0] == pytest.approx(5 / 6, abs=1e-15)
    assert fast.n_pred_per_class[0] == 3 and fast.n_tp_per_class[0] == 2
    assert_same(fast, slow)
    sub = read_submission(write_submission(tmp_path / "dup.csv", {"A": (g, [1, 1, 2, 3], conf)}))
    assert sub["A"].n_masks == 3  # the duplicated cell is decoded once


def random_case(seed, n_images=4):
    """Random true cells with 1-2 labels, predictions = shifted/merged cells plus a stray one."""
    rng = np.random.default_rng(seed)
    gt, pred = {}, {}
    for i in range(n_images):
        h, w = int(rng.integers(14, 26)), int(rng.integers(14, 26))
        g = np.zeros((h, w), np.int32)
        cid = 0
        for y in range(0, h - 5, 7):
            for x in range(0, w - 5, 7):
                if rng.random() < 0.85:
                    cid += 1
                    g[y : y + int(rng.integers(4, 7)), x : x + int(rng.integers(4, 7))] = cid
        labels = {c: sorted({int(v) for v in rng.integers(0, 6, int(rng.integers(1, 3)))}) for c in range(1, cid + 1)}
        p = np.roll(g, [(0, 0), (0, 1), (1, 0), (1, 1)][i % 4], axis=(0, 1))  # IoU from 1 down to below 0.6
        p[p == 2] = 1  # merge two cells
        p[h - 3 :, w - 3 :] = 50  # stray cell
        ids = [int(v) for v in np.unique(p) if v] + [77]  # 77: predicted id absent from the mask
        c = rng.random((len(ids), 19)).astype(np.float32)
        c[rng.random(c.shape) < 0.5] = np.nan
        c[rng.random(c.shape) < 0.1] = -1
        c[:, 6:] = np.nan
        c[rng.random(c.shape) < 0.2] = 0.5  # ties
        gt[f"img{i}"] = (g, labels)
        pred[f"img{i}"] = (p, ids, c)
    gt["unpredicted"] = (np.ones((5, 5), np.int32), {1: [0, 1]})  # true cells no one predicted
    return gt, pred


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["oid", "strict"])
def test_submission_round_trip_equals_fast_path(tmp_path, seed, mode):
    gt, pred = random_case(seed)
    fast, slow = both_paths(tmp_path, gt, pred, mode=mode)
    assert 0 < fast.map < 1
    assert_same(fast, slow)


@pytest.mark.parametrize("seed", [3, 4, 5, 6])
def test_vectorised_core_equals_greedy_loop(seed, monkeypatch):
    gt, pred = random_case(seed, n_images=5)
    for mode in ("oid", "strict"):
        vec = cell_map(gt, pred, mode=mode)
        real_score = metric._score
        monkeypatch.setattr(metric, "_score", lambda *a, **k: real_score(*a, **k, sequential=True))
        loop = cell_map(gt, pred, mode=mode)
        monkeypatch.setattr(metric, "_score", real_score)
        assert_same(vec, loop)
        assert vec.n_tp_per_class.sum() > 0


def test_low_threshold_uses_best_unmatched_cell():
    # one predicted mask overlapping two true cells of class 0 at IoU 0.4 and 0.3 (threshold 0.25):
    # the first prediction takes the better cell, the duplicate takes the other one.
    g = np.zeros((1, 10), np.int32)
    g[0, 0:4] = 1
    g[0, 4:10] = 2
    p = np.zeros_like(g)
    p[0, 1:7] = 1  # cell 1: inter 3, union 7 -> 3/7; cell 2: inter 3, union 9 -> 1/3
    gt = {"A": (g, {1: [0], 2: [0]})}
    r = cell_map(gt, {"A": (p, [1, 1], conf_matrix({0: {0: 0.9}, 1: {0: 0.8}}))}, iou_threshold=0.25)
    assert r.map == 1.0 and r.n_tp_per_class[0] == 2
    r = cell_map(gt, {"A": (p, [1, 1], conf_matrix({0: {0: 0.9}, 1: {0: 0.8}}))}, iou_threshold=0.4)
    assert r.n_tp_per_class[0] == 1 and r.map == 0.5


def test_errors_unknown_id_and_sizes(tmp_path):
    g = three_cells()
    gt = {"A": (g, {1: [0], 2: [0], 3: [1]})}
    conf = conf_matrix({2: {0: 0.5}})
    with pytest.raises(ValueError, match=r"not in the ground truth: \['ghost'\]"):
        cell_map(gt, {"ghost": (g, [1, 2, 3], conf)})
    with pytest.raises(ValueError, match=r"image 'A': predicted mask \(10, 11\) and true mask \(10, 10\)"):
        cell_map(gt, {"A": (np.zeros((10, 11), np.int32), [1, 2, 3], conf)})
    with pytest.raises(ValueError, match="unknown metric mode 'loose'; valid: oid, strict"):
        cell_map(gt, {}, mode="loose")
    with pytest.raises(ValueError, match=r"image 'A': true mask and true labels disagree: cells \[3\]"):
        cell_map({"A": (g, {1: [0], 2: [0]})}, {"A": (g, [1, 2, 3], conf)})
    sub = read_submission(write_submission(tmp_path / "s.csv", {"ghost": (g, [1, 2, 3], conf)}))
    with pytest.raises(ValueError, match=r"row 2 ID 'ghost'"):
        submission_map(gt, sub)
    wide = np.zeros((10, 12), np.int32)
    wide[:4, :4] = 1
    sub = read_submission(write_submission(tmp_path / "s.csv", {"A": (wide, [1], conf_matrix({0: {0: 1.0}}))}))
    with pytest.raises(ValueError, match=r"row 2 \(ID 'A'\): image size 12 x 10 \(W x H\) but the true mask is 10 x 10"):
        submission_map(gt, sub)


def test_empty_predictions_and_no_ground_truth():
    g = three_cells()
    gt = {"A": (g, {1: [0], 2: [0], 3: [1]})}
    r = cell_map(gt, {})
    assert r.map == 0.0 and r.n_gt_per_class[:2].tolist() == [2, 1]
    r = cell_map({"A": (np.zeros((4, 4), np.int32), {})}, {"A": (g[:4, :4], [1], conf_matrix({0: {0: 1.0}}))}, mode="strict")
    assert np.isnan(r.map) and r.n_pred_per_class[0] == 1


# --------------------------------------------------------------------------- CLI
def make_data_dir(root: Path) -> Path:
    gt_dir = root / "gt"
    a = three_cells()
    b = np.zeros((8, 6), np.int32)
    b[1:7, 1:5] = 1
    write_mask(gt_dir / "A_cellmask.png", a)
    write_mask(gt_dir / "B_cellmask.png", b)
    write_mask(gt_dir / "T_cellmask.png", b)
    (gt_dir / "cell_labels.csv").write_text(
        "ID,cell_id,Label,split\nA,1,0,test\nA,2,0|1,test\nA,3,18,test\nB,1,1,test\nT,1,5,train\n"
    )
    return root


def perfect(masks_labels):
    out = {}
    for k, (m, labels) in masks_labels.items():
        ids = sorted(labels)
        c = np.full((len(ids), 19), NAN)
        for r, i in enumerate(ids):
            c[r, labels[i]] = 1.0
        out[k] = (m, ids, c)
    return out


def test_score_cli(tmp_path, capsys):
    data = make_data_dir(tmp_path / "data")
    a = three_cells()
    b = np.zeros((8, 6), np.int32)
    b[1:7, 1:5] = 1
    truth = {"A": (a, {1: [0], 2: [0, 1], 3: [18]}), "B": (b, {1: [1]})}
    sub = write_submission(tmp_path / "sub.csv", perfect(truth))
    assert score_main([str(sub), str(data)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "mAP=1.0000"
    assert any(line.split()[:2] == ["18", "Negative"] for line in out)

    only_a = write_submission(tmp_path / "a.csv", perfect({"A": truth["A"]}))
    assert score_main([str(only_a), str(data), "--mode", "strict"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    # class 0: 2/2 found (AP 1); class 1: 1 of 2 true cells found (AP 1/2); class 18: AP 1 -> mAP 2.5 / 3
    assert out[-1] == f"mAP={2.5 / 3:.4f}"
    assert any(line.startswith("warning: 1 of 2 ground-truth images") for line in out)

    train_img = write_submission(tmp_path / "t.csv", perfect({"A": truth["A"], "T": (b, {1: [5]})}))
    assert score_main([str(train_img), str(data)]) == 2
    err = capsys.readouterr().err
    assert "row 3 ID 'T'" in err and "split 'test'" in err
    assert score_main([str(train_img), str(data), "--split", "all"]) == 0
    # classes 0, 5, 18: AP 1; class 1: 1 of 2 true cells (B missing) -> AP 1/2; mAP = 3.5 / 4
    assert capsys.readouterr().out.strip().splitlines()[-1] == "mAP=0.8750"


def test_score_module_entry_point(tmp_path):
    data = make_data_dir(tmp_path / "data")
    a = three_cells()
    sub = write_submission(tmp_path / "sub.csv", perfect({"A": (a, {1: [0], 2: [0, 1], 3: [18]})}))
    res = subprocess.run(
        [sys.executable, "-m", "hpa.score", str(sub), str(data), "--split", "test"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "mAP=0.8333"  # class 1: 1 of 2 true cells (B missing)


REAL_MASKS = HPA_REAL / "masks"


@needs(REAL_MASKS)
def test_real_mask_ground_truth_scores_one_and_eroded_cells_miss(tmp_path):
    from hpa.io.fields import read_mask

    g = read_mask(REAL_MASKS / "000a6c98-bb9b-11e8-b2b9-ac1f6b6435d0_predictedmask.png")[:1024, :1536]  # keep it quick
    ids = [int(i) for i in np.unique(g) if i]
    gt = {"real": (g, {i: [i % 19] for i in ids})}
    conf = np.full((len(ids), 19), NAN)
    conf[np.arange(len(ids)), [i % 19 for i in ids]] = 1.0
    fast, slow = both_paths(tmp_path, gt, {"real": (g, ids, conf)})
    assert fast.map == 1.0 and slow.map == 1.0
    # keep the first 55% / 65% of each cell's pixels (row-major): IoU = kept / area -> all miss / all hit
    flat = g.ravel()
    order = np.argsort(flat, kind="stable")
    starts = np.searchsorted(flat[order], ids)
    areas = np.bincount(flat)[ids]
    for share, expected in [(0.55, 0.0), (0.65, 1.0)]:
        p = np.zeros_like(flat)
        for i, s0, a in zip(ids, starts, areas):
            p[order[s0 : s0 + int(share * a)]] = i
        fast, slow = both_paths(tmp_path, gt, {"real": (p.reshape(g.shape), ids, conf)})
        assert fast.map == expected and fast.n_tp_per_class.sum() == (len(ids) if expected else 0)
        assert_same(fast, slow)


def test_bootstrap_resamples_images_and_pairs_the_methods():
    from hpa.eval.metric import bootstrap_maps, cell_images, score_images

    gt, pred = random_case(7, n_images=5)
    worse = {k: (m, ids, np.where(np.isnan(c), c, c[::-1])) for k, (m, ids, c) in pred.items()}  # confidences shuffled
    cache = {}
    images = {"a": cell_images(gt, pred, cache), "b": cell_images(gt, worse, cache)}
    assert len(cache) == 5  # one IoU matrix per predicted image, shared by both sets
    assert score_images(gt, images["a"]).map == cell_map(gt, pred).map
    boot = bootstrap_maps(gt, images, n_boot=30, seed=1)
    assert boot["a"].shape == (30,) and np.isfinite(boot["a"]).all()
    again = bootstrap_maps(gt, images, n_boot=30, seed=1)
    np.testing.assert_array_equal(boot["a"], again["a"])  # seeded
    # a resample that draws every image once is the full score: check one by hand
    ids = list(gt)
    rng = np.random.default_rng(1)
    draw = rng.integers(0, len(ids), len(ids))
    sub_gt = {f"{ids[j]}#{n}": gt[ids[j]] for n, j in enumerate(draw)}
    sub_pred = {f"{ids[j]}#{n}": pred[ids[j]] for n, j in enumerate(draw) if ids[j] in pred}
    assert boot["a"][0] == pytest.approx(cell_map(sub_gt, sub_pred).map)
    assert not np.array_equal(boot["a"], boot["b"])
    both = bootstrap_maps(gt, images, n_boot=30, seed=1, mode=("oid", "strict"))  # matched once, scored twice
    np.testing.assert_array_equal(both["oid"]["a"], boot["a"])
    np.testing.assert_array_equal(both["strict"]["b"], bootstrap_maps(gt, images, n_boot=30, seed=1, mode="strict")["b"])
    assert (both["strict"]["a"] <= both["oid"]["a"] + 1e-12).all() and (both["strict"]["a"] < both["oid"]["a"]).any()
    res = score_images(gt, images["a"], ["strict", "oid"])
    assert list(res) == ["strict", "oid"] and res["strict"].map == cell_map(gt, pred, mode="strict").map


@pytest.mark.parametrize("iou_type,threshold", [("mask", 0.5), ("box", 0.6)])  # greedy loop; vectorised pass
def test_every_bootstrap_resample_equals_scoring_it_from_scratch(iou_type, threshold):
    """bootstrap_maps matches each image once and ranks by a merge: every resample, drawn images
    repeated and tied confidences included, must equal cell_map of that resample built by hand."""
    from hpa.eval.metric import bootstrap_maps, cell_images

    gt, pred = random_case(11, n_images=6)
    for k, (m, ids, c) in list(pred.items())[:3]:  # many ties across images: the same confidences
        pred[k] = (m, ids, np.where(np.isnan(c) | (c < 0), c, np.round(c, 1)).astype(np.float32))
    images = {"a": cell_images(gt, pred, iou_type=iou_type)}
    modes = ("oid", "strict")
    boot = bootstrap_maps(gt, images, n_boot=12, seed=3, mode=modes, iou_threshold=threshold)
    ids = list(gt)
    rng = np.random.default_rng(3)
    repeated = 0
    for b in range(12):
        draw = rng.integers(0, len(ids), len(ids))
        repeated += len(set(draw.tolist())) < len(draw)
        sub_gt = {f"{ids[j]}#{n}": gt[ids[j]] for n, j in enumerate(draw)}
        sub_pred = {f"{ids[j]}#{n}": pred[ids[j]] for n, j in enumerate(draw) if ids[j] in pred}
        for m in modes:
            assert boot[m]["a"][b] == cell_map(sub_gt, sub_pred, mode=m, iou_threshold=threshold,
                                               iou_type=iou_type).map, (b, m)
    assert repeated > 0


def test_step_gains_from_paired_resamples():
    from hpa.eval.benchmark import step_gains

    methods = {"broadcast": {"mAP": 0.5, "bootstrap": [0.4, 0.5, 0.6, 0.5]},
               "cam": {"mAP": 0.6, "bootstrap": [0.5, 0.55, 0.65, 0.7]},
               "cycle1": {"mAP": 0.9}}  # no resamples: no step
    steps = step_gains(methods)
    assert len(steps) == 1 and steps[0]["from"] == "broadcast" and steps[0]["to"] == "cam"
    assert steps[0]["gain"] == pytest.approx(0.1) and steps[0]["p_better"] == pytest.approx(1.0)
    assert steps[0]["ci95"][0] == pytest.approx(np.percentile([0.1, 0.05, 0.05, 0.2], 2.5))


# --------------------------------------------------------------------------- images without true cells
def image_without_cells_case():
    g = three_cells()  # A: cells 1, 2 of class 0, cell 3 of class 1
    empty = np.zeros((10, 10), np.int32)
    p_e = np.zeros_like(empty)
    p_e[2:6, 2:6] = 1  # a cell found where there is none
    gt = {"A": (g, {1: [0], 2: [0], 3: [1]}), "E": (empty, {})}
    pred = {"A": (g, [1, 2, 3], conf_matrix({0: {0: 0.9}, 1: {0: 0.5}, 2: {1: 0.8}})),
            "E": (p_e, [1], conf_matrix({0: {0: 0.7, 1: 0.9}}))}
    return gt, pred


@pytest.mark.parametrize("iou_type", ["mask", "box"])
def test_prediction_in_an_image_without_true_cells(tmp_path, iou_type):
    gt, pred = image_without_cells_case()
    # strict: class 0: A1 .9 TP, E .7 FP, A2 .5 TP -> precision 1, 1/2, 2/3 -> monotone 1, 2/3, 2/3 -> AP 5/6
    #         class 1: E .9 FP, A3 .8 TP -> precision 0, 1/2 -> monotone 1/2, 1/2 -> AP 1/2; mAP (5/6 + 1/2) / 2 = 2/3
    strict, strict_sub = both_paths(tmp_path, gt, pred, mode="strict", iou_type=iou_type)
    assert strict.ap_per_class[0] == pytest.approx(5 / 6, abs=1e-15)
    assert strict.ap_per_class[1] == pytest.approx(0.5, abs=1e-15)
    assert strict.map == pytest.approx(2 / 3, abs=1e-15) and strict.n_pred_per_class[:2].tolist() == [3, 2]
    assert strict.n_images == 2 and strict.n_images_predicted == 2
    assert_same(strict, strict_sub)
    # oid: the image has no class at all, so both of its predictions are ignored (the organisers' evaluator
    # never adds an image without ground-truth rows): AP 1 and 1
    oid, oid_sub = both_paths(tmp_path, gt, pred, mode="oid", iou_type=iou_type)
    assert oid.map == 1.0 and oid.n_ignored == 2 and oid.n_pred_per_class[:2].tolist() == [2, 1]
    assert_same(oid, oid_sub)


def test_score_cli_counts_images_without_true_cells(tmp_path, capsys):
    data = make_data_dir(tmp_path / "data")  # A, B labelled test images; T a train image
    empty = np.zeros((10, 10), np.int32)
    write_mask(data / "gt" / "E_cellmask.png", empty)
    gt, pred = image_without_cells_case()
    pred = {"A": (three_cells(), [1, 2, 3], conf_matrix({0: {0: 0.9}, 1: {0: 0.5}, 2: {18: 0.8}})), "E": pred["E"]}
    sub = write_submission(tmp_path / "sub.csv", pred)
    # E has a mask but is not listed as a test image: not ground truth
    assert score_main([str(sub), str(data)]) == 2
    assert "row 3 ID 'E'" in capsys.readouterr().err
    (data / "test.csv").write_text("ID\nA\nB\nE\n")
    # strict: class 0: A1 .9 TP, E .7 FP, A2 .5 TP -> AP 5/6; class 1 (A2, B1 true): E .9 FP -> AP 0;
    #         class 18: A3 .8 TP -> AP 1; mAP = (5/6 + 0 + 1) / 3 = 11/18
    assert score_main([str(sub), str(data), "--mode", "strict"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].endswith("images=3") and out[-1] == f"mAP={11 / 18:.4f}"
    # oid: E's two predictions ignored: class 0 AP 1, class 1 AP 0 (no prediction), class 18 AP 1 -> 2/3
    assert score_main([str(sub), str(data)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "mAP=0.6667" and any(line.startswith("note: 2 predictions") for line in out)
    one_cell = np.zeros((10, 10), np.int32)
    one_cell[0:3, 0:3] = 1
    write_mask(data / "gt" / "E_cellmask.png", one_cell)  # listed, unlabelled, but its mask has a cell
    assert score_main([str(sub), str(data), "--mode", "strict"]) == 2
    assert "image 'E': true mask and true labels disagree: cells [1] of the mask have no labels" in capsys.readouterr().err


# --------------------------------------------------------------------------- box IoU (the organisers' script)
def test_instance_boxes_and_box_iou_by_hand():
    m = np.zeros((6, 8), np.int32)
    m[1:3, 2:5] = 4  # rows 1-2, cols 2-4
    m[5, 7] = 9
    ids, boxes = metric.instance_boxes(m)
    assert ids.tolist() == [4, 9]
    assert boxes.tolist() == [[1, 2, 3, 5], [5, 7, 6, 8]]  # [ymin, xmin, ymax + 1, xmax + 1]
    # [0,0,2,2] vs [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7; a zero-area box: IoU 0
    iou = metric.box_iou(np.array([[0, 0, 2, 2], [0, 0, 0, 0]]), np.array([[1, 1, 3, 3], [0, 0, 2, 2]]))
    np.testing.assert_allclose(iou, [[1 / 7, 1.0], [0.0, 0.0]], rtol=0, atol=1e-15)
    assert metric.instance_boxes(np.zeros((3, 3), np.int32))[1].shape == (0, 4)


def box_vs_mask_case():
    g = np.zeros((12, 20), np.int32)
    g[0:10, 0:2] = 1
    g[8:10, 0:10] = 1  # cell 1: an L of 20 + 20 - 4 = 36 pixels in the box rows 0-9, cols 0-9
    g[0:3, 14:17] = 2  # cell 2: a 3 x 3 square
    p = np.zeros_like(g)
    p[0:10, 0:10] = 1  # the L's whole box: mask IoU 36/100 = 0.36, box IoU 1
    p[0:3, 14:17] = 2
    p[11, 19] = 2  # cell 2 and one stray pixel: mask IoU 9/10 = 0.9; box rows 0-11 x cols 14-19 = 72 -> IoU 9/72
    gt = {"A": (g, {1: [0], 2: [1]})}
    return gt, {"A": (p, [1, 2], conf_matrix({0: {0: 0.9}, 1: {1: 0.8}}))}


def test_box_and_mask_iou_disagree_by_hand(tmp_path, capsys):
    gt, pred = box_vs_mask_case()
    mask, mask_sub = both_paths(tmp_path, gt, pred, iou_type="mask")
    box, box_sub = both_paths(tmp_path, gt, pred, iou_type="box")
    assert mask.ap_per_class[:2].tolist() == [0.0, 1.0] and mask.iou_type == "mask"
    assert box.ap_per_class[:2].tolist() == [1.0, 0.0] and box.iou_type == "box"
    assert_same(mask, mask_sub)
    assert_same(box, box_sub)
    assert box_sub.to_dict()["iou_type"] == "box"
    # the command line: the same file, both IoU types
    data = tmp_path / "data"
    write_mask(data / "gt" / "A_cellmask.png", gt["A"][0])
    (data / "gt" / "cell_labels.csv").write_text("ID,cell_id,Label,split\nA,1,0,test\nA,2,1|2,test\n")
    sub = write_submission(tmp_path / "box.csv", {"A": (pred["A"][0], [1, 2, 2], conf_matrix({0: {0: 0.9}, 1: {1: 0.8}, 2: {2: 0.7}}))})
    # classes 0, 1, 2 with one true cell each; class 2's prediction is cell 2 with the stray pixel as well
    assert score_main([str(sub), str(data)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"mAP={2 / 3:.4f}"  # AP 0, 1, 1
    assert score_main([str(sub), str(data), "--iou-type", "box"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "iou_type=box" in out[0] and out[-1] == f"mAP={1 / 3:.4f}"  # AP 1, 0, 0


def test_box_matching_takes_the_best_box_without_fall_back(tmp_path):
    # two true cells of class 0 interleaved column by column: A the even columns, B the odd ones of a 10 x 10
    # square; boxes [0,0,10,9] and [0,1,10,10] overlap at IoU 80 / 100 = 0.8
    g = np.zeros((10, 10), np.int32)
    g[:, 0::2] = 1
    g[:, 1::2] = 2
    p1 = (g == 1).astype(np.int32)  # A exactly: box IoU 1 with A, 0.8 with B
    p2 = p1.copy()
    p2[5, 4] = 0  # A without one inner pixel: the same box (two overlapping predicted masks: built by hand)
    boxes = np.concatenate([metric.instance_boxes(p1)[1], metric.instance_boxes(p2)[1]])
    iou = metric.box_iou(boxes, metric.instance_boxes(g)[1])
    np.testing.assert_allclose(iou, [[1.0, 0.8], [1.0, 0.8]], atol=1e-15)
    im = metric._ImageEval(iou, np.eye(2, 19, dtype=bool)[[0, 0]], np.array([0, 1]), np.array([0, 0]),
                           np.array([0.9, 0.8]), "I", "box")
    # p1 .9 takes A; p2 .8: its best box is A's, already taken -> FP, although B's box has IoU 0.8 >= 0.6
    # (a fall-back would make it a TP): precision 1, 1/2 -> AP = 1/2 (1 of 2 true cells found)
    for sequential in (False, True):
        r = metric._score([im], np.eye(1, 19, dtype=np.int64)[0] * 2, "oid", 0.6, 1, sequential=sequential)
        assert r.n_tp_per_class[0] == 1 and r.ap_per_class[0] == 0.5
    im.iou_type = "mask"  # the mask loop's fall-back (used for thresholds <= 0.5) would take B
    assert metric._score([im], np.eye(1, 19, dtype=np.int64)[0] * 2, "oid", 0.6, 1, sequential=True).map == 1.0


@pytest.mark.parametrize("seed", [3, 4])
def test_box_vectorised_core_equals_greedy_loop(seed, monkeypatch):
    gt, pred = random_case(seed, n_images=5)
    for mode in ("oid", "strict"):
        vec = cell_map(gt, pred, mode=mode, iou_type="box")
        real_score = metric._score
        monkeypatch.setattr(metric, "_score", lambda *a, **k: real_score(*a, **{**k, "sequential": True}))
        loop = cell_map(gt, pred, mode=mode, iou_type="box")
        monkeypatch.setattr(metric, "_score", real_score)
        assert_same(vec, loop)
        assert vec.n_tp_per_class.sum() > 0


def test_box_submission_round_trip_equals_fast_path(tmp_path):
    gt, pred = random_case(1)
    fast, slow = both_paths(tmp_path, gt, pred, mode="strict", iou_type="box")
    assert 0 < fast.map < 1
    assert_same(fast, slow)
    with pytest.raises(ValueError, match="unknown IoU type 'poly'; valid: mask, box"):
        cell_map(gt, pred, iou_type="poly")
