"""RUN/model_card.md (hpa.pipeline.model_card) from what a run's stages leave behind."""

import hashlib
import json

import pandas as pd

from hpa.config import build_config
from hpa.pipeline.model_card import write_model_card


def _fake_run(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    pd.DataFrame({"ID": ["a", "b", "c", "d"], "Label": ["0|16", "16", "12|18", "0"]}).to_csv(data / "train.csv", index=False)
    pd.DataFrame({"ID": ["t1", "t2"]}).to_csv(data / "test.csv", index=False)
    cfg = build_config("quick", overrides=["seed=7", "predict.combine=product"])
    cfg.data = str(data)
    (run / "image_model").mkdir(parents=True)
    pd.DataFrame({"ID": list("abcd"), "fold": [0, 1, 2, 0]}).to_csv(run / "splits.csv", index=False)
    pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [0.5, 0.4, 0.3], "val_loss": [0.6, 0.5, None],
                  "mAP": [0.41, 0.52, None], "f1": [0.3, 0.35, None]}).to_csv(run / "image_model" / "metrics.csv",
                                                                                   index=False)
    (run / "image_model" / "model.pt").write_bytes(b"image weights")
    (run / "cycle1" / "cell_model").mkdir(parents=True)
    pd.DataFrame({"epoch": [1, 2], "mAP": [0.7, 0.8125], "f1": [0.5, 0.625], "acc": [0.6, 0.75]}).to_csv(
        run / "cycle1" / "cell_model" / "metrics.csv", index=False)
    (run / "cycle1" / "cell_model" / "model.pt").write_bytes(b"cell weights")
    (run / "cycle1" / "pseudo_report.json").write_text(json.dumps({"coverage": {"n_cells": 40, "labelled": 0.75}}))
    (run / "masks" / "train").mkdir(parents=True)
    (run / "masks" / "train" / "segmenter.json").write_text(json.dumps(
        {"segmenter": "classical", "reason": "auto: classical, no hpacellseg weights set", "settings": {"work_size": 256}}))
    return run, cfg, data


def test_model_card_lists_data_settings_figures_and_the_command(tmp_path):
    run, cfg, data = _fake_run(tmp_path)
    path = write_model_card(run, cfg)
    assert path == run / "model_card.md"
    text = path.read_text()
    assert f"- Data folder: `{data}`" in text
    assert "- Training images: 4 (`train.csv`), of which 2 in the validation fold 0 of 3 (`splits.csv`)" in text
    assert "- Test images: 2" in text
    assert "- Cycle 1: 40 segmented training cells, 75.0% of them given a pseudo-label by the rule" in text
    # images per class: 0 twice, 16 twice, 12 once, 18 once, others 0
    for line in ("| 0 | Nucleoplasm | 2 |", "| 16 | Cytosol | 2 |", "| 12 | Centrosome | 1 |", "| 18 | Negative | 1 |",
                 "| 5 | Nuclear bodies | 0 |"):
        assert line in text, line
    assert "- Profile `quick`, seed 7" in text and "`predict.combine=product`" in text
    assert "`segment.segmenter=auto` (classical, work_size 256)" in text
    assert "32-px crops" in text and "trained on 64-px crops for 2 epochs" in text
    # the last validated epoch of each model, with the file's SHA-1
    sha = hashlib.sha1(b"image weights").hexdigest()[:12]
    assert f"| image model (image level) | 2 | 0.520 | 0.350 | - | `image_model/model.pt` ({sha}) |" in text
    sha = hashlib.sha1(b"cell weights").hexdigest()[:12]
    assert f"| cycle-1 cell model | 2 | 0.812 | 0.625 | 0.750 | `cycle1/cell_model/model.pt` ({sha}) |" in text
    assert "cycle-2 cell model" not in text and "oracle cell model |" not in text
    assert "made by the `classical` segmenter (auto: classical, no hpacellseg weights set); settings: work_size 256" in text
    assert f"python stages/08_predict_new.py --run {run.resolve()} --data DIR --out OUT" in text
    assert "Only the cycle-1 cell model is trained: add `--cycle 1`." in text


def test_model_card_of_a_run_without_models(tmp_path):
    run, cfg, _ = _fake_run(tmp_path)
    for p in ("image_model/metrics.csv", "image_model/model.pt", "cycle1/cell_model/metrics.csv",
              "cycle1/cell_model/model.pt", "masks/train/segmenter.json"):
        (run / p).unlink()
    text = write_model_card(run, cfg).read_text()
    assert "| (no model trained yet) |" in text and "No cell model is trained yet: run stage 05 first." in text
    assert "No `masks/train/segmenter.json`" in text
