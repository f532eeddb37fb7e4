"""Tests of the synthetic benchmark generator (hpa.synth*, hpa.synth.label_stats). Small 128-px fields."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
from shared_data import SHARED, needs

from hpa.constants import CHANNELS, NEGATIVE
from hpa.io.fields import read_mask
from hpa.io.layout import read_labels
from hpa.synth import label_stats as LS
from hpa.synth.generate import generate_dataset, image_id, main, make_field
from hpa.synth.labels import assign_cell_labels, image_label_from_cells, sample_label_sets
from hpa.synth.render import MITOTIC_ALLOWED, NUCLEAR_CLASSES, compute_maps

DATA = SHARED
N_TRAIN, N_TEST, SIZE, SEED = 6, 3, 128, 5


def _labels(text: str) -> tuple[int, ...]:
    return tuple(sorted(int(c) for c in str(text).split("|")))


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("synth") / "data", N_TRAIN, N_TEST, size=SIZE, seed=SEED,
                            progress=False)


# ----------------------------------------------------------------------------- layout of the folder
def test_layout_and_file_names(synth_set):
    out = synth_set
    train = pd.read_csv(out / "train.csv", dtype=str)
    test = pd.read_csv(out / "test.csv", dtype=str)
    sub = pd.read_csv(out / "sample_submission.csv", dtype=str, keep_default_na=False)
    assert list(train.columns) == ["ID", "Label"]
    assert list(test.columns) == ["ID"]
    assert list(sub.columns) == ["ID", "ImageWidth", "ImageHeight", "PredictionString"]
    assert list(train.ID) == [f"syn-train-{i:05d}" for i in range(1, N_TRAIN + 1)]
    assert list(test.ID) == [f"syn-test-{i:05d}" for i in range(1, N_TEST + 1)]
    assert list(sub.ID) == list(test.ID)
    assert set(sub.ImageWidth) == {str(SIZE)} and set(sub.ImageHeight) == {str(SIZE)}
    assert set(sub.PredictionString) == {""}
    assert not set(train.ID) & set(test.ID)
    ids, y = read_labels(out / "train.csv")  # the project's own reader accepts it
    assert len(ids) == N_TRAIN and y.sum(1).min() >= 1 and y.sum(1).max() <= 4
    for split, ids in (("train", train.ID), ("test", test.ID)):
        for iid in ids:
            for ch in CHANNELS:
                im = cv2.imread(str(out / split / f"{iid}_{ch}.png"), cv2.IMREAD_UNCHANGED)
                assert im.dtype == np.uint8 and im.shape == (SIZE, SIZE)
            assert (out / "gt" / f"{iid}_cellmask.png").is_file()
            assert (out / "gt" / f"{iid}_nucleimask.png").is_file()
    names = {p.name for p in out.rglob("*")}
    assert not [n for n in names if ".tmp" in n]  # no leftovers of atomic writes
    img = pd.read_csv(out / "gt" / "image_labels.csv", dtype=str)
    assert list(img.columns) == ["ID", "Label", "split"]
    assert list(img[img.split == "train"].Label) == list(train.Label)
    assert list(img[img.split == "test"].ID) == list(test.ID)
    cells = pd.read_csv(out / "gt" / "cell_labels.csv", dtype={"ID": str, "Label": str})
    assert list(cells.columns) == ["ID", "cell_id", "Label", "split"]
    assert image_id("train", 0) == "syn-train-00001"


def test_masks_and_cell_labels_agree(synth_set):
    out = synth_set
    cells = pd.read_csv(out / "gt" / "cell_labels.csv", dtype={"ID": str, "Label": str})
    img = pd.read_csv(out / "gt" / "image_labels.csv", dtype=str)
    for iid, label, split in img.itertuples(index=False):
        cm_raw = cv2.imread(str(out / "gt" / f"{iid}_cellmask.png"), cv2.IMREAD_UNCHANGED)
        nm_raw = cv2.imread(str(out / "gt" / f"{iid}_nucleimask.png"), cv2.IMREAD_UNCHANGED)
        assert cm_raw.dtype == np.uint16 and nm_raw.dtype == np.uint16
        cm, nm = read_mask(out / "gt" / f"{iid}_cellmask.png"), read_mask(out / "gt" / f"{iid}_nucleimask.png")
        K = int(cm.max())
        rows = cells[cells.ID == iid]
        assert list(rows.cell_id) == list(range(1, K + 1))
        assert set(rows.split) == {split}
        assert set(np.unique(cm)) == set(range(K + 1))  # cells numbered 1..K without gaps
        assert set(np.unique(nm)) == set(range(K + 1))  # every cell has a nucleus
        inside = nm > 0
        assert np.array_equal(cm[inside], nm[inside])  # nucleus k lies inside cell k
        cell_sets = [_labels(t) for t in rows.Label]
        assert all(1 <= len(s) <= 3 for s in cell_sets)
        assert all(s == (NEGATIVE,) or NEGATIVE not in s for s in cell_sets)
        union = sorted({c for s in cell_sets for c in s if c != NEGATIVE})
        assert _labels(label) == (tuple(union) if union else (NEGATIVE,))
        assert 4 <= K <= 40


def test_cells_touch_somewhere(synth_set):
    touching = 0
    for p in sorted((synth_set / "gt").glob("*_cellmask.png")):
        m = read_mask(p)
        a, b = m[:, :-1], m[:, 1:]
        touching += int(((a > 0) & (b > 0) & (a != b)).sum())
        a, b = m[:-1], m[1:]
        touching += int(((a > 0) & (b > 0) & (a != b)).sum())
    assert touching > 0


def test_deterministic_and_independent_of_workers(synth_set, tmp_path):
    other = generate_dataset(tmp_path / "again", N_TRAIN, N_TEST, size=SIZE, seed=SEED, workers=2, progress=False)
    files = sorted(p.relative_to(synth_set) for p in synth_set.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    for rel in files:
        assert (synth_set / rel).read_bytes() == (other / rel).read_bytes(), rel
    different = generate_dataset(tmp_path / "seed6", 2, 0, size=SIZE, seed=SEED + 1, progress=False)
    assert (different / "train" / "syn-train-00001_green.png").read_bytes() != \
        (synth_set / "train" / "syn-train-00001_green.png").read_bytes()


def test_skip_when_complete_and_cli(synth_set, tmp_path):
    stamp = (synth_set / "train.csv").stat().st_mtime_ns
    generate_dataset(synth_set, N_TRAIN, N_TEST, size=SIZE, seed=SEED, progress=False)  # same set: skipped
    assert (synth_set / "train.csv").stat().st_mtime_ns == stamp
    out = main([str(tmp_path / "cli"), "--n-train", "2", "--n-test", "1", "--size", "96", "--seed", "1"])
    assert pd.read_csv(out / "train.csv").shape == (2, 2)
    assert cv2.imread(str(out / "test" / "syn-test-00001_blue.png"), cv2.IMREAD_UNCHANGED).shape == (96, 96)
    # a smaller regeneration into the same folder removes the stale files of the larger one
    generate_dataset(out, 1, 0, size=96, seed=1, progress=False)
    assert not (out / "train" / "syn-train-00002_red.png").exists()
    assert not (out / "gt" / "syn-test-00001_cellmask.png").exists()


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_train"):
        generate_dataset("/nonexistent/x", 0, 1)
    with pytest.raises(ValueError, match=">= 64"):
        make_field(np.random.default_rng(0), 32, (0,))
    with pytest.raises(ValueError, match="1-4 classes"):
        assign_cell_labels(np.random.default_rng(0), (0, 18), np.zeros(5, bool))


# ----------------------------------------------------------------------------- green patterns
def _positive_cells(f, c):
    return [k for k, cl in enumerate(f.cell_labels, start=1) if c in cl]


def _green(f):
    return f.field[1].astype(np.float64)


@pytest.mark.parametrize("seed", [0, 1])
def test_nucleoplasm_is_in_the_nucleus(seed):
    f = make_field(np.random.default_rng([seed, 100]), SIZE, (0,))
    g = _green(f)
    for k in _positive_cells(f, 0):
        nuc, cyto = f.nuclei_mask == k, (f.cell_mask == k) & (f.nuclei_mask != k)
        assert g[nuc].mean() > 3 * g[cyto].mean() + 2, k


@pytest.mark.parametrize("seed", [0, 1])
def test_plasma_membrane_is_at_the_rim(seed):
    f = make_field(np.random.default_rng([seed, 113]), SIZE, (13,))
    g = _green(f)
    maps = compute_maps(f.layout)
    checked = 0
    for k in _positive_cells(f, 13):
        cell = f.cell_mask == k
        rim, inner = cell & (maps.d_edge <= 1.5), cell & (maps.d_edge >= 5)
        if inner.sum() < 10:
            continue
        assert g[rim].mean() > 2.5 * g[inner].mean(), k
        checked += 1
    assert checked >= 2


def test_cytosol_fills_cytoplasm_not_nucleus():
    f = make_field(np.random.default_rng(116), SIZE, (16,))
    g = _green(f)
    for k in _positive_cells(f, 16):
        nuc, cyto = f.nuclei_mask == k, (f.cell_mask == k) & (f.nuclei_mask != k)
        assert g[cyto].mean() > 2 * g[nuc].mean(), k


def test_spindle_only_in_mitotic_cells_and_negative_is_dim():
    f = make_field(np.random.default_rng(111), SIZE, (11,))
    pos = _positive_cells(f, 11)
    assert 1 <= len(pos) <= 2
    assert all(cl == (NEGATIVE,) for k, cl in enumerate(f.cell_labels, 1) if k not in pos)
    g = _green(f)
    spindle_mean = np.mean([g[f.cell_mask == k].mean() for k in pos])
    other_mean = g[(f.cell_mask > 0) & ~np.isin(f.cell_mask, pos)].mean()
    assert spindle_mean > 4 * other_mean
    neg = make_field(np.random.default_rng(118), SIZE, (NEGATIVE,))
    assert all(cl == (NEGATIVE,) for cl in neg.cell_labels)
    assert neg.field[1][neg.cell_mask > 0].mean() < 15  # very dim green (8-bit)


def test_nucleoli_and_centrosome_are_compact():
    f = make_field(np.random.default_rng(102), SIZE, (2,))
    g = _green(f)
    lay = f.layout
    checked = 0
    for k in _positive_cells(f, 2):
        nuc = f.nuclei_mask == k
        nl = nuc & lay.nucleoli
        if nl.sum() >= 3:
            assert g[nl].mean() > 2 * g[nuc & ~nl].mean(), k
            checked += 1
    assert checked >= 2
    f = make_field(np.random.default_rng(112), SIZE, (12,))
    g = _green(f)
    for k in _positive_cells(f, 12):
        cell = f.cell_mask == k
        vals = np.sort(g[cell])
        assert vals[-2:].mean() > 4 * np.median(vals) + 10, k  # a bright dot over a dim cell
        assert (vals > 0.5 * vals[-1]).sum() <= 0.03 * len(vals) + 4, k  # ... and only a dot


@pytest.mark.parametrize("size", [96, 200, 512])
def test_other_sizes(size):
    f = make_field(np.random.default_rng(9), size, (0, 13))
    assert f.field.shape == (4, size, size) and f.field.dtype == np.uint8
    K = int(f.cell_mask.max())
    assert 4 <= K <= 40
    assert set(np.unique(f.nuclei_mask)) == set(range(K + 1))
    # the cell size scales with the field: mean cell area is a similar fraction of the field
    frac = np.bincount(f.cell_mask.ravel())[1:].mean() / size ** 2
    assert 0.005 < frac < 0.12


def _median_diameter(mask):
    areas = np.bincount(mask.ravel())[1:]
    return 2 * np.sqrt(np.median(areas[areas > 0]) / np.pi)


def test_cell_scale_changes_the_cells_not_the_field():
    """--cell-scale 0.5 on a twice larger field: cells as many pixels wide as at scale 1, four times as many."""
    d, n = {}, {}
    for size, c in ((256, 1.0), (512, 0.5), (256, 0.5)):
        fields = [make_field(np.random.default_rng([3, i]), size, (0, 13), cell_scale=c) for i in range(4)]
        assert all(f.field.shape == (4, size, size) and f.layout.scale == size / 256 * c for f in fields)
        d[size, c] = np.mean([_median_diameter(f.cell_mask) for f in fields])
        n[size, c] = np.mean([f.cell_mask.max() for f in fields])
    assert 0.8 < d[512, 0.5] / d[256, 1.0] < 1.25 and 2.8 < n[512, 0.5] / n[256, 1.0] < 5.5
    assert 0.4 < d[256, 0.5] / d[256, 1.0] < 0.6
    with pytest.raises(ValueError, match="cell_scale"):
        make_field(np.random.default_rng(0), 256, (0,), cell_scale=0.05)


def test_cell_scale_in_the_cli_and_the_meta(tmp_path):
    import json

    out = main([str(tmp_path / "half"), "--n-train", "1", "--n-test", "0", "--size", "128", "--cell-scale", "0.5"])
    assert json.loads((out / "gt" / "synth_meta.json").read_text())["cell_scale"] == 0.5
    one = generate_dataset(tmp_path / "one", 1, 0, size=128, progress=False)
    assert "cell_scale" not in json.loads((one / "gt" / "synth_meta.json").read_text())  # scale 1: as before
    assert read_mask(out / "gt" / "syn-train-00001_cellmask.png").max() > read_mask(
        one / "gt" / "syn-train-00001_cellmask.png").max()


# ----------------------------------------------------------------------------- labels
def test_assign_cell_labels_rules():
    rng = np.random.default_rng(0)
    sets, _ = LS.label_set_weights()
    for i in range(300):
        img = sets[int(rng.integers(len(sets)))]
        K = int(rng.integers(5, 20))
        mit = np.zeros(K, bool)
        if 11 in img:
            mit[rng.choice(K, size=int(rng.integers(1, 3)), replace=False)] = True
        cells = assign_cell_labels(rng, img, mit)
        assert image_label_from_cells(cells) == img
        for k, cl in enumerate(cells):
            assert cl == (NEGATIVE,) or (1 <= len(cl) <= 3 and set(cl) <= set(img)), (img, cl)
            if 11 in cl:
                assert mit[k]
            if mit[k] and cl != (NEGATIVE,):
                assert set(cl) - {11} <= MITOTIC_ALLOWED and not set(cl) & NUCLEAR_CLASSES
    # heterogeneity: over many fields, some have both positive and negative cells
    mixed = sum(1 for _ in range(50)
                if len({c == (NEGATIVE,) for c in assign_cell_labels(rng, (0, 16), np.zeros(12, bool))}) == 2)
    assert 10 <= mixed <= 45


def test_sample_label_sets_statistics():
    rng = np.random.default_rng(1)
    sets = sample_label_sets(rng, 500)
    y = np.zeros((500, 19))
    for i, s in enumerate(sets):
        y[i, list(s)] = 1
        assert 1 <= len(s) <= 4 and (s == (NEGATIVE,) or NEGATIVE not in s)
    assert y.sum(0).min() >= 1  # every class present in a 500-image set
    big = sample_label_sets(np.random.default_rng(2), 20000, ensure_all=False)
    yb = np.zeros((len(big), 19))
    for i, s in enumerate(big):
        yb[i, list(s)] = 1
    sp, p = LS.label_set_weights()
    expect = LS.expected_class_frequency(sp, p)
    assert np.allclose(yb.mean(0), expect, atol=0.012)
    assert abs(yb.mean(0)[0] - 0.394) < 0.015 and abs(yb.mean(0)[11] - 0.02) < 0.005


def test_label_stats_constants_are_consistent():
    co = np.array(LS.COOCCURRENCE)
    assert co.shape == (19, 19) and np.array_equal(co, co.T)
    assert np.allclose(np.diag(co) / LS.N_IMAGES, LS.CLASS_FREQUENCY, atol=1e-5)
    assert sum(LS.NUM_LABELS_COUNTS.values()) == LS.N_IMAGES
    assert sum(c for _, c in LS.LABEL_SETS) == LS.N_IMAGES - LS.NUM_LABELS_COUNTS.get(5, 0)
    assert co[NEGATIVE, :NEGATIVE].sum() == 0  # Negative never comes with another class
    assert min(LS.CLASS_BOOST) == 1 and LS.CLASS_BOOST[11] > 1 and LS.CLASS_BOOST[NEGATIVE] > 1


@needs(DATA / "hpa_train_labels_2021.csv")
def test_label_stats_match_the_real_csv():
    d = LS.derive_label_stats(DATA / "hpa_train_labels_2021.csv")
    assert d["n_images"] == LS.N_IMAGES
    assert np.allclose(d["class_frequency"], LS.CLASS_FREQUENCY)
    assert d["cooccurrence"] == [list(r) for r in LS.COOCCURRENCE]
    assert [(tuple(s), c) for s, c in d["label_sets"]] == [(tuple(s), c) for s, c in LS.LABEL_SETS]
    sets = [s for s, _ in LS.LABEL_SETS]
    boost = LS.fit_boost(sets, [c for _, c in LS.LABEL_SETS], 0.02)
    assert np.allclose(np.round(boost, 2), LS.CLASS_BOOST)


@pytest.mark.parametrize("c", [1, 3, 4, 6, 7, 8, 9, 10, 14, 15, 17])
def test_negative_cells_stay_dim_next_to_positive_ones(c):
    ratios = []
    for seed in range(8):
        f = make_field(np.random.default_rng([seed, c, 7]), SIZE, (c,))
        pos = _positive_cells(f, c)
        neg = [k for k, cl in enumerate(f.cell_labels, 1) if cl == (NEGATIVE,)]
        if neg:
            g = _green(f)
            top = [np.percentile(g[f.cell_mask == k], 99) for k in pos]
            ratios.append(np.mean([np.percentile(g[f.cell_mask == k], 99) for k in neg]) / np.mean(top))
        if len(ratios) == 2:
            break
    assert len(ratios) == 2 and max(ratios) < 0.35, ratios
