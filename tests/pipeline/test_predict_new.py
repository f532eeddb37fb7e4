"""Stage 08 (hpa.pipeline.predict_new): new fields answered with a trained quick-profile run.

One quick run is built for the module (synthetic data, ``run_all.sh --profile quick``, as
tests/pipeline/test_end_to_end.py does) and every test predicts from it.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from shared_data import HPA_PORTAL, needs

from hpa.cells.table import cell_geometry
from hpa.config import load_run_config, parse_overrides
from hpa.constants import CHANNELS, CLASS_NAMES
from hpa.eval.score import score_submission
from hpa.eval.submission import read_submission
from hpa.io.errors import InputError
from hpa.io.fields import read_field
from hpa.pipeline.predict_new import CONF_COLS, PREDICTION_COLS, RANK_COLS, find_fields, predict_new
from hpa.segment import get_segmenter

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``(data, run)``: a finished quick-profile run on 24 + 8 synthetic 128-px fields."""
    base = tmp_path_factory.mktemp("quick")
    data, run = base / "data", base / "run"
    env = dict(os.environ, HPA_VENV=sys.prefix)
    subprocess.run([sys.executable, "-m", "hpa.synth", str(data), "--n-train", "24", "--n-test", "8", "--size", "128",
                    "--seed", "0"], cwd=ROOT, check=True, env=env, capture_output=True)
    proc = subprocess.run(["bash", "run_all.sh", "--profile", "quick", "--data", str(data), "--run", str(run)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, run


def _cfg(run, *overrides):
    return load_run_config(run).merged(parse_overrides(list(overrides)))


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _triples(path: Path) -> dict:
    """``{(ID, mask string, class): confidence}`` of a submission file."""
    out = {}
    for _, row in pd.read_csv(path, dtype=str, keep_default_na=False).iterrows():
        t = row["PredictionString"].split()
        for c, conf, mask in zip(t[0::3], t[1::3], t[2::3]):
            out[(row["ID"], mask, int(c))] = float(conf)
    return out


def _rounded(src: Path, dst: Path, digits: int = 4) -> Path:
    df = pd.read_csv(src, dtype=str, keep_default_na=False)
    df["PredictionString"] = [" ".join(f"{c} {float(v):.{digits}f} {m}" for c, v, m in zip(t[0::3], t[1::3], t[2::3]))
                              for t in (s.split() for s in df["PredictionString"])]
    df.to_csv(dst, index=False)
    return dst


def test_the_runs_own_test_split_gives_its_submission(quick, tmp_path):
    data, run = quick
    before = _snapshot(run)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "stages/08_predict_new.py", "--run", str(run), "--data", str(data), "--out",
                           str(out), "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 field(s) answered, 0 done before, 0 skipped (cycle-2 cell model)" in proc.stdout
    assert _snapshot(run) == before  # nothing written into RUN
    ids = pd.read_csv(data / "test.csv")["ID"].tolist()
    for rel in ["submission.csv", "cell_predictions.csv", "skipped.csv", "viewer/index.html", "settings.json",
                "config.yaml", "logs/08_predict_new.log"] + [f"viewer/{i}.png" for i in ids]:
        assert (out / rel).is_file(), rel
    assert list(read_submission(out / "submission.csv")) == ids
    # same masks (every cell's mask string), same confidences up to float32 rounding
    theirs, ours = _triples(run / "submission.csv"), _triples(out / "submission.csv")
    assert set(ours) == set(theirs) and len(ours) == 19 * len(pd.read_parquet(run / "predictions_test.parquet"))
    assert max(abs(ours[k] - theirs[k]) for k in ours) < 1e-6
    # the ranking confidences (predict.rank_combine, product_max by default) equal stage 06's rank* columns
    mine = pd.read_csv(out / "cell_predictions.csv", dtype={"ID": str})
    run_preds = pd.read_parquet(run / "predictions_test.parquet")
    both = mine.merge(run_preds, on=["ID", "cell_id"], suffixes=("", "_06"))
    assert len(both) == len(mine) == len(run_preds) and _cfg(run).predict.rank_combine == "product_max"
    np.testing.assert_allclose(both[RANK_COLS].to_numpy(), both[[f"{c}_06" for c in RANK_COLS]].to_numpy(),
                               rtol=0, atol=1e-6)
    # the score: the quick profile's cell model gives every cell the same probabilities, so the cells tie and the
    # raw mAP hangs on the order of values 1e-8 apart (batches of another size); compared at 4 decimals
    a = score_submission(_rounded(run / "submission.csv", tmp_path / "a.csv"), data)[0].map
    b = score_submission(_rounded(out / "submission.csv", tmp_path / "b.csv"), data)[0].map
    assert abs(a - b) <= 0.002, (a, b)
    with pytest.raises(InputError, match="inside the run"):
        predict_new(run, data, run / "answers", _cfg(run), progress=False)


def test_flat_folder_cells_resume_shards_and_settings(quick, tmp_path):
    data, run = quick
    flat = tmp_path / "flat"
    flat.mkdir()
    ids = ["syn-test-00003", "syn-test-00001", "syn-test-00006"]
    for i in ids:
        for ch in CHANNELS:
            shutil.copy(data / "test" / f"{i}_{ch}.png", flat / f"{i}_{ch}.png")
    assert find_fields(flat).ids == sorted(ids) and find_fields(flat).source.startswith("file names")
    out, cfg = tmp_path / "out", _cfg(run)
    stats = predict_new(run, flat, out, cfg, progress=False)
    assert (stats["computed"], stats["done_before"], stats["skipped"], stats["complete"]) == (3, 0, 0, True)
    pred = pd.read_csv(out / "cell_predictions.csv")
    assert list(pred.columns) == PREDICTION_COLS
    seg = get_segmenter("classical", **cfg.segment.classical.to_dict())
    expect = []
    for i in sorted(ids):
        geo = cell_geometry(seg.segment(read_field(flat, i))[0])
        geo.insert(0, "ID", i)
        expect.append(geo)
    expect = pd.concat(expect, ignore_index=True)
    assert len(pred) == len(expect) > 0  # one row per segmented cell
    cols = ["ID", "cell_id", "x0", "y0", "x1", "y1", "area"]
    assert pred[cols].equals(expect[cols])
    conf = pred[CONF_COLS].to_numpy()
    assert (pred["top_class"].to_numpy() == conf.argmax(1)).all()
    np.testing.assert_array_equal(pred["top_confidence"].to_numpy(), conf.max(1))
    assert pred["top_class_name"].tolist() == [CLASS_NAMES[c] for c in pred["top_class"]]
    sub = read_submission(out / "submission.csv")
    assert list(sub) == sorted(ids) and all(sub[i].n_predictions == 19 * (pred["ID"] == i).sum() for i in ids)
    first = (out / "submission.csv").read_bytes(), (out / "cell_predictions.csv").read_bytes()
    # resume: a field whose record is gone is answered again, the others are kept; same outputs
    (out / "fields" / "syn-test-00003.json").unlink()
    stats = predict_new(run, flat, out, cfg, progress=False)
    assert (stats["computed"], stats["done_before"]) == (1, 2)
    assert ((out / "submission.csv").read_bytes(), (out / "cell_predictions.csv").read_bytes()) == first
    # shards: the summary files come with the last shard, equal to one process's
    out2 = tmp_path / "out2"
    assert not predict_new(run, flat, out2, cfg, shard=(0, 2), progress=False)["complete"]
    assert not (out2 / "submission.csv").exists()
    assert predict_new(run, flat, out2, cfg, shard=(1, 2), progress=False)["complete"]
    assert ((out2 / "submission.csv").read_bytes(), (out2 / "cell_predictions.csv").read_bytes()) == first
    # other settings in the same folder: an error naming them
    with pytest.raises(InputError, match="combine: 'cell' -> 'product'"):
        predict_new(run, flat, out, _cfg(run, "predict.combine=product"), progress=False)
    # a CSV of IDs picks fields and their order
    pd.DataFrame({"ID": ["syn-test-00006", "syn-test-00001"]}).to_csv(tmp_path / "ids.csv", index=False)
    assert find_fields(flat, ids_csv=tmp_path / "ids.csv").ids == ["syn-test-00006", "syn-test-00001"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no fields in"):
        find_fields(tmp_path / "empty")


def _colour_jpeg(path: Path, channel: np.ndarray, stain: str) -> None:
    """One stain as the HPA website stores it: an RGB JPEG with the signal in its colour's planes."""
    rgb = np.zeros(channel.shape + (3,), np.uint8)
    planes = {"red": [0], "green": [1], "blue": [2], "yellow": [0, 1]}[stain]
    for p in planes:
        rgb[..., p] = channel
    cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])


def test_colour_jpeg_fields(quick, tmp_path):
    data, run = quick
    folder = tmp_path / "jpg"
    folder.mkdir()
    for i in ("syn-test-00002", "syn-test-00004"):
        field = read_field(data / "test", i)
        for c, ch in enumerate(CHANNELS):
            _colour_jpeg(folder / f"{i}_{ch}.jpg", field[c], ch)
        back = read_field(folder, i)  # each stain comes back as the maximum over its file's colour planes
        assert back.shape == field.shape and back.dtype == np.uint8
        for c, ch in enumerate(CHANNELS):
            np.testing.assert_array_equal(back[c], cv2.imread(str(folder / f"{i}_{ch}.jpg")).max(-1))
        # close to the PNG it came from, up to JPEG's loss (colour planes are stored at half resolution)
        assert np.corrcoef(back.ravel().astype(float), field.ravel().astype(float))[0, 1] > 0.95
    stats = predict_new(run, folder, tmp_path / "out", _cfg(run), progress=False)
    assert stats["computed"] == 2 and stats["skipped"] == 0
    pred = pd.read_csv(tmp_path / "out" / "cell_predictions.csv")
    assert set(pred["ID"]) == {"syn-test-00002", "syn-test-00004"} and len(pred) > 5


@needs(HPA_PORTAL)
def test_real_website_jpegs(quick, tmp_path):
    _, run = quick
    stats = predict_new(run, HPA_PORTAL, tmp_path / "out", _cfg(run), progress=False)
    assert stats["computed"] == 2
    sub = read_submission(tmp_path / "out" / "submission.csv")
    assert {i: (s.width, s.height) for i, s in sub.items()} == {"800_A6_1": (2048, 2048), "89_B5_1": (1728, 1728)}
    assert all(s.n_masks >= 3 for s in sub.values())  # cells found in both fields


def test_bad_fields_stop_or_are_skipped(quick, tmp_path):
    data, run = quick
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in ("syn-test-00001", "syn-test-00002", "syn-test-00005"):
        for ch in CHANNELS:
            shutil.copy(data / "test" / f"{i}_{ch}.png", flat / f"{i}_{ch}.png")
    green = flat / "syn-test-00002_green.png"
    green.write_bytes(green.read_bytes()[:200])  # truncated: the header reads, the pixels do not
    out = tmp_path / "out"
    with pytest.raises(InputError, match="syn-test-00002_green.png: cannot read image"):
        predict_new(run, flat, out, _cfg(run), progress=False)
    (flat / "syn-test-00005_yellow.png").unlink()
    # a missing channel is found before any work, and the command ends with one line naming it
    proc = subprocess.run([sys.executable, "stages/08_predict_new.py", "--run", str(run), "--data", str(flat), "--out",
                           str(tmp_path / "out_cli"), "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 1
    assert "08_predict_new: error: 1 of 3 images lack channel files" in proc.stderr
    assert "syn-test-00005_yellow" in proc.stderr and not (tmp_path / "out_cli" / "fields").exists()
    stats = predict_new(run, flat, out, _cfg(run, "on_bad_image=skip"), progress=False)
    assert (stats["computed"], stats["done_before"], stats["skipped"], stats["complete"]) == (2, 1, 2, True)
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped["ID"].tolist() == ["syn-test-00002", "syn-test-00005"]
    assert "cannot read image" in skipped["reason"][0] and "missing channel" in skipped["reason"][1]
    sub = read_submission(out / "submission.csv")
    assert list(sub) == ["syn-test-00001", "syn-test-00002", "syn-test-00005"]
    assert sub["syn-test-00002"].n_predictions == 0 and (sub["syn-test-00002"].width, sub["syn-test-00002"].height) == (128, 128)
    assert sub["syn-test-00001"].n_predictions > 0
    assert set(pd.read_csv(out / "cell_predictions.csv")["ID"]) == {"syn-test-00001"}
    assert "skipped: " in (out / "viewer" / "index.html").read_text()
