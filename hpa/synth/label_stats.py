"""Image-label statistics of the real HPA 2021 training set, stored as constants.

The synthetic benchmark (:mod:`hpa.synth`) draws each image's label set from these
numbers so that class frequencies, the number of classes per image and which classes
go together look like the real competition data.

How the numbers were derived (once, by a maintainer; the CSV is never read at run time):
``derive_label_stats("/work/shared/data/hpa_train_labels_2021.csv")`` on the 21,806 rows
of the Kaggle "HPA Single Cell Classification" 2021 ``train.csv`` (``ID,Label``). Each
Label was split on ``|`` into a set of classes; then

- :data:`N_IMAGES` is the number of rows;
- :data:`CLASS_FREQUENCY` ``[c]`` = share of images whose set contains class c;
- :data:`NUM_LABELS_COUNTS` ``[k]`` = number of images with k classes;
- :data:`COOCCURRENCE` ``[a][b]`` = number of images containing both a and b (diagonal: class counts);
- :data:`LABEL_SETS` = every distinct label set with at most 4 classes and its image count,
  most frequent first (the 2 images with 5 classes were left out, so every synthetic image
  has 1 to 4 classes).

:data:`CLASS_BOOST` is not data but a choice: the very rare classes 11 (mitotic spindle,
0.36% of images), 15 (aggresome, 1.16%) and 18 (negative, 0.16%) would hardly appear in a
500-image synthetic set. A label set's sampling weight is its count times the largest boost
of its classes; the boosts were found by :func:`fit_boost` (``target=0.02``) so that every
class is in at least 2% of sampled images (about 10 images in 500): x5.85 for 11, x1.81 for
15, x13.4 for 18. All other classes keep boost 1; their frequencies drop by about 2.5%
relative (e.g. nucleoplasm 40.3% -> 39.4%, cytosol 26.1% -> 25.8%).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = [
    "N_IMAGES", "CLASS_FREQUENCY", "NUM_LABELS_COUNTS", "COOCCURRENCE", "LABEL_SETS", "CLASS_BOOST",
    "label_set_weights", "expected_class_frequency", "derive_label_stats", "fit_boost",
]


def derive_label_stats(csv_path: str | os.PathLike, max_labels: int = 4) -> dict:
    """Recompute the constants of this module from a Kaggle ``train.csv`` (``ID,Label``).

    Returns a dict with keys ``n_images`` (int), ``class_frequency`` (19 floats in [0, 1]),
    ``num_labels_counts`` ({k: count}), ``cooccurrence`` (19 x 19 int list) and
    ``label_sets`` (list of (sorted class tuple, count), at most ``max_labels`` classes,
    most frequent first, ties by the tuple). Maintainer tool: nothing calls it at run time.
    """
    import pandas as pd

    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if not {"ID", "Label"} <= set(df.columns):
        raise ValueError(f"{csv_path}: expected columns ID,Label; found {list(df.columns)}")
    sets = [tuple(sorted({int(x) for x in s.split("|")})) for s in df["Label"]]
    y = np.zeros((len(sets), 19), np.int64)
    for i, s in enumerate(sets):
        y[i, list(s)] = 1
    counts: dict[tuple[int, ...], int] = {}
    for s in sets:
        if len(s) <= max_labels:
            counts[s] = counts.get(s, 0) + 1
    k = y.sum(1)
    return {
        "n_images": len(sets),
        "class_frequency": [round(float(v), 5) for v in y.mean(0)],
        "num_labels_counts": {int(n): int((k == n).sum()) for n in sorted(set(k.tolist()))},
        "cooccurrence": (y.T @ y).tolist(),
        "label_sets": sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])),
    }


def expected_class_frequency(label_sets, weights) -> np.ndarray:
    """Share of images containing each class when sets are drawn with ``weights``: float (19,)."""
    m = np.zeros((len(label_sets), 19))
    for i, s in enumerate(label_sets):
        m[i, list(s)] = 1
    w = np.asarray(weights, float)
    return (w @ m) / w.sum()


def _weights(label_sets, counts, boost) -> np.ndarray:
    return np.array([c * max(boost[k] for k in s) for s, c in zip(label_sets, counts)], float)


def fit_boost(label_sets, counts, target: float = 0.015, iters: int = 60) -> np.ndarray:
    """Per-class boost factors (>= 1, float (19,)) so every class reaches ``target`` frequency.

    A set's weight is its count times the largest boost among its classes; boosts of classes
    below ``target`` are raised multiplicatively until they reach it.
    """
    boost = np.ones(19)
    for _ in range(iters):
        f = expected_class_frequency(label_sets, _weights(label_sets, counts, boost))
        boost = np.maximum(1.0, boost * np.maximum(1.0, target / np.maximum(f, 1e-9)) ** 0.5)
    return boost


def label_set_weights() -> tuple[list[tuple[int, ...]], np.ndarray]:
    """The label sets and their normalised sampling probabilities (float64, sums to 1)."""
    sets = [s for s, _ in LABEL_SETS]
    w = _weights(sets, [c for _, c in LABEL_SETS], CLASS_BOOST)
    return sets, w / w.sum()


# ----------------------------------------------------------------------------- constants
# Written by derive_label_stats() + fit_boost() on hpa_train_labels_2021.csv; do not edit by hand.
N_IMAGES = 21806
#: Share of real images containing each class (index = class).
CLASS_FREQUENCY = (
    0.40342, 0.05022, 0.1124, 0.05787, 0.06535, 0.08218, 0.03554, 0.08466, 0.04421, 0.04577,
    0.03751, 0.00358, 0.07952, 0.14267, 0.09231, 0.01156, 0.26071, 0.02719, 0.00156,
)
#: Number of real images with k classes.
NUM_LABELS_COUNTS = {1: 10508, 2: 8873, 3: 2233, 4: 190, 5: 2}
#: Images containing both classes a and b (diagonal: images containing a).
COOCCURRENCE = (
    (8797,  534, 1127,  449,   65,  639,   62,  748,  236,  312,  165,   30,  688, 1078,  559,   64, 2410,  180,    0),
    ( 534, 1095,  129,   16,   31,   44,   21,   42,   14,   21,    4,    0,   30,   77,   36,    0,  203,    3,    0),
    (1127,  129, 2451,    3,   29,   50,   62,  133,   64,   33,   56,    0,   63,  226,  158,    9,  565,   19,    0),
    ( 449,   16,    3, 1262,   14,   13,   24,   34,   14,   12,   19,    0,   21,   33,   49,    3,  218,   14,    0),
    (  65,   31,   29,   14, 1425,   10,    2,   37,   15,   33,   16,    0,   27,  142,   34,    5,  266,   15,    0),
    ( 639,   44,   50,   13,   10, 1792,    8,   71,   22,   29,   13,    2,   35,   97,   38,   29,  394,   12,    0),
    (  62,   21,   62,   24,    2,    8,  775,   20,    0,    4,    2,    0,   10,   33,    3,    0,  123,    6,    0),
    ( 748,   42,  133,   34,   37,   71,   20, 1846,    5,   27,    9,    0,   32,   97,    7,    2,  243,    3,    0),
    ( 236,   14,   64,   14,   15,   22,    0,    5,  964,   12,    7,    0,   23,   25,    3,   16,  127,    1,    0),
    ( 312,   21,   33,   12,   33,   29,    4,   27,   12,  998,   11,    0,   42,  207,   20,    0,  241,    9,    0),
    ( 165,    4,   56,   19,   16,   13,    2,    9,    7,   11,  818,   22,   20,   34,    2,    0,  132,    2,    0),
    (  30,    0,    0,    0,    0,    2,    0,    0,    0,    0,   22,   78,    9,   12,    2,    0,   31,    0,    0),
    ( 688,   30,   63,   21,   27,   35,   10,   32,   23,   42,   20,    9, 1734,  113,   45,   11,  393,    6,    0),
    (1078,   77,  226,   33,  142,   97,   33,   97,   25,  207,   34,   12,  113, 3111,   77,   11,  811,   26,    0),
    ( 559,   36,  158,   49,   34,   38,    3,    7,    3,   20,    2,    2,   45,   77, 2013,    4,  157,   16,    0),
    (  64,    0,    9,    3,    5,   29,    0,    2,   16,    0,    0,    0,   11,   11,    4,  252,   48,    0,    0),
    (2410,  203,  565,  218,  266,  394,  123,  243,  127,  241,  132,   31,  393,  811,  157,   48, 5685,   71,    0),
    ( 180,    3,   19,   14,   15,   12,    6,    3,    1,    9,    2,    0,    6,   26,   16,    0,   71,  593,    0),
    (   0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,   34),
)
#: Sampling boost per class (see module docstring); 1 = real frequency.
CLASS_BOOST = (
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 5.85, 1, 1, 1, 1.81, 1, 1, 13.42,
)
#: Every real label set with <= 4 classes and its image count (371 sets, 21804 images).
LABEL_SETS = (
    ((0,), 1551), ((0, 16), 1278), ((14,), 1054), ((16,), 906), ((13,), 880), ((4,), 788), ((7,), 719), ((5,), 636),
    ((0, 2), 596), ((0, 13), 588), ((12,), 561), ((3,), 549), ((8,), 529), ((2,), 515), ((0, 7), 481), ((6,), 476),
    ((0, 12), 414), ((10,), 404), ((0, 5), 383), ((0, 14), 378), ((13, 16), 365), ((0, 1), 305), ((17,), 302),
    ((9,), 300), ((0, 3), 286), ((5, 16), 238), ((2, 16), 225), ((1,), 221), ((4, 16), 211), ((0, 13, 16), 188),
    ((12, 16), 188), ((0, 2, 16), 157), ((0, 8), 136), ((0, 12, 16), 135), ((0, 9), 132), ((0, 17), 113),
    ((0, 10), 103), ((9, 13), 99), ((9, 16), 99), ((0, 5, 16), 98), ((3, 16), 98), ((4, 13), 93), ((14, 16), 91),
    ((7, 16), 88), ((0, 7, 16), 87), ((10, 16), 87), ((1, 16), 85), ((15,), 82), ((2, 13), 78), ((2, 14), 78),
    ((0, 3, 16), 76), ((0, 1, 16), 70), ((6, 16), 61), ((8, 16), 59), ((0, 2, 13), 55), ((0, 2, 7), 54), ((1, 2), 53),
    ((0, 4), 51), ((0, 1, 2), 50), ((0, 9, 16), 50), ((2, 7), 46), ((0, 2, 14), 45), ((16, 17), 43),
    ((9, 13, 16), 42), ((5, 13), 38), ((7, 13), 38), ((0, 15), 37), ((0, 14, 16), 36), ((5, 7), 36), ((12, 13), 35),
    ((15, 16), 35), ((0, 6), 34), ((4, 14), 34), ((18,), 34), ((0, 5, 13), 32), ((2, 6, 16), 31), ((2, 10), 31),
    ((12, 14), 30), ((0, 8, 16), 29), ((0, 9, 13), 29), ((3, 14), 29), ((0, 10, 16), 25), ((1, 4), 25), ((2, 8), 25),
    ((2, 12), 25), ((6, 13), 25), ((0, 2, 13, 16), 24), ((0, 5, 7), 24), ((0, 12, 13), 24), ((2, 13, 16), 24),
    ((0, 7, 13), 23), ((1, 14), 23), ((2, 6), 23), ((5, 15), 23), ((3, 7), 22), ((4, 13, 16), 22), ((5, 14), 22),
    ((13, 14), 22), ((1, 6), 21), ((0, 2, 5), 20), ((2, 4), 20), ((2, 13, 14), 20), ((9, 12), 20), ((4, 7), 19),
    ((7, 12), 19), ((12, 13, 16), 19), ((1, 13), 18), ((4, 9), 18), ((6, 7), 18), ((0, 2, 8, 16), 17),
    ((0, 11, 16), 17), ((3, 6), 17), ((5, 12), 17), ((4, 10), 16), ((8, 15), 16), ((0, 1, 13), 15), ((0, 2, 8), 15),
    ((0, 2, 10), 15), ((0, 2, 12), 15), ((0, 7, 9), 15), ((0, 13, 14), 15), ((10, 13), 15), ((0, 3, 14), 14),
    ((0, 14, 17), 14), ((0, 16, 17), 14), ((1, 5), 14), ((1, 13, 16), 14), ((2, 5, 16), 14), ((3, 13), 14),
    ((8, 13), 14), ((11, 16), 14), ((0, 1, 12), 13), ((0, 6, 16), 13), ((4, 17), 13), ((10, 12), 13), ((0, 1, 9), 12),
    ((0, 8, 12), 12), ((0, 9, 13, 16), 12), ((0, 13, 17), 12), ((5, 8), 12), ((5, 9), 12), ((5, 10), 12),
    ((5, 13, 16), 12), ((0, 5, 14), 11), ((0, 9, 14), 11), ((2, 5), 11), ((4, 8), 11), ((4, 12), 11),
    ((7, 13, 16), 11), ((0, 1, 14), 10), ((0, 2, 9), 10), ((0, 3, 10), 10), ((0, 3, 12), 10), ((0, 15, 16), 10),
    ((2, 7, 16), 10), ((2, 14, 16), 10), ((2, 17), 10), ((9, 10), 10), ((9, 12, 16), 10), ((10, 11), 10),
    ((12, 15), 10), ((13, 16, 17), 10), ((0, 3, 7), 9), ((0, 5, 8), 9), ((0, 5, 12), 9), ((1, 7), 9), ((1, 12), 9),
    ((3, 10), 9), ((3, 13, 16), 9), ((3, 17), 9), ((6, 12), 9), ((8, 9), 9), ((0, 1, 7, 16), 8), ((0, 1, 8), 8),
    ((0, 2, 17), 8), ((0, 5, 9), 8), ((1, 2, 16), 8), ((1, 3), 8), ((2, 10, 16), 8), ((4, 9, 13), 8),
    ((4, 12, 13), 8), ((8, 13, 16), 8), ((10, 13, 16), 8), ((13, 14, 16), 8), ((0, 1, 5), 7), ((0, 2, 15), 7),
    ((0, 3, 8), 7), ((0, 5, 9, 17), 7), ((0, 7, 13, 16), 7), ((0, 9, 12), 7), ((0, 11), 7), ((3, 9), 7),
    ((4, 7, 16), 7), ((5, 12, 16), 7), ((8, 12), 7), ((11, 13), 7), ((0, 1, 2, 7), 6), ((0, 2, 9, 16), 6),
    ((0, 5, 15), 6), ((0, 12, 13, 14), 6), ((1, 5, 7), 6), ((1, 5, 13), 6), ((1, 8), 6), ((2, 8, 16), 6),
    ((2, 12, 13), 6), ((5, 6), 6), ((6, 17), 6), ((11, 12), 6), ((0, 1, 3), 5), ((0, 1, 7), 5), ((0, 1, 7, 13), 5),
    ((0, 2, 12, 13), 5), ((0, 3, 5, 16), 5), ((0, 3, 6, 16), 5), ((0, 4, 5), 5), ((0, 4, 13), 5), ((0, 7, 12, 16), 5),
    ((0, 12, 13, 16), 5), ((0, 12, 14), 5), ((1, 5, 16), 5), ((1, 9, 13), 5), ((2, 4, 7), 5), ((2, 9, 16), 5),
    ((3, 4, 16), 5), ((3, 8), 5), ((4, 5), 5), ((4, 15), 5), ((10, 11, 13), 5), ((13, 15), 5), ((0, 2, 6), 4),
    ((0, 2, 12, 16), 4), ((0, 3, 13), 4), ((0, 5, 13, 16), 4), ((0, 7, 9, 16), 4), ((0, 7, 14), 4), ((0, 10, 11), 4),
    ((0, 10, 13), 4), ((0, 12, 17), 4), ((1, 4, 16), 4), ((2, 9), 4), ((3, 4), 4), ((3, 5), 4), ((3, 12), 4),
    ((3, 14, 16), 4), ((4, 9, 16), 4), ((4, 12, 16), 4), ((6, 13, 16), 4), ((7, 9), 4), ((7, 10), 4), ((9, 14), 4),
    ((0, 1, 3, 13), 3), ((0, 2, 3), 3), ((0, 2, 7, 16), 3), ((0, 6, 13, 16), 3), ((0, 7, 12), 3), ((0, 13, 15), 3),
    ((1, 17), 3), ((2, 4, 16), 3), ((2, 7, 12), 3), ((2, 9, 13), 3), ((3, 15), 3), ((4, 7, 13), 3), ((5, 7, 16), 3),
    ((6, 9), 3), ((6, 14), 3), ((7, 8, 10), 3), ((7, 14), 3), ((8, 10, 16), 3), ((10, 11, 12), 3), ((13, 17), 3),
    ((14, 15), 3), ((0, 1, 2, 9), 2), ((0, 1, 5, 12), 2), ((0, 1, 10), 2), ((0, 2, 7, 13), 2), ((0, 3, 5, 17), 2),
    ((0, 3, 9, 16), 2), ((0, 3, 12, 16), 2), ((0, 3, 17), 2), ((0, 4, 8), 2), ((0, 4, 16), 2), ((0, 9, 12, 16), 2),
    ((0, 10, 12), 2), ((0, 11, 14), 2), ((1, 2, 5, 13), 2), ((1, 2, 12), 2), ((1, 2, 13), 2), ((1, 2, 13, 16), 2),
    ((1, 4, 7), 2), ((1, 10), 2), ((1, 12, 13, 16), 2), ((2, 6, 10), 2), ((2, 7, 13, 16), 2), ((2, 9, 14), 2),
    ((2, 12, 16), 2), ((2, 15), 2), ((3, 4, 9, 12), 2), ((3, 4, 13, 16), 2), ((3, 6, 16), 2), ((3, 8, 16), 2),
    ((3, 12, 16), 2), ((4, 6), 2), ((4, 8, 12), 2), ((5, 11), 2), ((5, 14, 16), 2), ((5, 17), 2), ((6, 7, 16), 2),
    ((7, 8), 2), ((7, 9, 16), 2), ((7, 17), 2), ((9, 17), 2), ((10, 14), 2), ((10, 17), 2), ((12, 13, 14), 2),
    ((12, 16, 17), 2), ((13, 15, 16), 2), ((0, 1, 2, 14), 1), ((0, 1, 5, 13), 1), ((0, 1, 5, 16), 1),
    ((0, 1, 9, 13), 1), ((0, 1, 12, 16), 1), ((0, 1, 14, 16), 1), ((0, 2, 5, 14), 1), ((0, 2, 6, 16), 1),
    ((0, 2, 14, 16), 1), ((0, 3, 7, 12), 1), ((0, 3, 13, 17), 1), ((0, 5, 6), 1), ((0, 5, 17), 1), ((0, 6, 12), 1),
    ((0, 7, 9, 13), 1), ((0, 7, 17), 1), ((0, 8, 17), 1), ((0, 9, 13, 14), 1), ((0, 12, 14, 15), 1),
    ((1, 2, 7, 16), 1), ((1, 9), 1), ((1, 12, 16), 1), ((1, 13, 14), 1), ((2, 4, 17), 1), ((2, 5, 6, 16), 1),
    ((2, 5, 9), 1), ((2, 7, 13), 1), ((2, 8, 12), 1), ((3, 4, 7), 1), ((3, 7, 16), 1), ((3, 9, 16), 1),
    ((4, 9, 13, 16), 1), ((4, 16, 17), 1), ((5, 7, 10, 16), 1), ((5, 7, 13), 1), ((5, 8, 16), 1), ((5, 9, 13), 1),
    ((6, 9, 13), 1), ((7, 9, 13), 1), ((7, 10, 12, 13), 1), ((7, 13, 15, 16), 1), ((7, 15), 1), ((8, 9, 13), 1),
    ((8, 9, 14), 1), ((8, 9, 16), 1), ((8, 10, 13), 1), ((8, 12, 16), 1), ((8, 13, 14), 1), ((8, 14), 1),
    ((9, 10, 12), 1), ((9, 13, 14), 1), ((11,), 1), ((12, 14, 16), 1), ((14, 16, 17), 1), ((14, 17), 1),
)
