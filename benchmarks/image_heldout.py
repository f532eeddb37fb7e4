#!/usr/bin/env python
"""Image-level mAP of a run's image model on a large held-out synthetic set, whole fields vs tiles.

The validation fold of stage 01 is small (79 images on the default benchmark, 1 to 5
positives for most classes), so its mAP swings by several points between equally good
models. This benchmark draws a fresh synthetic set from a seed the run never saw, at the
resolution of the run's own data, and scores the image model on it twice, side by side:

- ``whole``: every field in one forward pass (the model's global average pooling over the
  whole field);
- ``tiles``: overlapping tiles of the training crop size, mean tile probability
  (:mod:`hpa.engine.tiling`), what stages 01 (validation) and 02 use for a crop-trained model.

    python benchmarks/image_heldout.py --run runs/default [--n 600] [--seed 7] [--size 256] [--keep DIR]

Prints mAP and per-class AP (classes with at least one positive image) for both.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from hpa.constants import CLASS_NAMES
from hpa.data.cache import build_field_cache
from hpa.engine.checkpoint import load_model
from hpa.engine.inference import predict
from hpa.io.layout import read_labels
from hpa.synth.generate import generate_dataset


def per_class_ap(y: np.ndarray, p: np.ndarray) -> dict[int, float]:
    from sklearn.metrics import average_precision_score

    return {c: float(average_precision_score(y[:, c], p[:, c])) for c in range(y.shape[1])
            if y[:, c].any() and not y[:, c].all()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory with image_model/model.pt")
    ap.add_argument("--n", type=int, default=600, help="held-out fields to generate")
    ap.add_argument("--seed", type=int, default=7, help="generator seed (the run's data used another)")
    ap.add_argument("--size", type=int, default=None, help="field side (default: the run's data, from gt/synth_meta.json)")
    ap.add_argument("--keep", default=None, help="generate into (or reuse) this folder instead of a temporary one")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)

    run = Path(args.run)
    model, meta = load_model(run / "image_model" / "model.pt")
    synth_meta = Path(meta.get("data", "")) / "gt" / "synth_meta.json"
    made = json.loads(synth_meta.read_text()) if synth_meta.is_file() else {}  # how the run's data were made
    size = args.size or made.get("size", 256)
    tmp = tempfile.TemporaryDirectory()
    out = Path(args.keep) if args.keep else Path(tmp.name) / "heldout"
    t = time.perf_counter()
    generate_dataset(out, args.n, 0, size=size, seed=args.seed, workers=2, progress=False,
                     cell_scale=made.get("cell_scale", 1.0), difficulty=made.get("difficulty", "default"))
    ids, y = read_labels(out / "gt" / "image_labels.csv")  # the true labels (train.csv may hold noisy ones)
    s = int(meta["image_size"])
    cache = build_field_cache(out, "train", ids, s, out / f"cache_{s}.npy", workers=2, progress=False)
    prep = time.perf_counter() - t
    print(f"{run}: {meta['arch']} at {s} px, tile {meta.get('tile')}; held-out set: {len(ids)} fields of {size} px, "
          f"seed {args.seed} (made in {prep:.0f} s)")
    res = {}
    for name, m in (("whole", {**meta, "tile": None}), ("tiles", meta)):
        if name == "tiles" and meta.get("tile") is None:
            continue
        t = time.perf_counter()
        p = predict(model, m, cache, batch_size=args.batch)
        res[name] = per_class_ap(y, p)
        print(f"  {name:5s}: mAP {np.mean(list(res[name].values())):.4f}  ({time.perf_counter() - t:.0f} s)")
    print(f"  {'class':34s} {'positives':>9s} " + " ".join(f"{k:>6s}" for k in res))
    for c in res["whole"]:
        print(f"  {c:2d} {CLASS_NAMES[c]:31s} {int(y[:, c].sum()):9d} " + " ".join(f"{res[k][c]:6.3f}" for k in res))
    tmp.cleanup()


if __name__ == "__main__":
    main()
