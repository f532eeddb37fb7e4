"""Sharded per-image stages: N shards joined give exactly what one unsharded run gives.

Stages 04 and 06 build their cell tables per image; here the fields, masks (stage 03), CAMs
(stage 02), a random image model and field cache (stage 01: the cell table's isolated-cell
probabilities; train read from the cache, test decoded) and test cell probabilities (stage 05)
are made by hand for a few 64-px images, so every run takes about a second. Stage 03's
library-level merge is tested in test_segment.py; its command line (--shard, --merge) here.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hpa.cam.maps import save_cam
from hpa.constants import CLASS_NAMES, NUM_CLASSES
from hpa.data.cache import build_field_cache, cache_path
from hpa.engine.checkpoint import save_checkpoint
from hpa.io.errors import InputError
from hpa.io.fields import write_field, write_mask
from hpa.models.factory import build_model
from hpa.pipeline.pseudo_labels import build_cell_table_shard, cell_table, cell_table_path, merge_cell_tables
from hpa.utils.shards import shard_path, shard_sets

ROOT = Path(__file__).resolve().parents[2]
EMPTY = {"train": {1, 4}, "test": {2}}  # images without cells: a shard may hold no rows at all
SKIPPED = {"train": "tr5", "test": None}  # recorded as skipped by stage 03: left out everywhere


def _stage(name: str):
    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), ROOT / "stages" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _make_run(root: Path, n_train: int = 7, n_test: int = 5) -> tuple[Path, Path]:
    """``(data, run)``: fields, labels, masks, CAMs, image model, train field cache, cycle-1 test cell probabilities."""
    rng = np.random.default_rng(3)
    data, run = root / "data", root / "run"
    data.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        ids = [f"{split[:2]}{k}" for k in range(n)]
        labels = [sorted(rng.choice(NUM_CLASSES, size=1 + k % 2, replace=False).tolist()) for k in range(n)]
        for k, image_id in enumerate(ids):
            if image_id == SKIPPED[split]:
                continue
            mask = np.zeros((64, 64), np.int32)
            if k not in EMPTY[split]:
                for c in range(1 + k % 3):
                    y, x = 4 + 20 * c, int(rng.integers(2, 40))
                    mask[y:y + 16, x:x + 20] = c + 1
            write_mask(run / "masks" / split / f"{image_id}_cellmask.png", mask)
            field = rng.integers(0, 40, (4, 64, 64), dtype=np.uint8)
            field[1][mask > 0] += 120
            write_field(data / split, image_id, field)
            classes = labels[k] if split == "train" else list(range(NUM_CLASSES))
            cams = rng.normal(0, 1, (len(classes), 4, 4)).astype(np.float32)
            probs = rng.uniform(0, 1, NUM_CLASSES).astype(np.float32)
            save_cam(run / "cams" / split / f"{image_id}.npz", cams, classes, probs, np.log(probs / (1 - probs)))
        if split == "train":
            pd.DataFrame({"ID": ids, "Label": ["|".join(map(str, lab)) for lab in labels]}).to_csv(
                data / "train.csv", index=False)
        else:
            pd.DataFrame({"ID": ids}).to_csv(data / "test.csv", index=False)
    pd.DataFrame({"ID": [SKIPPED["train"]], "reason": ["unreadable"]}).to_csv(
        run / "masks" / "train" / "skipped.csv", index=False)
    train_ids = [f"tr{k}" for k in range(n_train) if f"tr{k}" != SKIPPED["train"]]
    build_field_cache(data, "train", train_ids, 64, cache_path(run, "train", 64), progress=False)
    torch.manual_seed(0)
    model = build_model("resnet18", output_stride=16, image_size=64)
    meta = {"arch": "resnet18", "num_classes": NUM_CLASSES, "in_channels": 4, "output_stride": 16, "dropout": 0.2,
            "image_size": 64, "task": "multilabel", "class_names": list(CLASS_NAMES), "mean": [0.1] * 4,
            "std": [0.2] * 4, "epochs": 1, "normalize": True}
    save_checkpoint(run / "image_model" / "model.pt", {"model": model.state_dict(), "meta": meta, "history": []})
    cells = cell_table(run, data, "test", 0.25, 512)  # only to list the test cells for the probabilities
    probs = rng.dirichlet(np.ones(NUM_CLASSES), len(cells)).astype(np.float32)
    out = pd.concat([cells[["ID", "cell_id"]], pd.DataFrame(probs, columns=[f"p{c}" for c in range(NUM_CLASSES)])],
                    axis=1)
    (run / "cycle1").mkdir()
    out.to_parquet(run / "cycle1" / "cell_probs_test.parquet", index=False)
    cell_table_path(run, "test").unlink()
    return data, run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("shards"))


@pytest.fixture
def two_runs(base, tmp_path):
    """The same inputs in two run folders: one for the unsharded run, one for the shards."""
    data, run = base
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    shutil.copytree(run, one)
    shutil.copytree(run, sharded)
    return data, one, sharded


def test_shard_paths_and_sets(tmp_path):
    path = tmp_path / "cells" / "train.parquet"
    assert shard_path(path, (0, 1)) == path
    assert shard_path(path, (2, 4)).name == "train.shard-2-of-4.parquet"
    for shard in ((0, 2), (1, 2), (3, 4)):
        shard_path(path, shard).parent.mkdir(exist_ok=True)
        shard_path(path, shard).touch()
    (path.parent / ".train.shard-0-of-4.x1.tmp.parquet").touch()  # a write in progress is no shard
    assert shard_sets(path) == {2: [0, 1], 4: [3]}


def test_three_shards_joined_equal_the_table_of_one_process(two_runs):
    data, one, sharded = two_runs
    for split in ("train", "test"):
        whole = cell_table(one, data, split, 0.25, 512)
        for i in range(3):
            assert not cell_table_path(sharded, split).is_file()  # written only once all shards exist
            build_cell_table_shard(sharded, data, split, (i, 3), 0.25, 512)
        if split == "train":  # shard 1 holds only images without cells; tr5 was skipped by stage 03
            assert pd.read_parquet(cell_table_path(sharded, split, (1, 3))).empty
            assert "tr5" not in set(whole["ID"]) and len(whole) > 0
        joined = pd.read_parquet(cell_table_path(sharded, split))
        assert whole["view_p0"].notna().all()  # isolated-cell probabilities: train from the cache, test decoded
        pd.testing.assert_frame_equal(whole, joined)
        pd.testing.assert_frame_equal(whole, merge_cell_tables(sharded, data, split, 3))


def test_missing_or_ambiguous_shards_are_clear_errors(two_runs):
    data, _, sharded = two_runs
    build_cell_table_shard(sharded, data, "train", (0, 2), 0.25, 512)
    with pytest.raises(FileNotFoundError, match=r"train.shard-1-of-2.parquet"):
        merge_cell_tables(sharded, data, "train", 2)
    with pytest.raises(InputError, match=r"N=2: missing \['train.shard-1-of-2.parquet'\].*--force"):
        cell_table(sharded, data, "train", 0.25, 512)  # an unsharded run does not guess
    assert len(cell_table(sharded, data, "train", 0.25, 512, force=True))  # --force: built in one process


def test_stage04_shards_then_unsharded_run_gives_the_same_labels(two_runs):
    data, one, sharded = two_runs
    stage = _stage("04_pseudo_label.py")
    common = ["--data", str(data), "--profile", "quick"]
    stage.main(["--run", str(one), "--cycle", "1", *common])
    for i in range(2):
        stage.main(["--run", str(sharded), "--shard", f"{i}/2", *common])
    cell_table_path(sharded, "train").unlink()  # as if the last shard died before joining: the run joins
    stage.main(["--run", str(sharded), "--cycle", "1", *common])
    for rel in ("cells/train.parquet", "cycle1/pseudo_labels.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(one / rel), pd.read_parquet(sharded / rel))
    report = "cycle1/pseudo_report.json"
    assert (one / report).read_text() == (sharded / report).read_text()
    stage.main(["--run", str(sharded), "--cycle", "1", "--merge", "2", *common])  # explicit merge: same again
    pd.testing.assert_frame_equal(pd.read_parquet(one / "cycle1/pseudo_labels.parquet"),
                                  pd.read_parquet(sharded / "cycle1/pseudo_labels.parquet"))
    with pytest.raises(SystemExit):
        stage.main(["--run", str(sharded), *common])  # no --cycle and no --shard


def test_stage04_stopped_between_its_two_outputs_writes_both_on_rerun(two_runs, monkeypatch):
    """pseudo_labels.parquet marks the cycle as done (a re-run skips it), so it is written last: stopped
    after the first of the two files, the same command again ends with both, as an uninterrupted run."""
    from hpa.pipeline import pseudo_labels as pl

    data, one, two = two_runs
    stage = _stage("04_pseudo_label.py")
    common = ["--cycle", "1", "--data", str(data), "--profile", "quick"]
    stage.main(["--run", str(one), *common])

    class Stop(Exception):
        pass

    def stopping(write):
        def wrapped(path, obj):
            write(path, obj)
            if Path(path).parent == two / "cycle1":
                raise Stop(path)
        return wrapped

    monkeypatch.setattr(pl, "write_parquet", stopping(pl.write_parquet))
    monkeypatch.setattr(pl, "write_json", stopping(pl.write_json))
    with pytest.raises(Stop):
        stage.main(["--run", str(two), *common])
    monkeypatch.undo()
    assert [p.name for p in (two / "cycle1").iterdir() if p.name.startswith("pseudo")] == ["pseudo_report.json"]
    stage.main(["--run", str(two), *common])
    pd.testing.assert_frame_equal(pd.read_parquet(one / "cycle1/pseudo_labels.parquet"),
                                  pd.read_parquet(two / "cycle1/pseudo_labels.parquet"))
    assert (one / "cycle1/pseudo_report.json").read_text() == (two / "cycle1/pseudo_report.json").read_text()


def test_stage06_shards_merged_give_the_same_predictions_and_submission(two_runs):
    data, one, sharded = two_runs
    stage = _stage("06_predict.py")
    common = ["--data", str(data), "--profile", "quick"]
    stage.main(["--run", str(one), *common])
    for i in range(2):
        stage.main(["--run", str(sharded), "--shard", f"{i}/2", *common])
    assert not (sharded / "submission.csv").exists()  # shards build cell tables only
    stage.main(["--run", str(sharded), "--merge", "2", *common])
    for rel in ("cells/test.parquet", "predictions_test.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(one / rel), pd.read_parquet(sharded / rel))
    sub = (one / "submission.csv").read_text()
    assert sub == (sharded / "submission.csv").read_text()
    assert len(sub.splitlines()) == 1 + 5  # header + every test image, the one without cells too


def test_stage03_command_line_shards_and_merge(tmp_path):
    spec = importlib.util.spec_from_file_location("segment_helpers", ROOT / "tests" / "segment" / "test_segment.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)  # by path: the module runs alone too, not only after tests/segment
    _write_split = helpers._write_split

    ids = _write_split(tmp_path / "data", n=3)
    stage = _stage("03_segment.py")
    common = ["--data", str(tmp_path / "data"), "--split", "test", "--profile", "quick", "--workers", "1"]
    stage.main(["--run", str(tmp_path / "one"), *common])
    stage.main(["--run", str(tmp_path / "sharded"), "--shard", "1/2", *common])
    out = tmp_path / "sharded" / "masks" / "test"
    assert not (out / "cells.csv").exists()
    with pytest.raises(SystemExit, match="03_segment: error: .*cells.shard-0-of-2.csv"):  # a one-line error
        stage.main(["--run", str(tmp_path / "sharded"), "--merge", "2", *common])
    stage.main(["--run", str(tmp_path / "sharded"), "--shard", "0/2", *common])  # the last shard merges
    a = pd.read_csv(tmp_path / "one" / "masks" / "test" / "cells.csv", dtype={"ID": str}).drop(columns="seconds")
    b = pd.read_csv(out / "cells.csv", dtype={"ID": str}).drop(columns="seconds")
    assert list(b["ID"]) == ids
    pd.testing.assert_frame_equal(a, b)
    (out / "cells.csv").unlink()
    stage.main(["--run", str(tmp_path / "sharded"), "--merge", "2", *common])
    pd.testing.assert_frame_equal(a, pd.read_csv(out / "cells.csv", dtype={"ID": str}).drop(columns="seconds"))


def test_stage04_top_cell_per_label_gives_every_image_class_a_cell(two_runs):
    """pseudo.top_cell_per_label: the rule's labels stay; each image class no cell took goes to the image's
    cell with the most evidence for it (a left-out or Negative cell is relabelled, a positive one extended)."""
    import json

    data, plain, top = two_runs
    stage = _stage("04_pseudo_label.py")
    common = ["--cycle", "1", "--data", str(data), "--profile", "quick"]
    stage.main(["--run", str(plain), *common])
    stage.main(["--run", str(top), *common, "pseudo.top_cell_per_label=true"])
    a = pd.read_parquet(plain / "cycle1/pseudo_labels.parquet").set_index(["ID", "cell_id"])
    b = pd.read_parquet(top / "cycle1/pseudo_labels.parquet").set_index(["ID", "cell_id"])
    kept = a.index[a["label"] != NUM_CLASSES - 1]  # the rule's positive cells keep their label
    assert (b.loc[kept, "label"] == a.loc[kept, "label"]).all()
    labels = pd.read_csv(data / "train.csv").set_index("ID")["Label"]
    cells = cell_table(top, data, "train", 0.25, 512)
    for image_id, group in b.reset_index().groupby("ID"):
        shown = {int(c) for s in group["labels"] for c in str(s).split("|")}
        wanted = {int(c) for c in labels[image_id].split("|")} - {NUM_CLASSES - 1}
        assert wanted <= shown, image_id
    assert len(cells.ID.unique()) == b.reset_index().ID.nunique()
    report = json.loads((top / "cycle1/pseudo_report.json").read_text())["top_cell_per_label"]
    assert sum(report["relabelled"]) + sum(report["added_to_sets"]) > 0
    assert "top_cell_per_label" not in json.loads((plain / "cycle1/pseudo_report.json").read_text())
