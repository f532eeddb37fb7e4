"""Synthetic HPA-like benchmark with single-cell ground truth.

``python -m hpa.synth OUT --n-train 400 --n-test 300 --size 256 --seed 0 [--cell-scale 1] [--workers 2]`` writes
a data set in the Kaggle "HPA Single Cell Classification" layout::

    OUT/train.csv                       ID,Label (classes joined by '|')
    OUT/train/{ID}_{red,green,blue,yellow}.png   8-bit channels
    OUT/test.csv                        ID
    OUT/test/{ID}_*.png
    OUT/sample_submission.csv           ID,ImageWidth,ImageHeight,PredictionString (empty)
    OUT/gt/{ID}_cellmask.png            uint16 cell instance labels 1..K (0 background)
    OUT/gt/{ID}_nucleimask.png          uint16, nucleus of cell k carries k
    OUT/gt/cell_labels.csv              ID,cell_id,Label,split (Label '|'-joined, 18 = Negative)
    OUT/gt/image_labels.csv             ID,Label,split for every image
    OUT/gt/synth_meta.json              the generation parameters

Only evaluation (and an explicit oracle mode) may read ``OUT/gt``; test labels live only
there. Geometry: :mod:`hpa.synth.cells`; intensities and class patterns:
:mod:`hpa.synth.render`; labels: :mod:`hpa.synth.labels`. Every image draws from its own
generator seeded by ``(seed, split, index)``, so the bytes depend only on the seed and the
sizes, never on ``--workers``. See docs/synth.md.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hpa.constants import NEGATIVE
from hpa.io.fields import write_field, write_mask
from hpa.synth.cells import Layout, make_layout
from hpa.synth.difficulty import DIFFICULTIES, Difficulty, get_difficulty
from hpa.synth.labels import assign_cell_labels, image_label_from_cells, n_mitotic_for, noisy_label, sample_label_sets
from hpa.synth.render import render_field
from hpa.utils.fs import write_csv, write_json
from hpa.utils.parallel import map_jobs

log = logging.getLogger(__name__)

__all__ = ["SynthField", "make_field", "generate_dataset", "image_id", "main"]

#: Bumped whenever the generator's output for a given seed changes.
GENERATOR_VERSION = 2
_SPLIT_CODE = {"train": 0, "test": 1}


@dataclass
class SynthField:
    """One generated field of view with its ground truth.

    field: uint8 (4, S, S) red, green, blue, yellow. cell_mask / nuclei_mask: int32 (S, S),
    cells 1..K, nucleus k inside cell k. cell_labels: K sorted class tuples ((18,) = negative).
    image_labels: union of the cell labels without 18, or (18,). layout: the full geometry
    (nucleoli, centrosomes, mitotic flags; see :class:`hpa.synth.cells.Layout`).
    """

    field: np.ndarray
    cell_mask: np.ndarray
    nuclei_mask: np.ndarray
    cell_labels: list
    image_labels: tuple
    layout: Layout | None = None


def make_field(rng: np.random.Generator, size: int = 256, image_labels: tuple[int, ...] | None = None,
               cell_scale: float = 1.0, difficulty: Difficulty = DIFFICULTIES["default"]) -> SynthField:
    """Generate one field whose image label is ``image_labels`` (drawn from HPA statistics if None).

    Args:
        rng: the only source of randomness (same state -> same bytes).
        size: side S in pixels (>= 64; 128, 256 and 512 look alike at different resolutions).
        image_labels: 1-4 classes of 0..17, or (18,) for a field with only negative cells.
        cell_scale: cell size factor ``c``: cells ``c`` times as wide, about ``1 / c**2`` times as
            many per field (:func:`hpa.synth.cells.make_layout`); 1 is the default benchmark.
        difficulty: :mod:`hpa.synth.difficulty` (the hard benchmark also varies the cell size
            per field, log-uniformly in ``difficulty.cell_scale_range`` times ``cell_scale``).
    """
    if image_labels is None:
        image_labels = sample_label_sets(rng, 1, ensure_all=False)[0]
    image_labels = tuple(sorted({int(c) for c in image_labels}))
    n_inter = len([c for c in image_labels if c not in (11, NEGATIVE)])
    lo, hi = difficulty.cell_scale_range
    if (lo, hi) != (1.0, 1.0):
        cell_scale = cell_scale * float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    lay = make_layout(rng, size, n_mitotic=n_mitotic_for(rng, image_labels), min_interphase=max(4, n_inter),
                      cell_scale=cell_scale)
    cell_labels = assign_cell_labels(rng, image_labels, lay.mitotic[1:], difficulty)
    got = image_label_from_cells(cell_labels)
    if got != image_labels:  # cannot happen unless assign_cell_labels is broken
        raise AssertionError(f"cells show {got}, image label is {image_labels}")
    field = render_field(rng, lay, cell_labels, difficulty)
    return SynthField(field, lay.cell_mask, lay.nuclei_mask, cell_labels, image_labels, lay)


def image_id(split: str, index: int) -> str:
    """``syn-train-00001`` style ID of the ``index``-th (0-based) image of a split."""
    return f"syn-{split}-{index + 1:05d}"


def _label_str(labels) -> str:
    return "|".join(str(int(c)) for c in labels)


def _job(args):
    out, split, index, seed, size, labels, cell_scale, difficulty = args
    d = get_difficulty(difficulty)
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    f = make_field(rng, size, labels, cell_scale, d)
    iid = image_id(split, index)
    write_field(Path(out) / split, iid, f.field)
    write_mask(Path(out) / "gt" / f"{iid}_cellmask.png", f.cell_mask)
    write_mask(Path(out) / "gt" / f"{iid}_nucleimask.png", f.nuclei_mask)
    given = f.image_labels  # the label an annotator wrote: imperfect for training images of the hard benchmark
    if split == "train":
        given = noisy_label(np.random.default_rng([seed, _SPLIT_CODE[split], index, 1]), f.image_labels, d)
    return iid, split, f.image_labels, f.cell_labels, given


def _meta(n_train, n_test, size, seed, cell_scale=1.0, difficulty="default") -> dict:
    meta = {"generator": "hpa.synth", "version": GENERATOR_VERSION, "n_train": n_train, "n_test": n_test,
            "size": size, "seed": seed}
    if cell_scale != 1.0:  # absent at 1: the default benchmark's meta (and bytes) are unchanged
        meta["cell_scale"] = cell_scale
    if difficulty != "default":
        meta["difficulty"] = difficulty
    return meta


def generate_dataset(out_dir: str | os.PathLike, n_train: int, n_test: int, size: int = 256, seed: int = 0,
                     workers: int = 1, force: bool = False, progress: bool = True, cell_scale: float = 1.0,
                     difficulty: str = "default") -> Path:
    """Write a synthetic data set (layout in the module docstring) and return its folder.

    Args:
        out_dir: destination folder (created).
        n_train, n_test: numbers of fields (>= 0, n_train >= 1).
        size: field side in pixels (>= 64).
        seed: integer seed; output bytes depend only on (seed, n_train, n_test, size, cell_scale).
        workers: processes (1 = in this process); does not change the output.
        force: regenerate even when ``OUT/gt/synth_meta.json`` says the same set is complete.
        progress: show a tqdm progress bar.
        cell_scale: cell size factor (0.1..4) independent of the field size: 0.5 gives cells half as
            wide and about four times as many per field.
        difficulty: ``default`` or ``hard`` (:mod:`hpa.synth.difficulty`; docs/synth.md). With label
            noise, ``train.csv`` holds the annotators' labels, ``gt/image_labels.csv`` the true ones
            and ``gt/label_noise.csv`` every difference.

    The CSVs are written last (each atomically), so a folder with ``gt/synth_meta.json``
    matching the arguments is a complete data set and is left as it is unless ``force``.
    """
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got n_train={n_train}, n_test={n_test}")
    if size < 64:
        raise ValueError(f"size must be >= 64 px, got {size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not 0.1 <= cell_scale <= 4.0:
        raise ValueError(f"cell_scale must lie in 0.1..4, got {cell_scale}")
    out = Path(out_dir)
    get_difficulty(difficulty)
    meta = _meta(int(n_train), int(n_test), int(size), int(seed), float(cell_scale), difficulty)
    meta_path = out / "gt" / "synth_meta.json"
    if not force and meta_path.is_file() and (out / "train.csv").is_file():
        import json

        try:
            old = json.loads(meta_path.read_text())
        except ValueError:
            old = None
        if old == meta:
            log.info("%s already holds this synthetic set (%s); skipping (force=True to redo)", out, meta)
            return out
    meta_path.unlink(missing_ok=True)

    jobs = []
    for split, n in (("train", n_train), ("test", n_test)):
        sets = sample_label_sets(np.random.default_rng([seed, _SPLIT_CODE[split], 10 ** 9]), n)
        jobs += [(str(out), split, i, int(seed), int(size), sets[i], float(cell_scale), difficulty) for i in range(n)]
    log.info("generating %d train + %d test fields of %d px (cell scale %g, seed %d, %d workers) in %s",
             n_train, n_test, size, cell_scale, seed, workers, out)
    results = list(map_jobs(_job, jobs, workers, desc="synth", progress=progress))

    img_rows, cell_rows, noise_rows = [], [], []
    for iid, split, labels, cells, given in results:
        img_rows.append((iid, _label_str(labels), split))
        cell_rows += [(iid, k, _label_str(cl), split) for k, cl in enumerate(cells, start=1)]
        if given != labels:
            noise_rows.append((iid, _label_str(labels), _label_str(given)))
    img = pd.DataFrame(img_rows, columns=["ID", "Label", "split"])
    train, test = img[img.split == "train"], img[img.split == "test"]
    write_csv(out / "gt" / "cell_labels.csv", pd.DataFrame(cell_rows, columns=["ID", "cell_id", "Label", "split"]))
    write_csv(out / "gt" / "image_labels.csv", img)
    given_of = {iid: _label_str(g) for iid, _, _, _, g in results}
    write_csv(out / "train.csv", pd.DataFrame({"ID": train["ID"], "Label": train["ID"].map(given_of)}))
    if difficulty != "default":  # which training labels differ from the truth (absent from the default set)
        write_csv(out / "gt" / "label_noise.csv", pd.DataFrame(noise_rows, columns=["ID", "true", "given"]))
    write_csv(out / "test.csv", test[["ID"]])
    write_csv(out / "sample_submission.csv", pd.DataFrame(
        {"ID": test.ID.values, "ImageWidth": size, "ImageHeight": size, "PredictionString": ""}))
    _remove_stale(out, set(img.ID))
    write_json(meta_path, meta)
    n_cells = len(cell_rows)
    neg = sum(1 for r in cell_rows if r[2] == str(NEGATIVE))
    log.info("wrote %d fields, %d cells (%.0f%% negative) to %s", len(img), n_cells, 100 * neg / max(n_cells, 1), out)
    return out


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Delete ``syn-*`` files left by an earlier, larger generation into the same folder."""
    for sub, suffixes in (("train", ("_red", "_green", "_blue", "_yellow")), ("test", ("_red", "_green", "_blue", "_yellow")),
                          ("gt", ("_cellmask", "_nucleimask"))):
        for p in (out / sub).glob("syn-*.png"):
            stem = p.stem
            for suf in suffixes:
                if stem.endswith(suf) and stem[: -len(suf)] not in keep:
                    p.unlink()
                    break


def main(argv: list[str] | None = None) -> Path:
    from hpa.utils.log import setup_logging

    ap = argparse.ArgumentParser(prog="python -m hpa.synth", description="Write a synthetic HPA-like data set with cell-level ground truth.")
    ap.add_argument("out", help="output folder (Kaggle layout plus gt/)")
    ap.add_argument("--n-train", type=int, default=400, help="number of training fields (default 400)")
    ap.add_argument("--n-test", type=int, default=100, help="number of test fields (default 100)")
    ap.add_argument("--size", type=int, default=256, help="field side in pixels (default 256)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--cell-scale", type=float, default=1.0,
                    help="cell size factor independent of the field size (default 1; 0.5: cells half as wide, "
                         "about 4x as many per field)")
    ap.add_argument("--difficulty", choices=list(DIFFICULTIES), default="default",
                    help="default: the long-standing benchmark; hard: class variants, expression spread, confusable "
                         "classes, imperfect training labels, cell size 0.5-1.5x (docs/synth.md)")
    ap.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    ap.add_argument("--force", action="store_true", help="regenerate even if OUT already holds this set")
    a = ap.parse_args(argv)
    setup_logging()
    return generate_dataset(a.out, a.n_train, a.n_test, a.size, a.seed, a.workers, a.force, cell_scale=a.cell_scale,
                            difficulty=a.difficulty)

