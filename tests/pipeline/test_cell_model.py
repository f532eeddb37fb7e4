"""Cell model: labels (pseudo and oracle), targets, sampling weights, dataset, init, prediction, training."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cell_run import make_run

from hpa.cells.crops import build_crop_cache
from hpa.cells.targets import (
    attach_targets,
    balanced_sample_weights,
    oracle_cell_labels,
    read_pseudo_labels,
    soft_targets,
)
from hpa.config import build_config, save_config
from hpa.constants import PROB_COLS, TARGET_COLS
from hpa.data.cache import FieldDataset
from hpa.engine.checkpoint import load_model
from hpa.engine.trainer import fit
from hpa.io.errors import InputError
from hpa.io.fields import write_field, write_mask
from hpa.models.factory import build_model, cell_model_from_image_model, model_output_stride
from hpa.pipeline.cell_model import oof_folds, predict_cells, train_cell_stage


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the 2 shared cores make OpenMP threads wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_soft_targets_uniform_over_classes():
    t = soft_targets([[3], [0, 5], [18], [2, 1, 7]])
    assert t.shape == (4, 19) and t.dtype == np.float32
    np.testing.assert_allclose(t.sum(1), 1.0)
    assert t[0, 3] == 1.0 and t[1, 0] == t[1, 5] == 0.5 and t[2, 18] == 1.0
    np.testing.assert_allclose(t[3, [1, 2, 7]], 1 / 3)
    with pytest.raises(ValueError, match="non-empty subset"):
        soft_targets([[19]])


def test_read_pseudo_labels(tmp_path):
    path = tmp_path / "pseudo_labels.parquet"
    pd.DataFrame({"ID": ["a", "a", "b"], "cell_id": [1, 3, 2], "label": [4, 18, 0]}).to_parquet(path)
    df = read_pseudo_labels(path)
    assert list(df.columns) == ["ID", "cell_id", "weight"] + TARGET_COLS
    assert list(df["weight"]) == [1.0, 1.0, 1.0]
    assert df.loc[0, "t4"] == 1.0 and df.loc[1, "t18"] == 1.0 and df[TARGET_COLS].to_numpy().sum() == 3
    pd.DataFrame({"ID": ["a"], "cell_id": [1], "label": [19], "weight": [1.0]}).to_parquet(path)
    with pytest.raises(InputError, match="outside 0..18"):
        read_pseudo_labels(path)
    with pytest.raises(InputError, match="run stage 04"):
        read_pseudo_labels(tmp_path / "nope.parquet")


def test_oracle_labels_transfer_by_iou_matching(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    true = np.zeros((40, 40), np.int32)
    true[0:10, 0:10] = 1
    true[20:30, 20:30] = 2
    pred = np.zeros((40, 40), np.int32)
    pred[0:10, 0:9] = 1  # IoU 0.9 with true cell 1
    pred[20:30, 25:35] = 2  # IoU 50/150 = 0.33 with true cell 2: unmatched
    pred[32:40, 0:8] = 3  # no partner
    write_mask(data / "gt" / "img_cellmask.png", true)
    write_mask(masks / "img_cellmask.png", pred)
    pd.DataFrame({"ID": ["img", "img", "other"], "cell_id": [1, 2, 1], "Label": ["0|5", "3", "7"],
                  "split": ["train", "train", "test"]}).to_csv(data / "gt" / "cell_labels.csv", index=False)
    df = oracle_cell_labels(data, masks, ["img"])
    assert list(df["ID"]) == ["img"] and list(df["cell_id"]) == [1]
    assert df.loc[0, "t0"] == 0.5 and df.loc[0, "t5"] == 0.5 and df[TARGET_COLS].to_numpy().sum() == 1.0


def test_attach_targets_and_balanced_weights():
    index = pd.DataFrame({"ID": ["a", "a", "b", "b"], "cell_id": [1, 2, 1, 2], "row": [0, 1, 2, 3]})
    labels = pd.concat([pd.DataFrame({"ID": ["b", "a", "b"], "cell_id": [2, 1, 1], "weight": [1.0, 0.5, 1.0]}),
                        pd.DataFrame(soft_targets([[0], [0], [18]]), columns=TARGET_COLS)], axis=1)
    rows, t, w = attach_targets(index, labels)
    assert list(rows) == [0, 2, 3] and list(w) == [0.5, 1.0, 1.0]
    assert t[0, 0] == 1 and t[1, 18] == 1 and t[2, 0] == 1
    # class 0 has 2 cells, class 18 one: 1/count weights then times the label weight, mean 1
    bw = balanced_sample_weights(t, w, power=1.0)
    raw = np.array([0.5 * 0.5, 1.0, 0.5])
    np.testing.assert_allclose(bw, raw / raw.mean())
    np.testing.assert_allclose(balanced_sample_weights(t, None, power=0.0), 1.0)
    bad = labels.assign(cell_id=[9, 1, 1])
    with pytest.raises(InputError, match="not in the crop cache"):
        attach_targets(index, bad)


def tiny_cache(tmp_path, n_images=2, crop_size=32):
    data, masks = tmp_path / "data", tmp_path / "masks"
    rng = np.random.default_rng(1)
    ids = [f"im{k}" for k in range(n_images)]
    for image_id in ids:
        write_field(data / "train", image_id, rng.integers(0, 255, (4, 64, 64), dtype=np.uint8))
        mask = np.zeros((64, 64), np.int32)
        mask[2:30, 2:30], mask[34:62, 2:30], mask[2:30, 34:62] = 1, 2, 3
        write_mask(masks / f"{image_id}_cellmask.png", mask)
    return build_crop_cache(data, masks, "train", ids, crop_size, 0.1, "dim", 0.25, tmp_path / "cache")


def test_init_from_image_model_copies_backbone_and_replaces_head():
    torch.manual_seed(3)
    image_model = build_model("resnet18", num_classes=19, dropout=0.3, output_stride=16)
    model = cell_model_from_image_model(image_model, crop_size=32)
    src, dst = image_model.backbone.state_dict(), model.backbone.state_dict()
    assert src.keys() == dst.keys() and all(torch.equal(src[k], dst[k]) for k in src)
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 19
    assert not torch.equal(model.head.weight, image_model.head.weight)
    assert model_output_stride(model) == 16 and model.dropout.p == pytest.approx(0.3)
    assert model(torch.zeros(2, 4, 32, 32)).shape == (2, 19)
    # efficientnet: static padding rebuilt for the crop size, same tensors
    eff = build_model("efficientnet-b0", image_size=128, output_stride=32)
    cell = cell_model_from_image_model(eff, crop_size=32)
    assert all(torch.equal(v, cell.backbone.state_dict()[k]) for k, v in eff.backbone.state_dict().items())
    assert model_output_stride(cell) == 32


def test_field_dataset_serves_crops_and_soft_targets(tmp_path):
    crops, index = tiny_cache(tmp_path)
    t = soft_targets([[1], [2, 3]] * 3)
    ds = FieldDataset(tmp_path / "cache" / "train_32.npy", index["row"].to_numpy()[::-1], t)
    x, y = ds[0]
    assert x.dtype == torch.uint8 and np.array_equal(x.numpy(), crops[5]) and y[1] == 1.0
    assert torch.allclose(ds[1][1][[2, 3]], torch.tensor([0.5, 0.5]))


def test_a_few_training_steps_lower_the_loss(tmp_path):
    """The shared loop (multiclass, soft targets, label smoothing, balanced sampling) learns crops."""
    crops, index = tiny_cache(tmp_path, n_images=4)
    labels = np.array([0 if (c == 1) else 18 for c in index["cell_id"]])  # cell 1 is class 0, the others Negative
    x = np.asarray(crops).copy()
    x[labels == 0, 1] = np.clip(x[labels == 0, 1].astype(int) + 120, 0, 255)  # class 0: bright green
    np.save(tmp_path / "train.npy", x)
    t = soft_targets([[c] for c in labels])
    w = balanced_sample_weights(t, None, 0.5)
    torch.manual_seed(0)
    model = cell_model_from_image_model(build_model("resnet18", output_stride=32), 32, dropout=0.0)
    hist = fit(model, FieldDataset(tmp_path / "train.npy", np.arange(len(x)), t), None, tmp_path / "m",
               task="multiclass", loss="ce", label_smoothing=0.1, epochs=6, batch_size=4, lr=1e-3, warmup_epochs=0,
               sample_weights=w, samples_per_epoch=24, mean=[0.3] * 4, std=[0.3] * 4, progress=False)
    losses = [h["train_loss"] for h in hist]
    assert losses[-1] < 0.6 * losses[0], losses


def test_cell_stage_trains_and_predicts_every_cell(tmp_path, capsys):
    run, cfg, image_model = make_run(tmp_path)
    written = train_cell_stage(run, cfg, cycle=1, progress=False)
    d = run / "cycle1"
    assert written == {"model": d / "cell_model" / "model.pt", "probs_train": d / "cell_probs_train.parquet",
                       "probs_test": d / "cell_probs_test.parquet"}
    for name in ("model.pt", "last.pt", "metrics.csv", "val_predictions.csv"):
        assert (d / "cell_model" / name).is_file(), name
    metrics = pd.read_csv(d / "cell_model" / "metrics.csv")
    assert len(metrics) == 2 and {"acc", "f1", "mAP", "val_loss", "train_loss"} <= set(metrics.columns)
    val = pd.read_csv(d / "cell_model" / "val_predictions.csv")
    assert set(val["ID"]) == {"train0", "train3"} and len(val) == 4  # val fold 0, labelled cells 1 and 2
    model, meta = load_model(d / "cell_model" / "model.pt")
    assert meta["task"] == "multiclass" and meta["arch"] == "resnet18" and meta["image_size"] == 32
    assert meta["mean"] == [0.2, 0.3, 0.2, 0.25] and meta["output_stride"] == 32
    for split, n in (("train", 6), ("test", 2)):
        probs = pd.read_parquet(d / f"cell_probs_{split}.parquet")
        assert list(probs.columns) == ["ID", "cell_id"] + PROB_COLS
        assert len(probs) == 3 * n and not probs.duplicated(["ID", "cell_id"]).any()  # every cell, once
        assert set(probs["ID"]) == {f"{split}{k}" for k in range(n)} and set(probs["cell_id"]) == {1, 2, 3}
        np.testing.assert_allclose(probs[PROB_COLS].to_numpy().sum(1), 1.0, atol=1e-5)
    # a re-run reuses everything: no retraining, no re-prediction
    stamp = {p: p.stat().st_mtime_ns for p in written.values()}
    train_cell_stage(run, cfg, cycle=1, progress=False)
    assert {p: p.stat().st_mtime_ns for p in written.values()} == stamp
    # the stage script: finished outputs are skipped; --cycle or --oracle is required
    save_config(run, cfg)
    stage = load_stage()
    stage.main(["--run", str(run), "--cycle", "1"])
    assert "use --force to redo" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in written.values()} == stamp
    with pytest.raises(SystemExit):
        stage.main(["--run", str(run)])
    assert "give --cycle 1|2, or --oracle" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="run stage 04"):
        stage.main(["--run", str(run), "--cycle", "2"])


def load_stage():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "stages" / "05_train_cell.py"
    spec = importlib.util.spec_from_file_location("stage05", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_oracle_stage_uses_true_labels_and_predicts_test_only(tmp_path):
    run, cfg, _ = make_run(tmp_path, n_test=1)
    written = train_cell_stage(run, cfg, oracle=True, progress=False)
    assert set(written) == {"model", "probs_test"} and not (run / "oracle" / "cell_probs_train.parquet").exists()
    val = pd.read_csv(run / "oracle" / "cell_model" / "val_predictions.csv")
    assert len(val) == 6  # every cell of the 2 validation images matched its true cell
    y = val.set_index("cell_id")[[f"y{c}" for c in range(19)]]
    assert y.loc[1, "y4"].tolist() == [0.5, 0.5] and y.loc[1, "y16"].tolist() == [0.5, 0.5]  # soft target 4|16
    assert (y.loc[3, "y18"] == 1.0).all()
    probs = pd.read_parquet(written["probs_test"])
    assert len(probs) == 3 and np.allclose(probs[PROB_COLS].sum(axis=1), 1.0, atol=1e-5)


def test_read_pseudo_labels_multi_class(tmp_path):
    path = tmp_path / "pseudo_labels.parquet"
    pd.DataFrame({"ID": ["a", "b"], "cell_id": [1, 2], "label": [4, 18], "labels": ["4|7", "18"]}).to_parquet(path)
    df = read_pseudo_labels(path)
    assert df.loc[0, "t4"] == df.loc[0, "t7"] == 0.5 and df.loc[1, "t18"] == 1.0
    pd.DataFrame({"ID": ["a"], "cell_id": [1], "label": [4], "labels": ["7|4"]}).to_parquet(path)
    with pytest.raises(InputError, match="starting with 'label'"):
        read_pseudo_labels(path)


def test_read_pseudo_labels_soft_targets(tmp_path):
    path = tmp_path / "pseudo_labels.parquet"
    df = pd.DataFrame({"ID": ["a", "b"], "cell_id": [1, 2], "label": [4, 7], "labels": ["4|5", "7"]})
    t = np.full((2, 19), np.nan)
    t[1] = 0.0
    t[1, 7], t[1, 18] = 0.75, 0.25  # a filled cell: the cell model's probabilities as they are
    df[TARGET_COLS] = t
    df.to_parquet(path)
    out = read_pseudo_labels(path)
    assert out.loc[0, "t4"] == out.loc[0, "t5"] == 0.5  # all-NaN row: the label set, as before
    assert out.loc[1, "t7"] == pytest.approx(0.75) and out.loc[1, "t18"] == pytest.approx(0.25)
    assert out[TARGET_COLS].to_numpy().sum(1) == pytest.approx([1.0, 1.0])
    t[1, 18] = 0.5  # sums to 1.25
    df[TARGET_COLS] = t
    df.to_parquet(path)
    with pytest.raises(InputError, match="sum to 1"):
        read_pseudo_labels(path)


def test_oof_folds_deal_images_evenly_and_reproducibly():
    ids = [f"im{k}" for k in range(10)]
    group = oof_folds(reversed(ids), 3, seed=0)
    assert set(group) == set(ids) and sorted(np.bincount(list(group.values()))) == [3, 3, 4]
    assert group == oof_folds(ids, 3, seed=0)  # the order the IDs come in does not matter
    assert group != oof_folds(ids, 3, seed=1)


def test_out_of_fold_cycle1_probabilities(tmp_path):
    """cell_model.oof_folds=2: every training image's cells get the probabilities of the model that did
    not train on that image; the validation images keep the cycle-1 model's; a re-run reuses them."""
    run, cfg, _ = make_run(tmp_path, overrides=("cell_model.oof_folds=2",))
    written = train_cell_stage(run, cfg, cycle=1, progress=False)
    d = run / "cycle1"
    probs = pd.read_parquet(written["probs_train"]).set_index(["ID", "cell_id"])
    assert len(probs) == 18 and json.loads((d / "oof.json").read_text()) == {
        "folds": 2, "images": 4, "cells_replaced": 12, "cells": 18}
    crops, index = np.load(run / "cell_cache" / "train_32.npy"), pd.read_parquet(run / "cell_cache" / "train_32.parquet")
    group = oof_folds(["train1", "train2", "train4", "train5"], 2, cfg.seed)
    assert sorted(np.bincount(list(group.values()))) == [2, 2]

    def expected(model_pt, image_id):
        model, meta = load_model(model_pt)
        rows = index[index["ID"] == image_id]
        return predict_cells(model, meta, crops, rows).set_index(["ID", "cell_id"])[PROB_COLS]

    for image_id, j in group.items():
        fold_pt = d / "oof" / f"fold{j}" / "cell_model" / "model.pt"
        _, meta = load_model(fold_pt)
        assert meta["oof_fold"] == j and meta["n_train"] == 4  # 2 labelled cells in each of the 2 other images
        want = expected(fold_pt, image_id)
        np.testing.assert_allclose(probs.loc[want.index, PROB_COLS].to_numpy(), want.to_numpy(), atol=1e-6)
        own = expected(written["model"], image_id)
        assert not np.allclose(own.to_numpy(), want.to_numpy(), atol=1e-4)  # another model's opinion
    for image_id in ("train0", "train3"):  # validation fold: the cycle-1 model never trained on them
        want = expected(written["model"], image_id)
        np.testing.assert_allclose(probs.loc[want.index, PROB_COLS].to_numpy(), want.to_numpy(), atol=1e-6)
    assert written["oof"] == d / "oof.json"
    stamp = {p: p.stat().st_mtime_ns for p in written.values()}
    train_cell_stage(run, cfg, cycle=1, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    # the stage script skips a finished out-of-fold cycle 1, and redoes the train probabilities without it
    save_config(run, cfg)
    stage = load_stage()
    stage.main(["--run", str(run), "--cycle", "1", "cell_model.oof_folds=2"])
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    stage.main(["--run", str(run), "--cycle", "1", "cell_model.oof_folds=0"])
    assert not (d / "oof.json").exists() and written["model"].stat().st_mtime_ns == stamp[written["model"]]
    own = pd.read_parquet(written["probs_train"]).set_index(["ID", "cell_id"])
    want = expected(written["model"], "train1")
    np.testing.assert_allclose(own.loc[want.index, PROB_COLS].to_numpy(), want.to_numpy(), atol=1e-6)


def test_cycle2_epochs_apply_to_cycle2_and_the_oracle_only(tmp_path):
    """cell_model.cycle2_epochs: cycle 2 and the oracle train on every cell, cycle 1 keeps cell_model.epochs."""
    run, cfg, _ = make_run(tmp_path, overrides=("cell_model.epochs=1", "cell_model.cycle2_epochs=3",
                                                "cell_model.val_every=2"))
    train_cell_stage(run, cfg, cycle=1, progress=False)
    train_cell_stage(run, cfg, oracle=True, progress=False)
    assert len(pd.read_csv(run / "cycle1" / "cell_model" / "metrics.csv")) == 1
    oracle = pd.read_csv(run / "oracle" / "cell_model" / "metrics.csv")
    # cell_model.val_every=2: validated after epoch 2 and after the last, not after epoch 1
    assert oracle["epoch"].tolist() == [1, 2, 3] and oracle["val_loss"].notna().tolist() == [False, True, True]
    hard = build_config("hard").cell_model
    assert (hard.cycle2_epochs, hard.val_every) == (12, 4)
    assert (build_config().cell_model.cycle2_epochs, build_config().cell_model.val_every) == (None, 1)
