"""Real HPA fields through every stage: the five Kaggle fields (2048 and 3072 px, 8-bit PNG) and the two
HPA website fields (colour JPEG channels, 2048 and 1728 px), as both train and test images of a Kaggle-layout
folder of symlinks (the data are read where they lie, never copied), with ``run_all.sh`` and no ground truth."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from shared_data import HPA_PORTAL, HPA_REAL, needs

from hpa.io.layout import link_layout

ROOT = Path(__file__).resolve().parents[2]
#: The website fields have no labels; the test gives them some (any valid set does).
PORTAL_LABELS = {"800_A6_1": "0|16", "89_B5_1": "2"}


def real_layout(root: Path, copies: int = 1) -> tuple[Path, list[str]]:
    """``root/{train,test}/`` of symlinks to the seven real fields (``copies`` IDs per field), ``train.csv`` with
    their labels and ``test.csv``; returns the folder and the IDs."""
    labels = pd.read_csv(HPA_REAL / "labels.csv", dtype=str)
    sources = [(HPA_REAL / "images", i, lab) for i, lab in zip(labels["ID"], labels["Label"])]
    sources += [(HPA_PORTAL, i, lab) for i, lab in PORTAL_LABELS.items()]
    return root, link_layout(root, sources, copies=copies)


@pytest.mark.slow
@needs(HPA_REAL / "images")
@needs(HPA_PORTAL)
def test_real_fields_through_every_stage(tmp_path):
    from hpa.eval.submission import read_submission
    from hpa.io.fields import read_mask

    data, ids = real_layout(tmp_path / "data")
    assert not any(p.is_file() and not p.is_symlink() for p in (data / "train").iterdir())
    run = tmp_path / "run"
    env = dict(os.environ, HPA_VENV=sys.prefix, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "run_all.sh", "--profile", "quick", "--data", str(data), "--run", str(run)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    # the working resolution came from the cells (stage 03 ran first): HPA cells are 15-24% of a field's side
    scale = json.loads((run / "image_model" / "scale.json").read_text())
    assert scale["source"].startswith("stage 03 masks") and scale["n_fields"] == 7
    assert 0.12 < scale["cell_rel"] < 0.25 and 112 <= scale["image_size"] <= 256
    assert abs(scale["cell_px_net"] - 28) < 6 and scale["train_crop"] == round(64 * scale["image_size"] / 128 / 16) * 16
    meta = __import__("torch").load(run / "image_model" / "model.pt", map_location="cpu", weights_only=False)["meta"]
    assert meta["image_size"] == scale["image_size"] and meta["tile"] == scale["train_crop"]
    assert meta["scale"]["image_size"] == scale["image_size"]

    # a valid submission with a prediction for every segmented cell of every test field
    sub = read_submission(run / "submission.csv")
    assert list(sub) == ids
    sizes = {}
    for image_id in ids:
        mask = read_mask(run / "masks" / "test" / f"{image_id}_cellmask.png")
        n_cells = len(np.unique(mask[mask > 0]))
        s = sub[image_id]
        sizes[image_id] = s.width
        assert n_cells >= 5, image_id
        assert (s.width, s.height) == (mask.shape[1], mask.shape[0])
        assert s.n_masks == n_cells and s.n_predictions == 19 * n_cells
    assert sorted(set(sizes.values())) == [1728, 2048, 3072]
    preds = pd.read_parquet(run / "predictions_test.parquet")
    conf = preds[[c for c in preds.columns if c.startswith("conf")]].to_numpy()
    assert len(preds) == sum(sub[i].n_masks for i in ids) and np.isfinite(conf).all()
    assert (0 <= conf).all() and (conf <= 1).all()

    # overlays of both splits, linked from the gallery page
    page = (run / "cams" / "overlays" / "index.html").read_text()
    for split in ("train", "test"):
        pngs = sorted((run / "cams" / "overlays" / split).glob("*.png"))
        assert len(pngs) >= 4 and all(f"{split}/{p.name}" in page for p in pngs)
    report = (run / "report.md").read_text()
    assert "Not run (no ground truth)" in report
