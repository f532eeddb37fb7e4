"""The ranking output's rule (hpa.cells.combine product_max), by hand."""

import numpy as np
import pytest

from hpa.cells.combine import combine, image_max


def test_image_max_over_the_cells_of_each_image():
    v = np.array([[0.1, 0.9], [0.5, 0.2], [0.3, 0.4], [0.7, 0.0]])
    np.testing.assert_array_equal(image_max(v, ["A", "B", "A", "B"]), [[0.3, 0.9], [0.7, 0.2], [0.3, 0.9], [0.7, 0.2]])
    assert image_max(np.zeros((0, 19)), []).shape == (0, 19)


def test_product_max_by_hand():
    p = np.zeros((3, 19), np.float32)
    q = np.zeros((3, 19), np.float32)
    p[:, :2] = [[0.8, 0.1], [0.2, 0.6], [0.4, 0.3]]  # cells A1, A2, B1
    q[:, :2] = [[0.5, 0.9], [0.5, 0.9], [1.0, 0.2]]
    p[:, 18], q[:, 18] = [0.1, 0.2, 0.3], [0.25, 0.25, 0.05]
    conf = combine(q, p, "product_max", "max", None, np.array(["A", "A", "B"]))
    # the image's highest cell probability: A (0.8, 0.6), B (0.4, 0.3)
    np.testing.assert_allclose(conf[:, :2], [[0.8 * 0.5 * 0.8, 0.1 * 0.9 * 0.6], [0.2 * 0.5 * 0.8, 0.6 * 0.9 * 0.6],
                                             [0.4 * 1.0 * 0.4, 0.3 * 0.2 * 0.3]], rtol=1e-6)
    np.testing.assert_allclose(conf[:, 18], [0.25, 0.25, 0.3])  # Negative: max of cell and image
    assert (conf[:, 2:18] == 0).all()
    with pytest.raises(ValueError, match="'product_max' needs the image ID of each of the 3 cells"):
        combine(q, p, "product_max", "max")
