"""The shared training loop: schedule, losses, metrics, sampling, checkpoints, resume, stage 01, torchrun."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tiny_fields import make_tiny_dataset

from hpa.data.cache import FieldDataset, build_field_cache
from hpa.engine.checkpoint import load_model
from hpa.engine.inference import predict
from hpa.engine.losses import make_loss
from hpa.engine.metrics import compute_metrics, tune_thresholds
from hpa.engine.sampler import EpochSampler
from hpa.engine.schedule import lr_at
from hpa.engine.trainer import fit
from hpa.models.factory import build_model

ROOT = Path(__file__).resolve().parents[2]
FIT = dict(epochs=2, batch_size=4, lr=3e-3, warmup_epochs=0.0, amp="off", channels_last=False, progress=False,
           mean=[0.1] * 4, std=[0.2] * 4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_tiny_dataset(tmp_path_factory.mktemp("tiny"), n=12, size=64)
    labels = pd.read_csv(root / "train.csv")
    y = np.zeros((12, 19), np.float32)
    for i, lab in enumerate(labels["Label"]):
        y[i, [int(c) for c in str(lab).split("|")]] = 1
    cache = build_field_cache(root, "train", labels["ID"].tolist(), 32, root / "cache.npy")
    return root, cache, y


def _datasets(tiny):
    root, cache, y = tiny
    return FieldDataset(root / "cache.npy", range(8), y[:8]), FieldDataset(cache, range(8, 12), y[8:])


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("resnet18", image_size=32, output_stride=32, dropout=0.0, input_norm="per_image")


# --------------------------------------------------------------------------- pieces
def test_schedule_warms_up_then_decays_to_the_floor():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.01)


def test_losses_match_their_definitions():
    torch.manual_seed(0)
    z, t = torch.randn(5, 19), (torch.rand(5, 19) > 0.7).float()
    assert make_loss("multilabel", "bce")(z, t) == pytest.approx(F.binary_cross_entropy_with_logits(z, t).item())
    assert make_loss("multilabel", "focal", focal_gamma=0.0)(z, t) == pytest.approx(
        F.binary_cross_entropy_with_logits(z, t).item())
    assert make_loss("multilabel", "focal")(z, t) < make_loss("multilabel", "bce")(z, t)
    soft = torch.softmax(torch.randn(5, 19), 1)
    assert make_loss("multiclass", "ce", label_smoothing=0.1)(z, soft) == pytest.approx(
        F.cross_entropy(z, soft, label_smoothing=0.1).item())
    w = torch.arange(1, 20, dtype=torch.float32)
    assert make_loss("multilabel", "bce", class_weights=w)(z, t) == pytest.approx(
        (F.binary_cross_entropy_with_logits(z, t, reduction="none") * w).mean().item())
    with pytest.raises(ValueError, match="loss 'ce' does not fit task 'multilabel'; valid: bce, focal"):
        make_loss("multilabel", "ce")


def test_metrics_and_thresholds():
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 0]])
    p = np.array([[0.9, 0.1], [0.35, 0.2], [0.3, 0.6], [0.1, 0.05]])
    thr = tune_thresholds(p, y)
    assert 0.3 < thr[0] <= 0.35 and 0.2 < thr[1] <= 0.6
    m = compute_metrics("multilabel", p, y)
    assert m["mAP"] == pytest.approx(1.0) and m["f1"] == pytest.approx(1.0)
    m = compute_metrics("multilabel", p, y, thresholds=np.array([0.5, 0.5]))
    assert m["f1"] == pytest.approx((2 / 3 + 1) / 2)
    mc = compute_metrics("multiclass", np.array([[0.7, 0.3], [0.4, 0.6], [0.8, 0.2]]), np.array([0, 1, 1]))
    assert mc["acc"] == pytest.approx(2 / 3) and mc["mAP"] == pytest.approx((0.5 + (1 + 2 / 3) / 2) / 2)


def test_epoch_sampler_is_deterministic_disjoint_and_weighted():
    a = EpochSampler(10, seed=3)
    a.set_epoch(4)
    b = EpochSampler(10, seed=3)
    b.set_epoch(4)
    assert a.indices() == b.indices() and sorted(a.indices()) == list(range(10))
    b.set_epoch(5)
    assert a.indices() != b.indices()
    ranks = [EpochSampler(10, seed=3, rank=r, world=3) for r in range(3)]
    shares = [s.indices() for s in ranks]
    assert all(len(s) == 4 for s in shares) and set(sum(shares, [])) == set(range(10))
    long = EpochSampler(4, num_samples=10, seed=1).indices()
    assert len(long) == 10 and sorted(long[:4]) == sorted(long[4:8]) == [0, 1, 2, 3]
    w = EpochSampler(4, weights=np.array([1.0, 0, 0, 3.0]), num_samples=4000)
    counts = np.bincount(w.indices(), minlength=4)
    assert counts[1] == counts[2] == 0 and 2.6 < counts[3] / counts[0] < 3.4


# --------------------------------------------------------------------------- the loop
def test_a_few_steps_lower_the_loss(tiny, tmp_path):
    train_ds, val_ds = _datasets(tiny)
    hist = fit(_model(), train_ds, val_ds, tmp_path, **{**FIT, "epochs": 6, "lr": 2e-3})
    assert [h["epoch"] for h in hist] == list(range(1, 7))
    assert hist[-1]["train_loss"] < 0.6 * hist[0]["train_loss"]
    # the last epoch's validation figures are those of the predictions it wrote
    vp = pd.read_csv(tmp_path / "val_predictions.csv")
    p, y = vp[[f"p{c}" for c in range(19)]].to_numpy(), vp[[f"y{c}" for c in range(19)]].to_numpy()
    want = compute_metrics("multilabel", p, y, tune_thresholds(p, y))
    assert hist[-1]["mAP"] == pytest.approx(want["mAP"], abs=1e-6) and hist[-1]["f1"] == pytest.approx(want["f1"], abs=1e-6)
    bce = -np.mean(y * np.log(np.clip(p, 1e-7, 1)) + (1 - y) * np.log(np.clip(1 - p, 1e-7, 1)))
    assert hist[-1]["val_loss"] == pytest.approx(bce, rel=1e-3)


def test_checkpoint_round_trips_and_predicts_the_same(tiny, tmp_path):
    train_ds, val_ds = _datasets(tiny)
    model = _model()
    fit(model, train_ds, val_ds, tmp_path, **FIT, val_index=pd.DataFrame({"ID": [f"v{i}" for i in range(4)]}),
        extra_meta={"note": "x"})
    for name in ("model.pt", "last.pt", "metrics.csv", "val_predictions.csv", "thresholds.json", "curves.png"):
        assert (tmp_path / name).is_file(), name
    loaded, meta = load_model(tmp_path / "model.pt")
    assert meta["arch"] == "resnet18" and meta["task"] == "multilabel" and meta["image_size"] == 32
    assert meta["output_stride"] == 32 and meta["mean"] == [0.1] * 4 and meta["note"] == "x"
    assert meta["input_norm"] == "per_image" and loaded.input_norm_name == "per_image"
    assert len(meta["class_names"]) == 19 and meta["class_names"][18] == "Negative" and len(meta["thresholds"]) == 19
    p_loaded = predict(loaded, meta, val_ds, batch_size=3)
    p_trained = predict(model, meta, val_ds, batch_size=4)
    p_array = predict(loaded, meta, np.asarray(tiny[1][8:12]))
    assert p_loaded.shape == (4, 19) and np.allclose(p_loaded, p_trained, atol=1e-5)
    assert np.allclose(p_loaded, p_array, atol=1e-6)
    vp = pd.read_csv(tmp_path / "val_predictions.csv")
    assert vp.columns.tolist() == ["ID"] + [f"p{c}" for c in range(19)] + [f"y{c}" for c in range(19)]
    assert np.allclose(vp[[f"p{c}" for c in range(19)]].to_numpy(), p_loaded, atol=1e-5)
    assert np.array_equal(vp[[f"y{c}" for c in range(19)]].to_numpy(), tiny[2][8:12])
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics.columns.tolist()[:3] == ["epoch", "train_loss", "lr"] and {"val_loss", "mAP", "f1",
                                                                              "seconds"} <= set(metrics.columns)
    assert json.loads((tmp_path / "thresholds.json").read_text())["thresholds"] == meta["thresholds"]


def test_interrupted_run_resumes_at_the_next_epoch_and_matches(tiny, tmp_path):
    train_ds, val_ds = _datasets(tiny)
    ref = _model()
    fit(ref, train_ds, val_ds, tmp_path / "ref", **FIT)

    class Stop(Exception):
        pass

    def stop_after_first(epoch, history):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        fit(_model(), train_ds, val_ds, tmp_path / "run", **FIT, on_epoch_end=stop_after_first)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["epoch"] == 1
    assert not (tmp_path / "run" / "model.pt").exists()
    epochs_run = []
    resumed = _model(seed=99)  # the weights come from last.pt, not from this initialisation
    hist = fit(resumed, train_ds, val_ds, tmp_path / "run", **FIT, on_epoch_end=lambda e, h: epochs_run.append(e))
    assert epochs_run == [2] and [h["epoch"] for h in hist] == [1, 2]
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    # a finished run is skipped ...
    again = fit(_model(), train_ds, val_ds, tmp_path / "run", **FIT, on_epoch_end=lambda e, h: epochs_run.append(e))
    assert epochs_run == [2] and again == hist
    # ... a longer one continues from it, force starts again
    fit(_model(), train_ds, val_ds, tmp_path / "run", **{**FIT, "epochs": 3},
        on_epoch_end=lambda e, h: epochs_run.append(e))
    assert epochs_run == [2, 3]
    fit(_model(), train_ds, val_ds, tmp_path / "run", **{**FIT, "epochs": 1}, force=True,
        on_epoch_end=lambda e, h: epochs_run.append(e))
    assert epochs_run == [2, 3, 1]


def test_a_run_stopped_while_writing_its_final_files_completes_them_on_rerun(tiny, tmp_path, monkeypatch):
    """Stopped after the last epoch's last.pt, as its final files are written (here: before curves.png),
    the same call again ends with every file of an uninterrupted run: model.pt, the completion mark, is
    written last, so a run without it is finished from last.pt."""
    from hpa.engine import trainer as trainer_mod

    train_ds, val_ds = _datasets(tiny)
    fit(_model(), train_ds, val_ds, tmp_path / "ref", **FIT)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(trainer_mod, "plot_curves", stop)
    with pytest.raises(Stop):
        fit(_model(), train_ds, val_ds, tmp_path / "run", **FIT)
    monkeypatch.undo()
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["epoch"] == 2
    fit(_model(seed=99), train_ds, val_ds, tmp_path / "run", **FIT)
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert names == ["curves.png", "last.pt", "metrics.csv", "model.pt", "thresholds.json", "val_predictions.csv"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == names
    for name in ("val_predictions.csv", "thresholds.json"):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    ref, run = (torch.load(tmp_path / d / "model.pt", weights_only=False) for d in ("ref", "run"))
    assert all(torch.equal(ref["model"][k], run["model"][k]) for k in ref["model"])
    def timeless(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert timeless(ref["history"]) == timeless(run["history"]) and ref["meta"]["thresholds"] == run["meta"]["thresholds"]


def test_fit_checks_its_inputs(tiny, tmp_path):
    train_ds, val_ds = _datasets(tiny)
    with pytest.raises(ValueError, match="unknown task 'regression'"):
        fit(_model(), train_ds, val_ds, tmp_path, **{**FIT, "task": "regression"})
    with pytest.raises(ValueError, match=r"normalize=True needs mean and std with 4 values each"):
        fit(_model(), train_ds, val_ds, tmp_path, **{**FIT, "mean": [0.1]})
    with pytest.raises(ValueError, match=r"sample_weights must be 8 finite non-negative numbers"):
        fit(_model(), train_ds, val_ds, tmp_path, **FIT, sample_weights=np.ones(3))


# --------------------------------------------------------------------------- stage 01
def _stage():
    spec = importlib.util.spec_from_file_location("stage01", ROOT / "stages" / "01_train_image.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY_SETTINGS = ["image_model.image_size=32", "image_model.cell_px=null", "image_model.train_crop=16",
                 "image_model.val_every=1", "image_model.epochs=1", "image_model.batch_size=4", "image_model.folds=3",
                 "image_model.arch=resnet18", "num_workers=0"]


@pytest.mark.slow
def test_stage_01_writes_every_output(tiny, tmp_path):
    root = tiny[0]
    run = tmp_path / "run"
    _stage().main(["--data", str(root), "--run", str(run), "--profile", "quick", "--no-progress", *TINY_SETTINGS])
    for rel in ("config.yaml", "splits.csv", "cache/train_32.npy", "image_model/model.pt", "image_model/last.pt",
                "image_model/metrics.csv", "image_model/val_predictions.csv", "image_model/thresholds.json",
                "image_model/curves.png", "timings/01_train_image.json"):
        assert (run / rel).is_file(), rel
    splits = pd.read_csv(run / "splits.csv")
    vp = pd.read_csv(run / "image_model" / "val_predictions.csv")
    assert sorted(vp["ID"]) == sorted(splits.loc[splits["fold"] == 0, "ID"])
    model, meta = load_model(run / "image_model" / "model.pt")
    assert meta["n_train"] + meta["n_val"] == 12 and meta["val_fold"] == 0
    assert np.isfinite(predict(model, meta, np.load(run / "cache" / "train_32.npy"))).all()


@pytest.mark.parametrize("args, message", [
    (["image_model.arch=effnet"], "01_train_image: error: setting 'image_model.arch': unknown value 'effnet'; valid: efficientnet-b0"),
    (["image_model.epoch=3"], "unknown setting 'image_model.epoch'"),
    (["--data", "/nonexistent/folder"], "data folder /nonexistent/folder does not exist"),
])
def test_stage_01_bad_options_fail_clearly(tiny, tmp_path, args, message):
    data = ["--data", str(tiny[0])] if "--data" not in args else []
    with pytest.raises(SystemExit) as err:
        _stage().main([*data, "--run", str(tmp_path / "run"), "--profile", "quick", *args])
    assert message in str(err.value)


def test_stage_01_labels_without_images_fail_before_training(tmp_path):
    make_tiny_dataset(tmp_path, n=4, size=16)
    for p in (tmp_path / "train").glob("img002_*.png"):
        p.unlink()
    (tmp_path / "train" / "img001_yellow.png").unlink()
    with pytest.raises(SystemExit) as err:
        _stage().main(["--data", str(tmp_path), "--run", str(tmp_path / "run"), "--profile", "quick"])
    msg = str(err.value)
    assert "2 of 4 images lack channel files" in msg and "img001_yellow" in msg and "img002_red" in msg
    assert {f.name for f in (tmp_path / "run" / "image_model").glob("*")} <= {"scale.json"}  # only the resolution was fixed


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tiny, tmp_path):
    """DDP with gloo: 2 CPU processes train one epoch; only rank 0 writes; the model loads and predicts."""
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HPA_LOG="WARNING")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "stages" / "01_train_image.py"), "--", "--data", str(tiny[0]), "--run", str(run), "--profile",
           "quick", "--no-progress", *TINY_SETTINGS, "image_model.epochs=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, meta = load_model(run / "image_model" / "model.pt")
    assert meta["world_size"] == 2 and meta["n_train"] == 8
    hist = pd.read_csv(run / "image_model" / "metrics.csv")
    assert hist["epoch"].tolist() == [1, 2] and np.isfinite(hist["train_loss"]).all()
    probs = predict(model, meta, np.load(run / "cache" / "train_32.npy"))
    assert probs.shape == (12, 19) and np.isfinite(probs).all()
    assert not list((run / "image_model").glob(".*tmp*"))  # no half-written files left


def test_head_bias_starts_at_the_class_prior():
    from hpa.engine.losses import init_head_bias

    model = _model()
    t = np.zeros((10, 19), np.float32)
    t[:5, 0] = 1
    t[:1, 3] = 1
    init_head_bias(model, t)
    b = model.head.bias.detach().numpy()
    assert b[0] == pytest.approx(0.0, abs=1e-6) and b[3] == pytest.approx(np.log(0.1 / 0.9), rel=1e-5)
    assert b[5] == pytest.approx(np.log(1e-3 / (1 - 1e-3)), rel=1e-5)
    with pytest.raises(ValueError, match=r"targets must be \(N, 19\)"):
        init_head_bias(model, t[:, :5])


def test_validation_of_a_crop_trained_model_is_tiled(tiny, tmp_path):
    from hpa.data.augment import BatchAugment

    train_ds, val_ds = _datasets(tiny)  # 32-px fields, trained on 16-px crops
    model = _model()
    fit(model, train_ds, val_ds, tmp_path, **FIT, augment=BatchAugment(crop_scale=(0.25, 0.25), out_size=16),
        val_tile=16)
    loaded, meta = load_model(tmp_path / "model.pt")
    assert meta["tile"] == 16
    vp = pd.read_csv(tmp_path / "val_predictions.csv")[[f"p{c}" for c in range(19)]].to_numpy()
    tiled = predict(loaded, meta, val_ds)
    whole = predict(loaded, {**meta, "tile": None}, val_ds)
    np.testing.assert_allclose(vp, tiled, atol=1e-5)
    assert not np.allclose(vp, whole, atol=1e-3)
