"""The documented confidence combination."""

import numpy as np
import pytest

from hpa.cells.combine import combine, quality_factor
from hpa.constants import NEGATIVE, NUM_CLASSES


def probs(**kw):
    p = np.zeros((1, NUM_CLASSES), np.float32)
    for k, v in kw.items():
        p[0, int(k[1:])] = v
    return p


def test_product_and_negative_max():
    img = probs(c0=0.8, c18=0.1)
    cell = probs(c0=0.5, c18=0.4)
    conf = combine(img, cell, "product", "max")
    assert conf[0, 0] == pytest.approx(0.4) and conf[0, NEGATIVE] == pytest.approx(0.4)


def test_mean_cell_image_and_min_complement():
    img = probs(c0=0.8, c3=0.2)
    cell = probs(c0=0.4, c3=0.6)
    assert combine(img, cell, "mean")[0, 0] == pytest.approx(0.6)
    assert combine(img, cell, "cell")[0, 3] == pytest.approx(0.6)
    assert combine(img, None, "image")[0, 3] == pytest.approx(0.2)
    conf = combine(img, cell, "product", "min_complement")
    assert conf[0, NEGATIVE] == pytest.approx(1 - 0.32)


def test_quality_factor_and_errors():
    q = quality_factor(np.array([1.0, 0.125, 1.0]), np.array([False, False, True]))
    assert q.tolist() == pytest.approx([1.0, 0.5, 0.8])
    conf = combine(probs(c0=1.0), probs(c0=1.0), quality=q[1:2])
    assert conf[0, 0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="valid: product"):
        combine(probs(), probs(), "average")
    with pytest.raises(ValueError, match="needs cell probabilities"):
        combine(probs(), None, "product")
