"""Cell model: labels (pseudo and oracle), targets, sampling weights, dataset, init, prediction, training."""

import numpy as np
import pandas as pd
import pytest
import torch

import hpa.cell_model as cm
from hpa.cell_crops import build_crop_cache
from hpa.io import InputError, write_field, write_mask
from hpa.models import build_model


def test_soft_targets_uniform_over_classes():
    t = cm.soft_targets([[3], [0, 5], [18], [2, 1, 7]])
    assert t.shape == (4, 19) and t.dtype == np.float32
    np.testing.assert_allclose(t.sum(1), 1.0)
    assert t[0, 3] == 1.0 and t[1, 0] == t[1, 5] == 0.5 and t[2, 18] == 1.0
    np.testing.assert_allclose(t[3, [1, 2, 7]], 1 / 3)
    with pytest.raises(ValueError, match="non-empty subset"):
        cm.soft_targets([[19]])


def test_read_pseudo_labels(tmp_path):
    path = tmp_path / "pseudo_labels.parquet"
    pd.DataFrame({"ID": ["a", "a", "b"], "cell_id": [1, 3, 2], "label": [4, 18, 0]}).to_parquet(path)
    df = cm.read_pseudo_labels(path)
    assert list(df.columns) == ["ID", "cell_id", "weight"] + cm.TARGET_COLS
    assert list(df["weight"]) == [1.0, 1.0, 1.0]
    assert df.loc[0, "t4"] == 1.0 and df.loc[1, "t18"] == 1.0 and df[cm.TARGET_COLS].to_numpy().sum() == 3
    pd.DataFrame({"ID": ["a"], "cell_id": [1], "label": [19], "weight": [1.0]}).to_parquet(path)
    with pytest.raises(InputError, match="outside 0..18"):
        cm.read_pseudo_labels(path)
    with pytest.raises(InputError, match="run stage 04"):
        cm.read_pseudo_labels(tmp_path / "nope.parquet")


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
    df = cm.oracle_cell_labels(data, masks, ["img"])
    assert list(df["ID"]) == ["img"] and list(df["cell_id"]) == [1]
    assert df.loc[0, "t0"] == 0.5 and df.loc[0, "t5"] == 0.5 and df[cm.TARGET_COLS].to_numpy().sum() == 1.0


def test_attach_targets_and_balanced_weights():
    index = pd.DataFrame({"ID": ["a", "a", "b", "b"], "cell_id": [1, 2, 1, 2], "row": [0, 1, 2, 3]})
    labels = pd.concat([pd.DataFrame({"ID": ["b", "a", "b"], "cell_id": [2, 1, 1], "weight": [1.0, 0.5, 1.0]}),
                        pd.DataFrame(cm.soft_targets([[0], [0], [18]]), columns=cm.TARGET_COLS)], axis=1)
    rows, t, w = cm.attach_targets(index, labels)
    assert list(rows) == [0, 2, 3] and list(w) == [0.5, 1.0, 1.0]
    assert t[0, 0] == 1 and t[1, 18] == 1 and t[2, 0] == 1
    # class 0 has 2 cells, class 18 one: 1/count weights then times the label weight, mean 1
    bw = cm.balanced_sample_weights(t, w, power=1.0)
    raw = np.array([0.5 * 0.5, 1.0, 0.5])
    np.testing.assert_allclose(bw, raw / raw.mean())
    np.testing.assert_allclose(cm.balanced_sample_weights(t, None, power=0.0), 1.0)
    bad = labels.assign(cell_id=[9, 1, 1])
    with pytest.raises(InputError, match="not in the crop cache"):
        cm.attach_targets(index, bad)


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


def test_dataset_normalises_and_augments(tmp_path):
    crops, index = tiny_cache(tmp_path)
    mean, std = [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.25, 1.0]
    t = cm.soft_targets([[1]] * len(index))
    ds = cm.CellCropDataset(tmp_path / "cache" / "train_32.npy", index["row"].to_numpy(), mean, std, t)
    x, y = ds[4]
    assert x.shape == (4, 32, 32) and x.dtype == torch.float32 and y[1] == 1.0
    expect = (crops[4].astype(np.float32) / 255 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(x.numpy(), expect, rtol=1e-5, atol=1e-6)
    import pickle
    assert pickle.loads(pickle.dumps(ds))._crops is None  # workers reopen the memmap, no copy
    aug = cm.CellCropDataset(crops, index["row"].to_numpy(), mean, std, t, augment=True)
    torch.manual_seed(0)
    variants = {tuple(aug[4][0].flatten()[:64].tolist()) for _ in range(40)}
    assert 2 <= len(variants) <= 8  # flips and quarter turns of one crop (dihedral group, 8 elements)
    xs = aug[4][0]
    assert torch.allclose(torch.sort(xs.flatten())[0], torch.sort(x.flatten())[0])  # same pixels, moved


def test_init_from_image_model_copies_backbone_and_replaces_head():
    torch.manual_seed(3)
    image_model = build_model("resnet18", num_classes=19, dropout=0.3, output_stride=16)
    model = cm.cell_model_from_image_model(image_model, crop_size=32)
    src, dst = image_model.backbone.state_dict(), model.backbone.state_dict()
    assert src.keys() == dst.keys() and all(torch.equal(src[k], dst[k]) for k in src)
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 19
    assert not torch.equal(model.head.weight, image_model.head.weight)
    assert cm.model_output_stride(model) == 16 and model.dropout.p == pytest.approx(0.3)
    assert model(torch.zeros(2, 4, 32, 32)).shape == (2, 19)
    # efficientnet: static padding rebuilt for the crop size, same tensors
    eff = build_model("efficientnet-b0", image_size=128, output_stride=32)
    cell = cm.cell_model_from_image_model(eff, crop_size=32)
    assert all(torch.equal(v, cell.backbone.state_dict()[k]) for k, v in eff.backbone.state_dict().items())
    assert cm.model_output_stride(cell) == 32


def test_predict_cells_one_row_per_cell_rows_sum_to_one(tmp_path):
    crops, index = tiny_cache(tmp_path)
    model = build_model("resnet18", output_stride=32)
    probs = cm.predict_cells(model, crops, index, [0.2] * 4, [0.2] * 4, batch_size=4, tta_flip=True)
    assert list(probs.columns) == ["ID", "cell_id"] + cm.PROB_COLS
    assert len(probs) == len(index) == 6 and probs[["ID", "cell_id"]].equals(index[["ID", "cell_id"]])
    np.testing.assert_allclose(probs[cm.PROB_COLS].to_numpy().sum(1), 1.0, atol=1e-5)
    assert probs[cm.PROB_COLS].dtypes.eq(np.float32).all()
