"""Robustness of the stages: interruption (SIGKILL, then the same command again), determinism,
bad input (each case a clear error before long work, or a recorded skip the report lists), and
write failures (the message names the path, no partial file is left).

Stages run as subprocesses on small synthetic data with one thread each, so the
uninterrupted and the resumed runs compute in the same order and can be compared exactly.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hpa.synth.generate import generate_dataset

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HPA_LOG="INFO", PYTHONUNBUFFERED="1")
MASK_GLOBS = ("*_cellmask.png", "*_nucleimask.png")


def stage_cmd(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "stages" / script), *args]


def run_stage(script: str, *args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(stage_cmd(script, *args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-3000:]}"
    return proc


HOOK = ROOT / "tests" / "kill_hook"  # its sitecustomize.py kills a stage at a chosen call (docstring there)


def killed_at(cmd: list[str], target: str, call: int, tmp_path: Path, when: str = "after", match: str | None = None,
              timeout: float = 300.0) -> str:
    """Run ``cmd`` and SIGKILL it (its whole process group: the stage and its workers) at the ``call``-th
    call of ``target`` (``module:function``), counted over all its processes; returns its output.

    The kill point is fixed by the call count, not by timing: ``when="before"`` the call does not
    run, ``"after"`` it has returned; with ``match`` only calls whose first argument contains it
    count. Fails when the command ends by itself first (nothing was interrupted).
    """
    tag = f"{target.rpartition(':')[2]}-{call}"
    counter, log_path = tmp_path / f"kill-{tag}.count", tmp_path / f"kill-{tag}.log"
    env = dict(ENV, PYTHONPATH=os.pathsep.join(p for p in (str(HOOK), ENV.get("PYTHONPATH")) if p),
               HPA_KILL_AT=target, HPA_KILL_CALL=str(call), HPA_KILL_WHEN=when, HPA_KILL_COUNTER=str(counter),
               HPA_KILL_NOT_PGID=str(os.getpgrp()), **({"HPA_KILL_MATCH": match} if match else {}))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log_path.read_text()
    assert rc == -signal.SIGKILL, f"{cmd[1]} ended with rc {rc}, not killed at call {call} of {target}:\n{out[-3000:]}"
    assert counter.stat().st_size >= call
    return out


def file_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def mask_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for g in MASK_GLOBS for p in sorted(folder.glob(g))}


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = state_dict(a), state_dict(b)
    assert list(sa) == list(sb)
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} of {len(sa)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def synth128(tmp_path_factory):
    """16 train and 4 test fields of 128 px with ground truth: the training and chain tests."""
    return generate_dataset(tmp_path_factory.mktemp("synth128"), 16, 4, size=128, seed=0, progress=False)


# ------------------------------------------------------------------ interruption
# Each test kills a stage at a point fixed by a call count (tests/kill_hook), re-runs the same
# command and compares every output with an uninterrupted run made once per module.
@pytest.fixture(scope="module")
def segmented(synth128, tmp_path_factory):
    """Stage 03 on the 16 train fields of ``synth128``, uninterrupted, one process: the reference."""
    run = tmp_path_factory.mktemp("segment") / "clean"
    run_stage("03_segment.py", "--data", str(synth128), "--split", "train", "--workers", "1", "--run", str(run))
    return run / "masks" / "train"


@pytest.mark.slow
@pytest.mark.parametrize("workers, target, call, when, match", [
    (2, "hpa.io.fields:write_mask", 5, "after", "_nucleimask"),  # between an image's two masks, 2 workers
    (1, "hpa.utils.fs:write_csv", 1, "before", "cells.csv"),  # every mask written, the table not
], ids=["between-masks-2-workers", "before-the-table"])
def test_segment_killed_and_rerun_equals_an_uninterrupted_run(synth128, segmented, tmp_path, workers, target, call,
                                                              when, match):
    args = ["--data", str(synth128), "--split", "train", "--workers", str(workers), "--run", str(tmp_path / "run")]
    killed_at(stage_cmd("03_segment.py", *args), target, call, tmp_path, when, match)
    out = tmp_path / "run" / "masks" / "train"
    n_cells, n_nuclei = len(list(out.glob("*_cellmask.png"))), len(list(out.glob("*_nucleimask.png")))
    assert not (out / "cells.csv").exists()
    if match == "cells.csv":
        assert n_cells == n_nuclei == 16
    else:  # the image whose nuclei mask was the call-th lost its cell mask; another worker may hold one more
        assert call - workers <= n_cells < call <= n_nuclei, (n_cells, n_nuclei)
    rerun = run_stage("03_segment.py", *args)
    assert f"{n_cells} already done, {16 - n_cells} to segment" in rerun.stderr
    a, b = mask_files(segmented), mask_files(out)
    assert len(a) == 32 and sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []  # byte-identical, whatever the worker count
    ta = pd.read_csv(segmented / "cells.csv", dtype={"ID": str})
    tb = pd.read_csv(out / "cells.csv", dtype={"ID": str})
    # "seconds" is wall time: NaN for images whose masks came from the killed run
    pd.testing.assert_frame_equal(ta.drop(columns="seconds"), tb.drop(columns="seconds"))
    assert tb["seconds"].isna().sum() == n_cells
    # a write cut by the kill may leave a hidden temporary file; it never matches an output name
    assert all(p.name.startswith(".") and not p.name.endswith(("mask.png", ".csv")) for p in out.glob("*.tmp*"))


TRAIN_ARGS = ["--profile", "quick", "--no-progress", "image_model.arch=resnet18", "image_model.image_size=64",
              "image_model.cell_px=null",
              "image_model.train_crop=32", "image_model.epochs=2", "image_model.samples_per_epoch=32",
              "image_model.batch_size=8", "image_model.val_every=1", "image_model.folds=3",
              "image_model.loader_workers=0", "device=cpu"]


@pytest.fixture(scope="module")
def tiny44(tmp_path_factory):
    """44 train fields of 64 px: the field cache saves its progress once (every 32 rows) while decoding."""
    from tiny_fields import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("tiny44"), n=44, size=64)


@pytest.fixture(scope="module")
def trained(tiny44, tmp_path_factory):
    """Stage 01 on ``tiny44``, uninterrupted, cache decoded in this process: the reference run."""
    run = tmp_path_factory.mktemp("train") / "clean"
    run_stage("01_train_image.py", "--data", str(tiny44), "--run", str(run), *TRAIN_ARGS, "num_workers=0")
    return run


def assert_same_stage_01_outputs(clean: Path, run: Path) -> None:
    """Splits, field cache (bytes and sidecar), metrics (but wall time), validation predictions, weights."""
    assert (run / "splits.csv").read_bytes() == (clean / "splits.csv").read_bytes()
    assert (run / "cache/train_64.npy").read_bytes() == (clean / "cache/train_64.npy").read_bytes()
    assert json.loads((run / "cache/train_64.json").read_text()) == json.loads((clean / "cache/train_64.json").read_text())
    assert sorted(p.name for p in (run / "cache").iterdir()) == ["train_64.json", "train_64.npy"]  # no partial files
    assert file_names(run / "image_model") == file_names(clean / "image_model")
    for rel in ("image_model/metrics.csv", "image_model/val_predictions.csv"):
        a, b = pd.read_csv(clean / rel), pd.read_csv(run / rel)
        pd.testing.assert_frame_equal(a.drop(columns="seconds", errors="ignore"), b.drop(columns="seconds", errors="ignore"),
                                      check_exact=True, obj=rel)
    assert_same_weights(clean / "image_model/model.pt", run / "image_model/model.pt")


@pytest.mark.slow
@pytest.mark.parametrize("workers, kill_before, saved", [(0, 6, 0), (2, 42, 32)],
                         ids=["before-a-progress-save", "after-one-2-workers"])
def test_stage_01_killed_while_decoding_ends_like_an_uninterrupted_run(tiny44, trained, tmp_path, workers, kill_before,
                                                                      saved):
    """Killed as the 6th field starts decoding (in the stage's process), or the 42nd (2 worker processes):
    the re-run decodes all 44 fields again, or resumes from the 32 rows saved, and ends with the reference
    run's files.

    The pool runs at most 8 jobs ahead of the rows written (``map_jobs``: 4 x workers), so when the
    42nd job starts at least 34 rows are written: the save after row 32 has happened, the next
    (row 64) cannot have."""
    run = tmp_path / "run"
    args = ["--data", str(tiny44), "--run", str(run), *TRAIN_ARGS, f"num_workers={workers}"]
    killed_at(stage_cmd("01_train_image.py", *args), "hpa.data.cache:_load_field", kill_before, tmp_path, "before")
    cache = run / "cache"
    assert (cache / "train_64.partial.npy").is_file() and not (cache / "train_64.npy").exists()
    assert {f.name for f in (run / "image_model").glob("*")} <= {"scale.json"}  # only the resolution was fixed
    done = cache / "train_64.done.npy"
    assert (int(np.load(done).sum()) if done.is_file() else 0) == saved
    rerun = run_stage("01_train_image.py", *args)
    if saved:
        assert f"resuming field cache {cache / 'train_64.npy'}: 32 of 44 fields done" in rerun.stderr
    assert f"decoding {44 - saved} fields of" in rerun.stderr
    assert_same_stage_01_outputs(trained, run)


@pytest.mark.slow
def test_training_killed_after_an_epoch_resumes_to_the_same_weights(tiny44, trained, tmp_path):
    run = tmp_path / "run"
    args = ["--data", str(tiny44), "--run", str(run), *TRAIN_ARGS, "num_workers=0"]
    # the first checkpoint written is last.pt after epoch 1 of 2
    killed_at(stage_cmd("01_train_image.py", *args), "hpa.engine.checkpoint:save_checkpoint", 1, tmp_path)
    last, model = run / "image_model" / "last.pt", run / "image_model" / "model.pt"
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 1 and not model.exists()
    rerun = run_stage("01_train_image.py", *args)
    assert "reusing field cache" in rerun.stderr and f"resuming {last} from epoch 2 of 2" in rerun.stderr
    assert "epoch 1/2:" not in rerun.stderr and "epoch 2/2:" in rerun.stderr
    assert pd.read_csv(run / "image_model" / "metrics.csv")["epoch"].tolist() == [1, 2]
    assert_same_stage_01_outputs(trained, run)


# ------------------------------------------------------------------ stage 05: interruption and determinism
CELL_CMD = ("--cycle", "1", "--no-progress")
CELL_TABLES = ("cell_cache/train_32.parquet", "cell_cache/test_32.parquet", "cycle1/cell_probs_train.parquet",
               "cycle1/cell_probs_test.parquet")


@pytest.fixture(scope="module")
def cell_runs(tmp_path_factory):
    """A run ready for stage 05 (tests/cell_run.py: 12 train and 4 test fields, 3 cells each), and a copy
    of it after an uninterrupted stage 05 (one process): ``(fresh, clean)``."""
    import shutil

    from cell_run import make_run

    from hpa.config import save_config

    root = tmp_path_factory.mktemp("cells")
    fresh, cfg, _ = make_run(root, n_train=12, n_test=4, overrides=("device=cpu", "cell_model.loader_workers=0"))
    save_config(fresh, cfg)
    clean = root / "clean"
    shutil.copytree(fresh, clean)
    run_stage("05_train_cell.py", "--run", str(clean), *CELL_CMD)
    return fresh, clean


def fresh_copy(fresh: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(fresh, dst))


def assert_same_stage_05_outputs(a: Path, b: Path) -> None:
    """Crop caches (bytes, index, sidecar), cell-model weights, metrics but wall time, validation and cell
    probabilities: all identical."""
    for split in ("train", "test"):
        rel = f"cell_cache/{split}_32"
        assert (a / f"{rel}.npy").read_bytes() == (b / f"{rel}.npy").read_bytes(), rel
        assert json.loads((a / f"{rel}.json").read_text()) == json.loads((b / f"{rel}.json").read_text())
    for rel in ("cell_cache", "cycle1", "cycle1/cell_model"):  # the same files, no build or temporary file left
        assert file_names(b / rel) == file_names(a / rel), rel
    for rel in CELL_TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(a / rel), pd.read_parquet(b / rel), check_exact=True, obj=rel)
    for rel in ("cycle1/cell_model/metrics.csv", "cycle1/cell_model/val_predictions.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(a / rel).drop(columns="seconds", errors="ignore"),
                                      pd.read_csv(b / rel).drop(columns="seconds", errors="ignore"), check_exact=True,
                                      obj=rel)
    assert_same_weights(a / "cycle1/cell_model/model.pt", b / "cycle1/cell_model/model.pt")


@pytest.mark.slow
def test_stage_05_same_data_seed_and_settings_give_identical_cell_model_and_probabilities(cell_runs, tmp_path):
    fresh, clean = cell_runs
    again = fresh_copy(fresh, tmp_path / "again")
    run_stage("05_train_cell.py", "--run", str(again), *CELL_CMD)
    probs = pd.read_parquet(clean / "cycle1/cell_probs_train.parquet")
    assert len(probs) == 36 and len(pd.read_parquet(clean / "cycle1/cell_probs_test.parquet")) == 12
    assert pd.read_csv(clean / "cycle1/cell_model/metrics.csv")["epoch"].tolist() == [1, 2]
    assert_same_stage_05_outputs(clean, again)


@pytest.mark.slow
@pytest.mark.parametrize("target, call, when, match", [
    ("hpa.cells.crops:_crop_job", 5, "before", None),  # building the train crop cache: 4 of 12 images done
    ("hpa.engine.checkpoint:save_checkpoint", 1, "after", None),  # training: last.pt of epoch 1 of 2 written
    ("hpa.utils.fs:write_parquet", 1, "after", "cell_probs_train"),  # predicting: train written, test not
], ids=["crop-cache", "training", "predicting"])
def test_stage_05_killed_and_rerun_equals_an_uninterrupted_run(cell_runs, tmp_path, target, call, when, match):
    fresh, clean = cell_runs
    run = fresh_copy(fresh, tmp_path / "run")
    args = ["--run", str(run), *CELL_CMD]
    killed_at(stage_cmd("05_train_cell.py", *args), target, call, tmp_path, when, match)
    cache, model_dir = run / "cell_cache", run / "cycle1" / "cell_model"
    if target.endswith("_crop_job"):  # the progress file lists the images whose crops are written
        assert (cache / "train_32.partial.txt").read_text().split() == ["train0", "train1", "train2", "train3"]
        assert not (cache / "train_32.npy").exists() and not model_dir.exists()
    rerun = run_stage("05_train_cell.py", *args)
    if target.endswith("_crop_job"):
        assert f"resuming crop cache {cache / 'train_32.npy'}: 4 of 12 images done" in rerun.stderr
    elif target.endswith("save_checkpoint"):
        assert f"resuming {model_dir / 'last.pt'} from epoch 2 of 2" in rerun.stderr
    else:
        assert f"{model_dir / 'model.pt'} is complete (2 epochs); skipping training" in rerun.stderr
        assert f"{run / 'cycle1/cell_probs_train.parquet'} is up to date; skipping" in rerun.stderr
    assert_same_stage_05_outputs(clean, run)


# ------------------------------------------------------------------ determinism
CHEAP_TRAIN = ["image_model.arch=resnet18", "image_model.image_size=64", "image_model.cell_px=null",
               "image_model.train_crop=32",
               "image_model.epochs=1", "image_model.samples_per_epoch=32", "image_model.batch_size=8",
               "image_model.folds=3", "num_workers=0", "device=cpu", "cam.overlay_max_images=0"]


def run_chain(data: Path, run: Path, *extra: str, to_stage: int = 4) -> None:
    """Stages 01-04 (cycle 1) on the train split; with ``to_stage=7`` the test split and stages 05-07 too."""
    run_stage("01_train_image.py", "--data", str(data), "--run", str(run), "--profile", "quick", "--no-progress",
              *CHEAP_TRAIN, *extra)
    splits = ("train", "test") if to_stage >= 7 else ("train",)
    for split in splits:
        run_stage("03_segment.py", "--run", str(run), "--split", split)
        run_stage("02_cam.py", "--run", str(run), "--split", split)
    run_stage("04_pseudo_label.py", "--run", str(run), "--cycle", "1")
    if to_stage >= 7:
        run_stage("05_train_cell.py", "--run", str(run), "--cycle", "1")
        run_stage("06_predict.py", "--run", str(run))
        run_stage("07_evaluate.py", "--run", str(run))


@pytest.mark.slow
def test_same_data_seed_and_settings_give_identical_outputs(synth128, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        run_chain(synth128, run)
    ma, mb = mask_files(a / "masks" / "train"), mask_files(b / "masks" / "train")
    assert len(ma) == 32 and ma == mb
    for rel in ("cells/train.parquet", "cycle1/pseudo_labels.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(a / rel), pd.read_parquet(b / rel), check_exact=True, obj=rel)
    assert len(pd.read_parquet(a / "cycle1/pseudo_labels.parquet")) > 0
    pd.testing.assert_frame_equal(pd.read_csv(a / "cams/train/probs.csv"), pd.read_csv(b / "cams/train/probs.csv"),
                                  check_exact=True)
    assert (a / "splits.csv").read_bytes() == (b / "splits.csv").read_bytes()
    assert np.array_equal(np.load(a / "cache/train_64.npy"), np.load(b / "cache/train_64.npy"))
    assert_same_weights(a / "image_model/model.pt", b / "image_model/model.pt")


# ------------------------------------------------------------------ bad input, one case at a time
def stage_module(script: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"stage_{script[:2]}", ROOT / "stages" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rewrite_channel(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.unlink()
    Image.fromarray(array).save(path)


def break_data(root: Path, case: str) -> list[str]:
    """Damage img002 (or the labels) of a tiny data set; returns what the error must say."""
    train, csv = root / "train", root / "train.csv"
    if case == "truncated_png":
        p = train / "img002_green.png"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        return ["img002_green.png", "cannot read image"]
    if case == "missing_channel":
        (train / "img002_yellow.png").unlink()
        return ["img002_yellow", "lack channel files"]
    if case == "sizes_differ":
        rewrite_channel(train / "img002_red.png", np.zeros((32, 40), np.uint8))
        return ["img002", "channels differ in size", "img002_red.png 40x32"]
    if case == "unknown_class":
        df = pd.read_csv(csv, dtype=str)
        df.loc[2, "Label"] = "1|19"
        df.to_csv(csv, index=False)
        return [f"{csv} row 4", "class 19 outside 0..18"]
    if case == "duplicate_id":
        df = pd.read_csv(csv, dtype=str)
        pd.concat([df, df.iloc[[1]]]).to_csv(csv, index=False)
        return [f"{csv} row 8", "duplicate ID 'img001' (first at row 3)"]
    if case == "id_without_images":
        df = pd.read_csv(csv, dtype=str)
        pd.concat([df, pd.DataFrame({"ID": ["img999"], "Label": ["1"]})]).to_csv(csv, index=False)
        return ["1 of 7 images lack channel files", "img999_red"]
    raise ValueError(case)


#: cases found before any image is decoded (labels, file lists) vs. while decoding (file contents)
UPFRONT = ("missing_channel", "unknown_class", "duplicate_id", "id_without_images")
CASES = ("truncated_png", "sizes_differ") + UPFRONT


@pytest.mark.parametrize("case", CASES)
def test_stage_01_bad_input_is_a_clear_error_before_training(tmp_path, case):
    from tiny_fields import make_tiny_dataset

    root = make_tiny_dataset(tmp_path / "data", n=6, size=32)
    expected = break_data(root, case)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        stage_module("01_train_image.py").main(["--data", str(root), "--run", str(run), "--profile", "quick",
                                                "--no-progress", "image_model.image_size=32",
                                                "image_model.cell_px=null"])
    msg = str(err.value)
    assert msg.startswith("01_train_image: error: ") and all(e in msg for e in expected), msg
    assert {f.name for f in (run / "image_model").glob("*")} <= {"scale.json"}  # training never started
    if case in UPFRONT:
        assert not (run / "cache").exists() and not (run / "splits.csv").exists()
    else:  # found while decoding: the message says how to go on without the image
        assert "on_bad_image=skip" in msg and not (run / "cache" / "train_32.npy").exists()


@pytest.mark.parametrize("case", CASES)
def test_stage_03_bad_input_is_a_clear_error_or_a_recorded_skip(tmp_path, case):
    from tiny_fields import make_tiny_dataset

    root = make_tiny_dataset(tmp_path / "data", n=6, size=32)
    expected = break_data(root, case)
    args = ["--data", str(root), "--split", "train", "--profile", "quick", "--workers", "1"]
    with pytest.raises(SystemExit) as err:
        stage_module("03_segment.py").main([*args, "--run", str(tmp_path / "run")])
    msg = str(err.value)
    assert msg.startswith("03_segment: error: ") and all(e in msg for e in expected), msg
    out = tmp_path / "run" / "masks" / "train"
    if case in UPFRONT:
        assert not list(out.glob("*_cellmask.png"))  # nothing segmented before the error
    if case in ("unknown_class", "duplicate_id"):
        return  # the labels file is wrong, not an image: no setting skips it
    stage_module("03_segment.py").main([*args, "--run", str(tmp_path / "skip"), "on_bad_image=skip"])
    out = tmp_path / "skip" / "masks" / "train"
    bad_id = "img999" if case == "id_without_images" else "img002"
    skipped = pd.read_csv(out / "skipped.csv", dtype=str)
    reason = {"truncated_png": "img002_green.png: cannot read image", "missing_channel": "img002_yellow",
              "sizes_differ": "channels differ in size", "id_without_images": "img999_red"}[case]
    assert skipped["ID"].tolist() == [bad_id] and reason in skipped["reason"][0]
    table = pd.read_csv(out / "cells.csv", dtype={"ID": str})
    assert bad_id not in set(table["ID"]) and len(table) == 5 + (case == "id_without_images")
    assert not (out / f"{bad_id}_cellmask.png").exists()


def test_a_16_bit_field_among_8_bit_ones_is_scaled_by_bit_depth(synth128, tmp_path):
    """The same field saved as 16-bit (x257), or with one 16-bit channel, gives the same masks and cache rows."""
    import shutil

    from hpa.data.cache import build_field_cache
    from hpa.io.fields import read_field, write_field

    ids = pd.read_csv(synth128 / "train.csv", dtype=str)["ID"].tolist()[:3]
    for name in ("d8", "d16"):
        (tmp_path / name / "train").mkdir(parents=True)
        for i in ids:
            for p in (synth128 / "train").glob(f"{i}_*.png"):
                shutil.copy(p, tmp_path / name / "train" / p.name)
        pd.read_csv(synth128 / "train.csv").iloc[:3].to_csv(tmp_path / name / "train.csv", index=False)
    field = read_field(synth128 / "train", ids[1])
    write_field(tmp_path / "d16" / "train", ids[1], field.astype(np.uint16) * 257)  # a whole 16-bit field
    rewrite_channel(tmp_path / "d16" / "train" / f"{ids[2]}_green.png",  # one 16-bit channel among 8-bit ones
                    read_field(synth128 / "train", ids[2])[1].astype(np.uint16) * 257)
    assert read_field(tmp_path / "d16" / "train", ids[1]).dtype == np.uint16
    for name in ("d8", "d16"):
        stage_module("03_segment.py").main(["--data", str(tmp_path / name), "--run", str(tmp_path / f"run{name}"),
                                            "--split", "train", "--profile", "quick", "--workers", "1"])
    m8, m16 = mask_files(tmp_path / "rund8/masks/train"), mask_files(tmp_path / "rund16/masks/train")
    assert len(m8) == 6 and m8 == m16
    assert (pd.read_csv(tmp_path / "rund8/masks/train/cells.csv")["n_cells"] > 0).all()
    c8 = build_field_cache(tmp_path / "d8", "train", ids, 64, tmp_path / "c8.npy", progress=False)
    c16 = build_field_cache(tmp_path / "d16", "train", ids, 64, tmp_path / "c16.npy", progress=False)
    assert np.abs(c8.astype(int) - c16.astype(int)).max() <= 1  # resized in 16 bit, then the high byte
    assert np.array_equal(c8[0], c16[0]) and abs(c8[1].mean() - c16[1].mean()) < 0.5


@pytest.mark.slow
def test_chain_with_on_bad_image_skip_records_every_bad_image_and_copes_with_empty_fields(synth128, tmp_path):
    """Whole chain (cycle 1) on data with dark, cell-less and unreadable fields, ``on_bad_image=skip``:
    unreadable images are recorded by each stage and listed in the report; fields without cells
    keep empty masks, give no cell rows, an empty submission string, and are listed too."""
    import shutil

    from hpa.eval.submission import read_submission
    from hpa.io.fields import read_field, read_mask, write_field

    data = tmp_path / "data"
    shutil.copytree(synth128, data)
    train = pd.read_csv(data / "train.csv", dtype=str)["ID"].tolist()
    test = pd.read_csv(data / "test.csv", dtype=str)["ID"].tolist()
    black, no_nuclei, truncated, missing, t_black, t_truncated = train[0], train[1], train[2], train[3], test[0], test[1]
    for folder, image_id in ((data / "train", black), (data / "test", t_black)):
        write_field(folder, image_id, np.zeros((4, 128, 128), np.uint8))
    f = read_field(data / "train", no_nuclei)
    f[2] = 0  # no nuclear stain: no nucleus, so no cell
    write_field(data / "train", no_nuclei, f)
    for p in (data / "train" / f"{truncated}_green.png", data / "test" / f"{t_truncated}_blue.png"):
        p.write_bytes(p.read_bytes()[:200])
    (data / "train" / f"{missing}_yellow.png").unlink()

    run = tmp_path / "run"
    run_chain(data, run, "on_bad_image=skip", "cell_model.epochs=1", to_stage=7)

    bad_train = {truncated, missing}
    assert set(pd.read_csv(run / "image_model/skipped.csv", dtype=str)["ID"]) == bad_train
    for split, bad in (("train", bad_train), ("test", {t_truncated})):
        for stage_dir in ("masks", "cams"):
            assert set(pd.read_csv(run / stage_dir / split / "skipped.csv", dtype=str)["ID"]) == bad, (stage_dir, split)
    cells_csv = pd.read_csv(run / "masks/train/cells.csv", dtype={"ID": str}).set_index("ID")
    assert cells_csv.loc[[black, no_nuclei], "n_cells"].tolist() == [0, 0] and not bad_train & set(cells_csv.index)
    assert read_mask(run / "masks/train" / f"{black}_cellmask.png").max() == 0
    table = pd.read_parquet(run / "cells/train.parquet")
    assert not {black, no_nuclei} & set(table["ID"]) and len(table) > 50
    assert not {black, no_nuclei} & set(pd.read_parquet(run / "cycle1/pseudo_labels.parquet")["ID"])
    sub = read_submission(run / "submission.csv")
    assert list(sub) == test  # every test image has a row, the skipped one too
    assert sub[t_black].n_predictions == sub[t_truncated].n_predictions == 0 and sub[test[2]].n_predictions > 0
    assert (sub[t_truncated].width, sub[t_truncated].height) == (128, 128)

    report = json.loads((run / "report.json").read_text())
    problems = report["input_problems"]
    listed = {(s["stage"], s["split"], s["ID"]) for s in problems["skipped"]}
    assert {("01_train_image", "train", i) for i in bad_train} <= listed
    assert {("03_segment", "test", t_truncated), ("02_cam", "test", t_truncated)} <= listed
    assert all(s["reason"] for s in problems["skipped"])
    assert {(c["split"], c["ID"]) for c in problems["no_cells"]} == {("train", black), ("train", no_nuclei),
                                                                    ("test", t_black)}
    md = (run / "report.md").read_text()
    assert "## Images left out or without cells" in md and f"{truncated}_green.png" in md and t_black in md
    # the submission (cycle 1 here) scores as the report's row in both modes, and the segmentation recall counts
    # the true cells of the unreadable test field (no mask) and of the black one (no cell) as missed
    from hpa.eval.gt import read_cell_labels
    from hpa.eval.score import score_submission

    for mode in ("oid", "strict"):
        res, missing = score_submission(run / "submission.csv", data, "test", mode)
        assert not missing and res.map == pytest.approx(report["by_mode"][mode]["methods"]["cycle1"]["mAP"], abs=1e-4)
    truth = read_cell_labels(data, "test")
    seg = report["segmentation"]
    assert (seg["images"], seg["images_without_mask"]) == (len(test), 1)
    assert seg["true_cells"] == sum(len(c) for c in truth.values())
    assert seg["matched"] <= seg["true_cells"] - len(truth[t_black]) - len(truth[t_truncated])


def test_field_size_reads_headers_of_an_undecodable_field(tmp_path):
    from hpa.io.errors import InputError
    from hpa.io.fields import field_size, read_field, write_field

    write_field(tmp_path, "a", np.full((4, 30, 50), 7, np.uint8))
    p = tmp_path / "a_red.png"
    p.write_bytes(p.read_bytes()[:60])  # header kept, pixels cut
    (tmp_path / "a_green.png").unlink()
    with pytest.raises(InputError):
        read_field(tmp_path, "a")
    assert field_size(tmp_path, "a") == (30, 50)
    for p in tmp_path.glob("a_*.png"):
        p.write_bytes(b"\x89PNG broken")
    with pytest.raises(InputError, match=r"image 'a' in .*: no channel file with a readable header: a_red.png"):
        field_size(tmp_path, "a")


# ------------------------------------------------------------------ disk full, no permission
def no_space(*args, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name or ".partial" in p.name)


def test_full_disk_while_writing_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    from hpa.utils import fs as fsutil

    target = tmp_path / "out" / "table.csv"
    fsutil.write_csv(target, pd.DataFrame({"a": [1]}))
    monkeypatch.setattr(fsutil.os, "replace", no_space)  # the data went to the temporary file, the rename fails
    with pytest.raises(OSError, match=rf"could not write {target}: No space left on device") as err:
        fsutil.write_csv(target, pd.DataFrame({"a": [2]}))
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    with pytest.raises(OSError, match=rf"could not write {tmp_path / 'out' / 'b.parquet'}: No space left") as err:
        with fsutil.atomic_path(tmp_path / "out" / "b.parquet") as tmp:
            tmp.write_bytes(b"half a file")  # the write itself fails half-way
            no_space()
    assert pd.read_csv(target)["a"].tolist() == [1] and leftovers(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["table.csv"]


def test_unwritable_output_folder_names_the_path(tmp_path, monkeypatch):
    from hpa.utils import fs as fsutil

    def denied(*args, **kw):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes through chmod: make the file system calls fail as they would
        monkeypatch.setattr(fsutil.tempfile, "mkstemp", denied)
    else:
        folder.chmod(0o555)
    try:
        with pytest.raises(OSError, match=rf"could not write {folder / 'x.json'}: Permission denied") as err:
            fsutil.write_json(folder / "x.json", {"a": 1})
        assert err.value.errno == errno.EACCES
        if os.geteuid() == 0:
            monkeypatch.setattr(fsutil.Path, "mkdir", denied)
        with pytest.raises(OSError, match=rf"cannot create output folder {folder / 'sub'}: Permission denied"):
            fsutil.write_text(folder / "sub" / "y.txt", "y")
    finally:
        folder.chmod(0o755)
    assert list(folder.iterdir()) == []


def test_stage_03_on_a_full_disk_fails_naming_the_mask_and_resumes_once_there_is_space(tmp_path, monkeypatch):
    from tiny_fields import make_tiny_dataset

    from hpa.utils import fs as fsutil

    root = make_tiny_dataset(tmp_path / "data", n=6, size=48)
    args = ["--data", str(root), "--run", str(tmp_path / "run"), "--split", "train", "--profile", "quick",
            "--workers", "1"]
    replace, calls = os.replace, []

    def fills_up(src, dst):
        calls.extend([dst] if str(dst).endswith("mask.png") else [])
        if len(calls) > 5:  # the disk is full after two images and a half (nuclei mask first, then cells)
            no_space()
        replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", fills_up)
    with pytest.raises(OSError, match=r"could not write .*img002_cellmask.png: No space left on device"):
        stage_module("03_segment.py").main(args)
    out = tmp_path / "run" / "masks" / "train"
    assert leftovers(out) == [] and not (out / "img002_cellmask.png").exists() and not (out / "cells.csv").exists()
    monkeypatch.undo()
    stage_module("03_segment.py").main(args)  # space freed: the same command finishes the split
    assert len(pd.read_csv(out / "cells.csv")) == 6 and len(mask_files(out)) == 12 and leftovers(out) == []


def test_field_cache_on_a_full_disk_fails_before_decoding_naming_the_file(tmp_path, monkeypatch):
    from tiny_fields import make_tiny_dataset

    from hpa.data.cache import build_field_cache

    root = make_tiny_dataset(tmp_path / "data", n=4, size=32)
    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    cache = tmp_path / "run" / "cache" / "train_32.npy"
    with pytest.raises(OSError, match=r"could not reserve 0\.0 MiB for .*train_32\.partial\.npy: No space left"):
        build_field_cache(root, "train", [f"img{i:03d}" for i in range(4)], 32, cache, progress=False)
    assert not cache.exists() and leftovers(tmp_path / "run") == []


def test_crop_cache_on_a_full_disk_fails_before_cropping_naming_the_file_and_resumes_once_there_is_space(
        tmp_path, monkeypatch):
    from cell_run import make_run

    from hpa.cells import crops as crops_mod

    run, _, _ = make_run(tmp_path, n_train=3, n_test=0)
    data, masks, out = tmp_path / "data", run / "masks" / "train", run / "cell_cache"
    ids = ["train0", "train1", "train2"]
    jobs = []
    real_job, real_fallocate = crops_mod._crop_job, getattr(os, "posix_fallocate", None)
    monkeypatch.setattr(crops_mod, "_crop_job", lambda args: jobs.append(args[2]) or real_job(args))
    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    # 9 cells x 4 x 128 x 128 uint8 + the 128-byte .npy header = 589,952 bytes = 0.56 MiB to reserve
    with pytest.raises(OSError, match=r"could not reserve 0\.6 MiB for .*/train_128\.partial\.npy: No space left") as err:
        crops_mod.build_crop_cache(data, masks, "train", ids, 128, 0.1, "dim", 0.25, out)
    assert err.value.errno == errno.ENOSPC and jobs == []  # no field was read
    assert leftovers(tmp_path) == [] and list(out.iterdir()) == []
    if real_fallocate is None:
        monkeypatch.delattr(os, "posix_fallocate")
    else:
        monkeypatch.setattr(os, "posix_fallocate", real_fallocate)
    crops, index = crops_mod.build_crop_cache(data, masks, "train", ids, 128, 0.1, "dim", 0.25, out)  # space freed
    assert jobs == ids and crops.shape == (9, 4, 128, 128) and len(index) == 9
    assert sorted(p.name for p in out.iterdir()) == ["train_128.json", "train_128.npy", "train_128.parquet"]
