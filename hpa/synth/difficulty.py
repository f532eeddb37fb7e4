"""How hard a synthetic data set is: the knobs that separate the ``default`` and ``hard`` benchmarks.

The default benchmark is the project's long-standing one (byte for byte: every knob at its
default draws nothing extra). The ``hard`` benchmark adds what makes the real HPA task hard
and the default one lacks (docs/synth.md, "The hard benchmark"):

- a class is a family, not a template: each class appears in one of three variants per field
  (size and number of its structures, where in the cell they sit, patchiness);
- expression varies from cell to cell over more than 10x within a class, and some positive
  cells are barely brighter than a negative one;
- confusable classes are drawn closer to each other (nucleoplasm / nuclear speckles /
  nuclear bodies; cytosol / ER / mitochondria; vesicles / Golgi / centrosome);
- training image labels are imperfect: some images miss one of their cells' classes, a few
  carry a class no cell shows (the test split's truth stays exact);
- cell size varies between fields (0.5x to 1.5x), and fewer fields are homogeneous.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Difficulty", "DIFFICULTIES", "get_difficulty"]


@dataclass(frozen=True)
class Difficulty:
    """The knobs of a benchmark (defaults = the default benchmark)."""

    name: str = "default"
    homogeneous: float = 0.45  # share of fields whose interphase cells are all positive
    positive_frac: tuple[float, float] = (0.25, 0.85)  # other fields: share of positive cells, uniform in this range
    all_classes: float = 0.75  # homogeneous fields: share of cells that show all the image's classes (at most 3)
    cell_scale_range: tuple[float, float] = (1.0, 1.0)  # per-field cell size factor, log-uniform in this range
    expression_range: tuple[float, float] | None = None  # None: log-normal (sd 0.35); else log-uniform brightness range
    weak_frac: float = 0.0  # share of positive cells drawn at a brightness barely above a negative cell's
    weak_range: tuple[float, float] = (0.06, 0.12)  # their brightness factor
    variants: bool = False  # each class in one of three variants per field
    confusable: bool = False  # confusable classes drawn closer to each other
    drop_label: float = 0.0  # training images (with 2+ classes) whose label misses one of their cells' classes
    extra_label: float = 0.0  # training images whose label carries a class no cell shows

    @property
    def is_default(self) -> bool:
        return self == DIFFICULTIES["default"]


DIFFICULTIES: dict[str, Difficulty] = {
    "default": Difficulty(),
    "hard": Difficulty(name="hard", homogeneous=0.12, positive_frac=(0.2, 0.7), all_classes=0.25,
                       cell_scale_range=(0.5, 1.5), expression_range=(0.12, 1.6), weak_frac=0.12,
                       variants=True, confusable=True, drop_label=0.19, extra_label=0.03),
}


def get_difficulty(name: str) -> Difficulty:
    """The named difficulty; ValueError listing the valid names."""
    if name not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {name!r}; valid: {', '.join(DIFFICULTIES)}")
    return DIFFICULTIES[name]
