"""Seconds per 2048-px real HPA field for each stage (the README's table, docs/scaling.md).

Builds a Kaggle-layout folder of symlinks (never copies) to the 2048-px fields of
``../shared/data/hpa_real`` and ``../shared/data/hpa_portal_jpg`` (four Kaggle PNG fields, one
website JPEG field), each under ``--copies`` IDs, used as both train and test images, then runs
every stage of a profile with one epoch for the two models (their training costs a fixed budget
per epoch, not per field: ``image_model.samples_per_epoch`` crops, ``cell_model.samples_per_epoch``
cells) and prints, per stage, the wall-clock and CPU seconds divided by the number of fields it
processed, and the seconds of one training epoch.

    python benchmarks/real_speed.py [--copies 2] [--profile default] [--out /tmp/real_speed] [key=value ...]

CPU seconds (the stage process and its workers, ``getrusage``) are the steadier figure on a
shared machine: wall seconds grow with the other jobs' load, which is printed too.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CHANNELS = ("red", "green", "blue", "yellow")


def layout(out: Path, copies: int) -> list[str]:
    """``out/{train,test}/`` symlinks to the 2048-px real fields and ``train.csv`` / ``test.csv``; returns the IDs."""
    from PIL import Image

    from hpa.io.layout import link_layout

    labels = pd.read_csv(SHARED / "hpa_real" / "labels.csv", dtype=str)
    sources = [(SHARED / "hpa_real" / "images", i, lab) for i, lab in zip(labels["ID"], labels["Label"])]
    sources.append((SHARED / "hpa_portal_jpg", "800_A6_1", "0|16"))  # the website field: labels given here
    fields = []
    for folder, image_id, lab in sources:
        with Image.open(next(folder.glob(f"{image_id}_red.*"))) as im:
            if im.size == (2048, 2048):
                fields.append((folder, image_id, lab))
    return link_layout(out, fields, copies=copies)


def run_stage(args: list[str], env: dict) -> tuple[float, float]:
    """Run one stage script; returns (wall seconds, CPU seconds of it and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=2, help="IDs per 2048-px field (5 fields): 2 -> 10 per split")
    ap.add_argument("--profile", default="default")
    ap.add_argument("--out", default="/tmp/real_speed", help="scratch folder (deleted first)")
    ap.add_argument("overrides", nargs="*", help="extra settings, key=value")
    a = ap.parse_args(argv)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    ids = layout(out / "data", a.copies)
    n, run = len(ids), out / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HPA_LOG="WARNING")
    common = ["--run", str(run)]
    first = ["--data", str(out / "data"), "--profile", a.profile, "image_model.epochs=1", "cell_model.epochs=1",
             *a.overrides]
    stages = [
        ("03 segmentation, train", ["stages/03_segment.py", *common, *first, "--split", "train"], n),
        ("01 field cache + 1 epoch", ["stages/01_train_image.py", *common, "--no-progress"], n),
        ("03 segmentation, test", ["stages/03_segment.py", *common, "--split", "test"], n),
        ("02 CAMs + overlays, train", ["stages/02_cam.py", *common, "--split", "train"], n),
        ("02 CAMs + overlays, test (cache too)", ["stages/02_cam.py", *common, "--split", "test"], n),
        ("04 cell table (CAM read-out, cell view) + labels", ["stages/04_pseudo_label.py", *common, "--cycle", "1"], n),
        ("05 crop caches + 1 epoch + predict train and test", ["stages/05_train_cell.py", *common, "--cycle", "1"], 2 * n),
        ("06 test cell table + submission", ["stages/06_predict.py", *common], n),
    ]
    load = os.getloadavg()[0]
    print(f"{n} fields of 2048 px per split ({a.copies} IDs per field), profile {a.profile}, load average "
          f"{load:.1f} at the start")
    print(f"{'stage':52s} {'wall s/field':>13s} {'CPU s/field':>12s}")
    for name, args, fields in stages:
        wall, cpu = run_stage(args, env)
        print(f"{name:52s} {wall / fields:13.2f} {cpu / fields:12.2f}", flush=True)
    for model in ("image_model", "cycle1/cell_model"):
        m = pd.read_csv(run / model / "metrics.csv")
        print(f"one training epoch of {model}: {float(m['seconds'].iloc[-1]):.1f} s wall")
    import json

    scale = json.loads((run / "image_model" / "scale.json").read_text())
    cells = pd.read_csv(run / "masks" / "test" / "cells.csv")
    print(f"field cache {scale['image_size']} px (cells {scale['cell_px_net']:.1f} px), train crop "
          f"{scale['train_crop']}; {cells['n_cells'].mean():.1f} cells per field; load average "
          f"{os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
