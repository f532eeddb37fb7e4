"""A run folder ready for stage 05 (the cell model), built without stages 01-04: small 64-px fields
with three square cells each, their masks, folds, an image model with random weights, cycle-1
pseudo-labels and ground truth. Shared by tests/pipeline/test_cell_model.py and test_robustness.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hpa.config import Settings, build_config
from hpa.constants import CLASS_NAMES
from hpa.engine.checkpoint import save_checkpoint
from hpa.io.fields import write_field, write_mask
from hpa.models.factory import build_model


def image_checkpoint(path, arch="resnet18", output_stride=16):
    """A stage-01-style ``model.pt`` (random weights) for the cell stage to start from."""
    torch.manual_seed(7)
    model = build_model(arch, output_stride=output_stride, image_size=64, dropout=0.2)
    meta = {"arch": arch, "num_classes": 19, "in_channels": 4, "output_stride": output_stride, "dropout": 0.2,
            "image_size": 64, "task": "multilabel", "class_names": list(CLASS_NAMES), "mean": [0.2, 0.3, 0.2, 0.25],
            "std": [0.2, 0.25, 0.2, 0.2], "epochs": 1, "normalize": True}
    save_checkpoint(path, {"model": model.state_dict(), "meta": meta, "history": [{"epoch": 1}]})
    return model


def make_run(tmp_path: Path, n_train: int = 6, n_test: int = 2,
             overrides: tuple[str, ...] = ()) -> tuple[Path, Settings, torch.nn.Module]:
    """``tmp_path/data`` and ``tmp_path/run``: fields, masks, splits, an image model, cycle-1 pseudo-labels, truth.

    Every field is 64 x 64 with cells 1, 2, 3 (28 x 28 squares); cell 1 is bright green (class 4,
    truth ``4|16``), cells 2 and 3 are Negative; the pseudo-labels leave cell 3 out. Folds:
    image k in fold k % 3 (``image_model.val_fold=0``). Returns ``(run, cfg, image_model)``;
    ``cfg`` (quick profile, 2 epochs, batch 4, then ``overrides``) records the data folder but is
    not saved (``hpa.config.save_config`` writes it for the stage scripts).
    """
    data, run = tmp_path / "data", tmp_path / "run"
    rng = np.random.default_rng(2)
    gt_rows, pl_rows = [], []
    for split, n in (("train", n_train), ("test", n_test)):
        ids = [f"{split}{k}" for k in range(n)]
        for image_id in ids:
            field = rng.integers(0, 30, (4, 64, 64), dtype=np.uint8)
            mask = np.zeros((64, 64), np.int32)
            mask[2:30, 2:30], mask[34:62, 2:30], mask[2:30, 34:62] = 1, 2, 3
            field[1][mask == 1] += 150  # cell 1: class 4 (bright green), others Negative
            write_field(data / split, image_id, field)
            write_mask(run / "masks" / split / f"{image_id}_cellmask.png", mask)
            write_mask(data / "gt" / f"{image_id}_cellmask.png", mask)
            for cid in (1, 2, 3):
                gt_rows.append({"ID": image_id, "cell_id": cid, "Label": "4|16" if cid == 1 else "18", "split": split})
                if split == "train" and cid != 3:  # cell 3 left out of the pseudo-labels
                    pl_rows.append({"ID": image_id, "cell_id": cid, "label": 4 if cid == 1 else 18, "weight": 1.0})
        csv = pd.DataFrame({"ID": ids, "Label": ["4"] * n}) if split == "train" else pd.DataFrame({"ID": ids})
        csv.to_csv(data / f"{split}.csv", index=False)
    pd.DataFrame(gt_rows).to_csv(data / "gt" / "cell_labels.csv", index=False)
    pd.DataFrame(pl_rows).to_parquet(tmp_path / "pl.parquet")
    (run / "cycle1").mkdir(parents=True)
    pd.DataFrame(pl_rows).to_parquet(run / "cycle1" / "pseudo_labels.parquet")
    pd.DataFrame({"ID": [f"train{k}" for k in range(n_train)], "fold": [k % 3 for k in range(n_train)]}).to_csv(
        run / "splits.csv", index=False)
    image_model = image_checkpoint(run / "image_model" / "model.pt")
    cfg = build_config("quick", overrides=["num_workers=0", "cell_model.epochs=2", "cell_model.batch_size=4",
                                           "image_model.val_fold=0", *overrides])
    cfg.data = str(data)
    return run, cfg, image_model
