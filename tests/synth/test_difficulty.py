"""The hard benchmark (hpa.synth.difficulty): what it changes, measured on generated fields."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from hpa.constants import NEGATIVE
from hpa.synth.cells import make_layout
from hpa.synth.difficulty import DIFFICULTIES, get_difficulty
from hpa.synth.generate import generate_dataset, make_field
from hpa.synth.labels import noisy_label
from hpa.synth.render import compute_maps, variant_pattern

HARD = DIFFICULTIES["hard"]


def _labels(text: str) -> set[int]:
    return {int(c) for c in str(text).split("|")}


def test_the_default_difficulty_draws_nothing_new():
    """Every knob at its default: the same bytes as a call without a difficulty, and no extra draws."""
    a = make_field(np.random.default_rng(4), 128, (0, 16))
    b = make_field(np.random.default_rng(4), 128, (0, 16), difficulty=DIFFICULTIES["default"])
    assert np.array_equal(a.field, b.field) and np.array_equal(a.cell_mask, b.cell_mask)
    rng = np.random.default_rng(1)
    before = rng.bit_generator.state
    assert noisy_label(rng, (0, 16), DIFFICULTIES["default"]) == (0, 16) and rng.bit_generator.state == before
    with pytest.raises(ValueError, match="unknown difficulty 'extreme'; valid: default, hard"):
        get_difficulty("extreme")


def test_hard_training_labels_are_imperfect_and_the_truth_is_kept(tmp_path):
    out = generate_dataset(tmp_path / "hard", 80, 8, size=128, seed=2, difficulty="hard", progress=False)
    given = pd.read_csv(out / "train.csv", dtype=str).set_index("ID")["Label"]
    truth = pd.read_csv(out / "gt" / "image_labels.csv", dtype=str).set_index("ID")
    cells = pd.read_csv(out / "gt" / "cell_labels.csv", dtype=str)
    noise = pd.read_csv(out / "gt" / "label_noise.csv", dtype=str).set_index("ID")
    shown = {i: set().union(*map(_labels, g["Label"])) - {NEGATIVE} or {NEGATIVE} for i, g in cells.groupby("ID")}
    assert all(_labels(truth.loc[i, "Label"]) == shown[i] for i in truth.index)  # the truth is the cells' union
    differ = [i for i in given.index if _labels(given[i]) != _labels(truth.loc[i, "Label"])]
    assert sorted(differ) == sorted(noise.index)  # label_noise.csv lists every difference, nothing else
    assert 3 <= len(differ) <= 20  # about 10% drops and 3% extras of 80 training images
    for i in differ:
        g, t = _labels(given[i]), _labels(truth.loc[i, "Label"])
        assert len(t - g) <= 1 and len(g - t) <= 1 and (g - t).isdisjoint({11, NEGATIVE})
    assert (noise["true"] != noise["given"]).all()
    assert not set(truth.index[truth["split"] == "test"]) & set(noise.index)  # the test split's labels are exact


def test_hard_cells_vary_in_size_between_fields():
    medians = [np.median(np.bincount(make_field(np.random.default_rng(s), 128, (0,), difficulty=HARD)
                                     .cell_mask.ravel())[1:]) for s in range(8)]
    assert max(medians) / min(medians) > 2.5  # cell scale 0.5-1.5x: areas over more than 2.5x


def test_hard_expression_spans_ten_times_and_some_positives_are_barely_above_negatives():
    pos, neg = [], []
    for seed in range(6):
        f = make_field(np.random.default_rng(seed), 128, (16,), difficulty=HARD)
        green = f.field[1].astype(float)
        for k, labels in enumerate(f.cell_labels, start=1):
            (pos if 16 in labels else neg).append(green[f.cell_mask == k].mean())
    above = np.array(pos) - np.median(neg)  # the pattern's brightness over the nonspecific staining
    assert np.percentile(above, 95) / max(np.percentile(above, 5), 1e-6) > 10
    assert np.percentile(pos, 5) < np.percentile(neg, 95)  # the weakest positives overlap the brightest negatives


def test_variants_move_the_pattern_within_the_cell():
    lay = make_layout(np.random.default_rng(3), 256)
    m = compute_maps(lay)
    amp = np.ones(lay.n_cells + 1, np.float32)
    amp[0] = 0
    ctx = {"confusable": False, "er": np.zeros_like(m.t), "mt": np.zeros_like(m.t), "spindle": np.zeros_like(m.t)}

    def centre(c, v, where):
        p = variant_pattern(np.random.default_rng(0), m, c, v, amp, ctx)
        return float((p * where).sum() / p.sum())

    # nuclear bodies: variant 1 towards the middle of the nucleus, variant 2 towards its edge
    assert centre(5, 1, m.dome) > centre(5, 0, m.dome) + 0.05 > centre(5, 2, m.dome) + 0.1
    # vesicles: variant 1 perinuclear (lower t, 0 at the nucleus .. 1 at the membrane)
    assert centre(17, 1, m.t) < centre(17, 0, m.t) - 0.05
    # size: variant 1 draws fewer, larger vesicles than variant 0, variant 2 more and smaller ones
    spots = {}
    for v in range(3):
        p = variant_pattern(np.random.default_rng(0), m, 17, v, amp, ctx)
        lab, n = ndimage.label(p > 0.3 * np.percentile(p[p > 0], 99))
        spots[v] = (n, (lab > 0).sum() / n)  # number of spots, mean area in pixels
    assert spots[1][0] < 0.7 * spots[0][0] and spots[1][1] > 1.5 * spots[0][1]
    assert spots[2][0] > spots[0][0] and spots[2][1] < 0.7 * spots[0][1]
