"""Image label sets and single-cell labels of the synthetic benchmark.

Image label sets are drawn from the real HPA 2021 label-set distribution
(:mod:`hpa.synth.label_stats`, rare classes boosted). Cells then get labels under the HPA
convention: the image label is the union of its cells' labels without Negative (18), and
an image is labelled 18 only when no cell shows any pattern.
"""

from __future__ import annotations

import numpy as np

from hpa.constants import NEGATIVE, NUM_CLASSES
from hpa.synth.difficulty import DIFFICULTIES, Difficulty
from hpa.synth.label_stats import label_set_weights
from hpa.synth.render import MITOTIC_ALLOWED

__all__ = ["sample_label_sets", "n_mitotic_for", "assign_cell_labels", "image_label_from_cells", "noisy_label",
           "SPINDLE"]

SPINDLE = 11


def sample_label_sets(rng: np.random.Generator, n: int, ensure_all: bool = True) -> list[tuple[int, ...]]:
    """Draw ``n`` image label sets (sorted tuples of 1-4 classes, or ``(18,)``).

    With ``ensure_all`` and ``n >= 38``, any class missing from the draw is put in by
    replacing the set of an image none of whose classes would then go missing, with a set
    drawn from the sets that contain the class; so every class is present in such a split.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    sets, p = label_set_weights()
    draw = [sets[i] for i in rng.choice(len(sets), size=n, p=p)]
    if ensure_all and n >= 2 * NUM_CLASSES:
        for c in range(NUM_CLASSES):
            counts = np.zeros(NUM_CLASSES, int)
            for s in draw:
                counts[list(s)] += 1
            if counts[c]:
                continue
            with_c = [i for i, s in enumerate(sets) if c in s]
            pc = p[with_c] / p[with_c].sum()
            new = sets[with_c[int(rng.choice(len(with_c), p=pc))]]
            free = [i for i, s in enumerate(draw) if all(counts[x] >= 2 for x in s)]
            draw[free[int(rng.integers(len(free)))]] = new
    return draw


def n_mitotic_for(rng: np.random.Generator, image_labels: tuple[int, ...]) -> int:
    """How many rounded mitotic cells a field gets: 1-2 when it is labelled 11, else usually 0."""
    if SPINDLE in image_labels:
        return 1 + int(rng.random() < 0.35)
    return int(rng.random() < 0.12)


def assign_cell_labels(rng: np.random.Generator, image_labels: tuple[int, ...], mitotic: np.ndarray,
                       difficulty: Difficulty = DIFFICULTIES["default"]) -> list[tuple[int, ...]]:
    """Give every cell of a field its classes.

    Args:
        image_labels: the field's sorted label set (1-4 classes of 0..17, or ``(18,)``).
        mitotic: bool (K,) which cells are mitotic (at least one when 11 is in the set).

    Returns:
        K sorted tuples; a positive cell has 1-3 of the image's classes, a negative one ``(18,)``.
        Mitotic cells show 11 when the image has it (plus maybe one class of
        :data:`~hpa.synth.render.MITOTIC_ALLOWED`), interphase cells never show 11. Every image
        class is shown by at least one cell. A share ``difficulty.homogeneous`` of fields is
        homogeneous (every interphase cell positive; default 45%); in the others a share of the
        cells drawn from ``difficulty.positive_frac`` is positive (default 25-85%).
    """
    mitotic = np.asarray(mitotic, bool)
    K = len(mitotic)
    labels = [(NEGATIVE,)] * K
    img = tuple(sorted(set(image_labels)))
    if img == (NEGATIVE,):
        return labels
    if NEGATIVE in img or not 1 <= len(img) <= 4:
        raise ValueError(f"image label set must be 1-4 classes of 0..17 or (18,), got {image_labels}")
    inter_classes = [c for c in img if c != SPINDLE]
    inter = np.flatnonzero(~mitotic)
    mit = np.flatnonzero(mitotic)
    if SPINDLE in img and len(mit) == 0:
        raise ValueError("image labelled 11 (mitotic spindle) needs at least one mitotic cell")
    if len(inter) < len(inter_classes):
        raise ValueError(f"{len(inter)} interphase cells cannot show the {len(inter_classes)} classes {inter_classes}")

    # mitotic cells
    mit_extra = [c for c in inter_classes if c in MITOTIC_ALLOWED]
    for k in mit:
        if SPINDLE in img:
            cl = {SPINDLE}
            if mit_extra and rng.random() < 0.4:
                cl.add(mit_extra[int(rng.integers(len(mit_extra)))])
            labels[k] = tuple(sorted(cl))
        elif mit_extra and rng.random() < 0.5:
            labels[k] = (mit_extra[int(rng.integers(len(mit_extra)))],)

    if not inter_classes:
        return labels
    homogeneous = rng.random() < difficulty.homogeneous
    frac = 1.0 if homogeneous else rng.uniform(*difficulty.positive_frac)
    order = rng.permutation(inter)
    n_cls = len(inter_classes)
    for j, k in enumerate(order):
        if j < n_cls:  # guaranteed carriers: one cell per class first
            must = inter_classes[j]
        elif rng.random() < frac:
            must = inter_classes[int(rng.integers(n_cls))]
        else:
            continue
        others = [c for c in inter_classes if c != must]
        if homogeneous and rng.random() < difficulty.all_classes:
            size = min(3, n_cls)  # most cells show all the image's classes
        else:
            size = min(3, n_cls, 1 + int(rng.binomial(n_cls - 1, 0.5)))
        extra = list(rng.choice(others, size=size - 1, replace=False)) if size > 1 else []
        labels[k] = tuple(sorted({must, *map(int, extra)}))
    return labels


def image_label_from_cells(cell_labels: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The HPA image label: union of the cells' classes without 18; ``(18,)`` if that is empty."""
    u = sorted({c for cl in cell_labels for c in cl if c != NEGATIVE})
    return tuple(u) if u else (NEGATIVE,)


def noisy_label(rng: np.random.Generator, image_labels: tuple[int, ...], difficulty: Difficulty) -> tuple[int, ...]:
    """The label an annotator gave a training image: its true label, except that with probability
    ``difficulty.drop_label`` an image with 2+ classes loses one of them, and with probability
    ``difficulty.extra_label`` an image gains a class none of its cells shows (never 11 or 18).
    Draws nothing at the default difficulty."""
    if difficulty.drop_label == 0 and difficulty.extra_label == 0:
        return image_labels
    out = set(image_labels)
    if len(out) >= 2 and rng.random() < difficulty.drop_label:
        out.discard(sorted(out)[int(rng.integers(len(out)))])
    if rng.random() < difficulty.extra_label:
        pool = [c for c in range(NEGATIVE) if c != SPINDLE and c not in out]
        out.add(pool[int(rng.integers(len(pool)))])
        out.discard(NEGATIVE)
    return tuple(sorted(out))
