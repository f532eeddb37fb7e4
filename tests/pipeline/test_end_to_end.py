"""The whole chain on the quick profile: every stage's outputs exist and the report has all rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_profile_end_to_end(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    env = dict(os.environ, HPA_VENV=sys.prefix)
    subprocess.run([sys.executable, "-m", "hpa.synth", str(data), "--n-train", "24", "--n-test", "8", "--size", "128",
                    "--seed", "0"], cwd=ROOT, check=True, env=env)
    proc = subprocess.run(["bash", "run_all.sh", "--profile", "quick", "--data", str(data), "--run", str(run)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rel in ["config.yaml", "splits.csv", "image_model/model.pt", "image_model/metrics.csv",
                "cams/overlays/index.html", "masks/test/cells.csv", "cells/train.parquet", "cells/test.parquet",
                "cycle1/pseudo_labels.parquet", "cycle2/pseudo_labels.parquet", "cycle1/cell_model/model.pt",
                "cycle2/cell_model/model.pt", "oracle/cell_probs_test.parquet", "submission.csv",
                "report.json", "report.md", "report_ap.png"]:
        assert (run / rel).exists(), rel
    report = json.loads((run / "report.json").read_text())
    assert list(report["methods"]) == ["broadcast", "cam", "cellview", "cycle1", "cycle2", "oracle", "ranking"]
    # every method in both scoring modes; strict only adds false positives (predictions of classes absent from
    # their image), so no class can score higher there than in oid
    assert report["modes"] == ["oid", "strict"] and report["methods"] == report["by_mode"]["oid"]["methods"]
    strict = report["by_mode"]["strict"]["methods"]
    assert list(strict) == list(report["methods"])
    n_lower = 0
    for name, v in report["methods"].items():
        assert v["ci95"][0] <= v["ci95"][1] and strict[name]["ci95"][0] <= strict[name]["ci95"][1]
        for a, b in zip(v["ap_per_class"], strict[name]["ap_per_class"]):
            assert (a is None) == (b is None) and (a is None or b <= a + 1e-12), name
            n_lower += a is not None and b < a - 1e-6
        assert strict[name]["mAP"] <= v["mAP"] + 1e-12
    assert n_lower > 0  # the images do get predictions of classes they lack: the modes differ
    # segmentation recall over every true test cell
    from hpa.eval.gt import read_cell_labels

    seg = report["segmentation"]
    assert seg["images"] == 8 and seg["true_cells"] == sum(len(c) for c in read_cell_labels(data, "test").values())
    assert seg["recall"] >= 0.95 and seg["matched"] == round(seg["recall"] * seg["true_cells"])
    assert [(s["from"], s["to"]) for s in report["steps"]][:4] == [("broadcast", "cam"), ("cam", "cycle1"),
                                                                   ("cycle1", "cycle2"), ("cycle2", "oracle")]
    report_md = (run / "report.md").read_text()
    assert "Does each step add?" in report_md and "learn the cycle-1 cell model's probabilities" in report_md
    # cycle 2 labels every training cell: the rule's labels, and the cells it left out with soft targets (the
    # cycle-1 model's probabilities over their image's classes and Negative)
    cells, pl2 = pd.read_parquet(run / "cells" / "train.parquet"), pd.read_parquet(run / "cycle2" / "pseudo_labels.parquet")
    pr2 = json.loads((run / "cycle2" / "pseudo_report.json").read_text())
    soft = pl2[pl2["t0"].notna()]
    assert len(pl2) == len(cells) and len(soft) == sum(pr2["filled"]["per_class"])
    labels = pd.read_csv(data / "train.csv").set_index("ID")["Label"].astype(str).str.split("|")
    for _, row in soft.iterrows():
        t = row[[f"t{c}" for c in range(19)]].to_numpy(float)
        assert t.sum() == pytest.approx(1.0, abs=1e-4)
        assert set(map(int, labels[row["ID"]])) | {18} >= set(np.flatnonzero(t > 0).tolist())
    assert sum(pr2["filled"]["per_class"]) == round((1 - pr2["coverage"]["labelled"]) * len(cells))
    sub = pd.read_csv(run / "submission.csv")
    assert len(sub) == 8
    # the submission scores through the stand-alone scorer like the report's submitted model, in both modes
    assert report["submitted"] == "cycle2"
    for mode in ("oid", "strict"):
        out = subprocess.run([sys.executable, "-m", "hpa.score", str(run / "submission.csv"), str(data), "--mode", mode],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        assert out.startswith("mAP=")
        assert float(out[4:]) == pytest.approx(report["by_mode"][mode]["methods"]["cycle2"]["mAP"], abs=1e-4), mode
    # the ranking output (rank* columns of predictions_test.parquet) is what the report's ranking row scores
    from hpa.eval.benchmark import score_methods
    from hpa.pipeline.predict import RANK_COLS

    preds = pd.read_parquet(run / "predictions_test.parquet")
    res = score_methods(run, data, preds, {"ranking": preds[RANK_COLS].to_numpy()}, ("oid", "strict"))
    for mode in ("oid", "strict"):
        assert res[mode]["ranking"]["mAP"] == pytest.approx(report["by_mode"][mode]["methods"]["ranking"]["mAP"], abs=1e-12)
    # a re-run resumes: nothing is retrained and the report is the same
    proc = subprocess.run(["bash", "run_all.sh", "--profile", "quick", "--data", str(data), "--run", str(run)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "report.json").read_text())["methods"] == report["methods"]
    # the held-out cell benchmark scores the run's cell models on fresh fields through the run's own stages
    out = subprocess.run([sys.executable, "benchmarks/cell_heldout.py", "--run", str(run), "--n", "4", "--seed", "9",
                          "--bootstrap", "5"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {ln.split()[0]: float(ln.split()[1]) for ln in out.stdout.splitlines()
            if ln.split() and ln.split()[0] in ("broadcast", "cycle1", "cycle2", "oracle")}
    assert set(rows) == {"broadcast", "cycle1", "cycle2", "oracle"} and all(0 <= v <= 1 for v in rows.values())
    assert (run / "heldout_seed9" / "run" / "masks" / "test" / "cells.csv").is_file()


@pytest.mark.slow
def test_quick_profile_without_ground_truth(tmp_path):
    """A folder like a user's (no gt/): every stage that needs no truth runs and the submission is complete."""
    import shutil

    from hpa.eval.submission import read_submission
    from hpa.io.fields import read_mask

    data, run = tmp_path / "data", tmp_path / "run"
    env = dict(os.environ, HPA_VENV=sys.prefix)
    subprocess.run([sys.executable, "-m", "hpa.synth", str(data), "--n-train", "24", "--n-test", "6", "--size", "128",
                    "--seed", "1"], cwd=ROOT, check=True, env=env)
    shutil.rmtree(data / "gt")
    extra = tmp_path / "extra.yaml"  # settings through run_all.sh: a file and key=value, given to every stage
    extra.write_text("predict:\n  small_cell_penalty: false\n")
    proc = subprocess.run(["bash", "run_all.sh", "--profile", "quick", "--data", str(data), "--run", str(run),
                           "--config", str(extra), "segment.segmenter=classical", "pseudo.view_weight=0.5"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "oracle skipped" in proc.stdout and not (run / "oracle").exists()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["predict"]["small_cell_penalty"] is False and saved["segment"]["segmenter"] == "classical"
    assert saved["pseudo"]["view_weight"] == 0.5 and saved["profile"] == "quick"
    report = json.loads((run / "report.json").read_text())
    assert report["scored"] is False and "oracle cell model (stage 05 --oracle)" in report["not_run"]
    assert "## Not run (no ground truth)" in (run / "report.md").read_text()
    card = (run / "model_card.md").read_text()  # stage 07's model card names the command for new fields
    assert "08_predict_new.py" in card and str(run) in card
    sub = read_submission(run / "submission.csv")
    test_ids = pd.read_csv(data / "test.csv")["ID"].astype(str).tolist()
    assert list(sub) == test_ids
    for image_id in test_ids:  # every segmented cell is predicted, for every class
        mask = read_mask(run / "masks" / "test" / f"{image_id}_cellmask.png")
        n_cells = len(np.unique(mask[mask > 0]))
        s = sub[image_id]
        assert (s.width, s.height) == (mask.shape[1], mask.shape[0])
        assert s.n_masks == n_cells and s.n_predictions == 19 * n_cells
