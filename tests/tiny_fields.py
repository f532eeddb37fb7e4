"""A tiny Kaggle-layout data set for the training tests: a few 64-px four-channel fields.

Classes 0-3 each draw their own pattern into the green channel (square, stripes, dots,
ring), so a model can learn them in a few steps; labels are the drawn classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hpa.io.fields import write_field

PATTERN_CLASSES = (0, 1, 2, 3)


def tiny_field(rng: np.random.Generator, classes, size: int = 64) -> np.ndarray:
    """uint8 (4, size, size): noise in every channel plus one green pattern per class."""
    f = rng.integers(0, 40, (4, size, size)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size] / size
    g = f[1]
    for c in classes:
        if c == 0:
            g += 150 * ((abs(yy - 0.5) < 0.2) & (abs(xx - 0.5) < 0.2))
        elif c == 1:
            g += 120 * ((np.floor(xx * 16) % 2) == 0)
        elif c == 2:
            g += 200 * ((np.floor(yy * 8) % 2 == 0) & (np.floor(xx * 8) % 2 == 0))
        elif c == 3:
            g += 150 * (abs(np.hypot(yy - 0.5, xx - 0.5) - 0.3) < 0.06)
    f[2] += 100 * (np.hypot(yy - 0.3, xx - 0.3) < 0.1)  # a "nucleus"
    return np.clip(f, 0, 255).astype(np.uint8)


def make_tiny_dataset(root: str | Path, n: int = 12, size: int = 64, seed: int = 0) -> Path:
    """Write ``root/train.csv`` and ``root/train/{ID}_{red,green,blue,yellow}.png``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = 1 + i % 2
        classes = sorted(rng.choice(PATTERN_CLASSES, size=k, replace=False).tolist())
        if i < len(PATTERN_CLASSES):  # every class appears
            classes = sorted({i, *classes[:1]})
        image_id = f"img{i:03d}"
        write_field(root / "train", image_id, tiny_field(rng, classes, size))
        rows.append({"ID": image_id, "Label": "|".join(map(str, classes))})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root
