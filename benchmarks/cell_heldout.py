#!/usr/bin/env python
"""Cell-level mAP of cell models on a large held-out synthetic set: a yardstick that is not the test split.

Settings of the cell stages (pseudo-label rules, cycle-2 options, combination) should not be
chosen on the test split the report scores, and the validation fold of a run is small (79
images on the default benchmark; ``benchmarks/combination_val.py``). This benchmark draws
fresh fields from a seed the run never saw, at the resolution of the run's data, runs the
run's own stages 03 (segmentation) and 02 (image probabilities, CAMs) on them in a work run
that links the run's image model, builds the cell table and the crop cache, and scores every
given cell model there with the run's combination rule (``predict.combine``, ``negative``,
small-cell penalty), side by side on the same cells, with paired bootstrap intervals of each
model's gain over the first one, and AP per class.

    python benchmarks/cell_heldout.py --run runs/default [--n 300] [--seed 7] \\
        [--model NAME=PATH/model.pt ...] [--work DIR]

Without ``--model``: the run's cycle1, cycle2 and oracle cell models. ``--model`` adds cell
models of other runs (for example a cycle-2 model trained with other settings on a copy of
the run): they must share the run's image model and crop settings. The work folder (default
``RUN/heldout_seed{seed}``) is kept and reused, so a second call with other models costs only
their predictions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hpa.cells.combine import aligned_cell_probs, combine, quality_factor
from hpa.cells.table import IMG_COLS
from hpa.config import load_run_config, save_config
from hpa.constants import CLASS_NAMES
from hpa.engine.checkpoint import load_model
from hpa.eval.benchmark import score_methods, step_gains
from hpa.pipeline.cell_model import predict_cells, split_cache
from hpa.pipeline.pseudo_labels import cell_table
from hpa.synth.generate import generate_dataset

ROOT = Path(__file__).resolve().parents[1]


def parse_models(run: Path, items: list[str] | None) -> dict[str, Path]:
    """``NAME=PATH`` pairs, or the run's own cell models that exist."""
    if not items:
        own = {"cycle1": run / "cycle1", "cycle2": run / "cycle2", "oracle": run / "oracle"}
        return {k: d / "cell_model" / "model.pt" for k, d in own.items() if (d / "cell_model" / "model.pt").is_file()}
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            sys.exit(f"--model {item!r}: expected NAME=PATH to an existing model.pt")
        out[name] = Path(path)
    return out


def prepare(run: Path, work: Path, n: int, seed: int, workers: int) -> tuple[Path, Path]:
    """Held-out data (``work/data``, ``n`` test fields) and a work run (``work/run``) with segmentation and CAMs."""
    cfg = load_run_config(run)
    synth_meta = Path(cfg.data) / "gt" / "synth_meta.json"
    if not synth_meta.is_file():
        sys.exit(f"{cfg.data} is not a synthetic data set (no gt/synth_meta.json): nothing to draw from")
    meta = json.loads(synth_meta.read_text())
    if int(meta.get("seed", -1)) == seed:
        sys.exit(f"--seed {seed} is the seed of the run's own data: choose another")
    data = generate_dataset(work / "data", 1, n, size=int(meta["size"]), seed=seed, workers=workers, progress=False,
                            cell_scale=meta.get("cell_scale", 1.0), difficulty=meta.get("difficulty", "default"))
    wrun = work / "run"
    wrun.mkdir(parents=True, exist_ok=True)
    if not (wrun / "image_model").exists():
        os.symlink((run / "image_model").resolve(), wrun / "image_model")
    save_config(wrun, dataclasses.replace(cfg, data=str(data.resolve())))
    for stage in ("03_segment.py", "02_cam.py"):  # both resume: finished work is reused
        subprocess.run([sys.executable, str(ROOT / "stages" / stage), "--run", str(wrun), "--split", "test"],
                       check=True, stdout=subprocess.DEVNULL)
    return data, wrun


@dataclasses.dataclass
class HeldOut:
    """A held-out set ready to score: its data and work run, the work run's settings, its test cell
    table (no isolated-cell view), the cell crops and their index, and the seconds it took."""

    data: Path
    wrun: Path
    cfg: object
    table: object
    crops: object
    index: object
    seconds: float


def open_heldout(run: Path, n: int, seed: int, workers: int, work: str | None = None) -> HeldOut:
    """:func:`prepare` the held-out set of ``run`` (``work``: default ``RUN/heldout_seed{seed}``), then build
    its test cell table and cell crops (both kept in the work run and reused)."""
    t = time.perf_counter()
    data, wrun = prepare(run, Path(work) if work else run / f"heldout_seed{seed}", n, seed, workers)
    cfg = load_run_config(wrun)
    table = cell_table(wrun, data, "test", cfg.pseudo.topk_frac, cfg.pseudo.work_size, view=False)
    crops, index = split_cache(wrun, data, "test", cfg.cell_model, workers)
    return HeldOut(data, wrun, cfg, table, crops, index, time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished run (stages 01-05) on synthetic data")
    ap.add_argument("--model", action="append", metavar="NAME=PATH", help="a cell model to score (repeatable)")
    ap.add_argument("--n", type=int, default=300, help="held-out fields to generate")
    ap.add_argument("--seed", type=int, default=7, help="generator seed (not the run's own)")
    ap.add_argument("--work", default=None, help="work folder (default RUN/heldout_seed{seed}; kept and reused)")
    ap.add_argument("--bootstrap", type=int, default=200, help="resamples of the held-out images for the intervals")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    run = Path(args.run)
    models = parse_models(run, args.model)
    if not models:
        sys.exit(f"{run} has no cell models yet (stage 05) and no --model was given")
    h = open_heldout(run, args.n, args.seed, args.workers, args.work)
    data, wrun, cfg, table, crops, index = h.data, h.wrun, h.cfg, h.table, h.crops, h.index
    p = cfg.predict
    print(f"{run}: held-out set of {table['ID'].nunique()} fields, {len(table)} cells (seed {args.seed}; "
          f"prepared in {h.seconds:.0f} s); rule {p.combine}, negative {p.negative}")

    img = table[IMG_COLS].to_numpy(np.float32)
    quality = quality_factor(table["rel_area"], table["touches_border"]) if p.small_cell_penalty else None
    confs = {"broadcast": combine(img, None, "image", "max", quality)}
    for name, path in models.items():
        model, meta = load_model(path)
        probs = predict_cells(model, meta, crops, index, cfg.cell_model.predict_batch_size)
        confs[name] = combine(img, aligned_cell_probs(table, probs, str(path)), p.combine, p.negative, quality)

    res = score_methods(wrun, data, table, confs, n_boot=args.bootstrap)  # the report's scorer, on the work run
    first = next(iter(models))
    gains = {g["to"]: g for g in step_gains(res, [(first, k) for k in models if k != first])}
    print(f"{'model':12s} {'mAP':>7s} {'95% CI':>15s}   gain over {first} [95% CI], share of resamples")
    for k, v in res.items():
        line = f"{k:12s} {v['mAP']:7.4f}"
        if "bootstrap" in v:
            lo, hi = np.percentile(v["bootstrap"], [2.5, 97.5])
            line += f" {lo:7.4f}-{hi:.4f}"
        if k in gains:
            g = gains[k]
            line += f"   {g['gain']:+.4f} [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}], {100 * g['p_better']:.0f}%"
        print(line)
    aps = {k: [np.nan if a is None else a for a in v["ap_per_class"]] for k, v in res.items()}
    print(f"\nAP per class\n{'class':36s} " + " ".join(f"{k[:10]:>10s}" for k in aps))
    for c, name in enumerate(CLASS_NAMES):
        print(f"{c:2d} {name[:33]:33s} " + " ".join(f"{a[c]:10.3f}" for a in aps.values()))


if __name__ == "__main__":
    main()
