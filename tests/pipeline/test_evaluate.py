"""Stage 07's report without cell truth (hpa.pipeline.evaluate.run_summary) and its markdown, by hand."""

import json

import numpy as np
import pandas as pd
import pytest

from hpa.config import build_config
from hpa.constants import PROB_COLS
from hpa.eval.report import render_markdown, summary_table
from hpa.pipeline.evaluate import build_report, cells_per_field, mode_order, top_classes
from hpa.pipeline.predict import CONF_COLS


def probs_frame(rows):
    """[(ID, cell_id or None, {class: p})] -> frame with p0..p18 (0 elsewhere)."""
    out = []
    for image_id, cell, d in rows:
        r = {"ID": image_id, **{c: 0.0 for c in PROB_COLS}}
        if cell is not None:
            r["cell_id"] = cell
        r.update({f"p{k}": v for k, v in d.items()})
        out.append(r)
    return pd.DataFrame(out)


@pytest.fixture()
def run_without_gt(tmp_path):
    """A finished run's files, made by hand: validation fold V1..V3, training image T1, no gt/."""
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    (data / "train.csv").write_text("ID,Label\nV1,0\nV2,1\nV3,0|1\nT1,0\n")
    (run / "image_model").mkdir(parents=True)
    pd.DataFrame({"ID": ["V1", "V2", "V3", "T1"], "fold": [0, 0, 0, 1]}).to_csv(run / "splits.csv", index=False)
    probs_frame([("V1", None, {0: 0.9, 1: 0.3}), ("V2", None, {0: 0.2, 1: 0.8}), ("V3", None, {0: 0.4, 1: 0.1})]).to_csv(
        run / "image_model" / "val_predictions.csv", index=False)
    (run / "cycle1").mkdir()
    probs_frame([("V1", 1, {0: 0.7, 1: 0.1}), ("V1", 2, {0: 0.2, 1: 0.6}), ("V2", 1, {0: 0.1, 1: 0.9}),
                 ("T1", 1, {0: 0.99})]).to_parquet(run / "cycle1" / "cell_probs_train.parquet")  # V3: no cell
    (run / "cells").mkdir()
    pd.DataFrame({"ID": ["V1", "V1", "V2", "T1"], "cell_id": [1, 2, 1, 1]}).to_parquet(run / "cells" / "train.parquet")
    (run / "cycle1" / "pseudo_report.json").write_text(json.dumps(
        {"cycle": 1, "coverage": {"n_cells": 4, "labelled": 0.75, "per_class": [2, 1] + [0] * 17}}))
    for split, n in (("train", [2, 1, 0, 1]), ("test", [3, 1])):
        (run / "masks" / split).mkdir(parents=True)
        pd.DataFrame({"ID": [f"{split}{i}" for i in range(len(n))], "n_cells": n}).to_csv(
            run / "masks" / split / "cells.csv", index=False)
        (run / "masks" / split / "segmenter.json").write_text(json.dumps(
            {"segmenter": "classical", "reason": "auto: no hpacellseg weights set", "settings": {}}))
    conf = np.zeros((4, 19), np.float32)
    conf[0, 0], conf[1, 0], conf[2, 5], conf[3, 18] = 0.8, 0.6, 0.3, 0.9
    pred = pd.DataFrame(conf, columns=CONF_COLS)
    pred.insert(0, "ID", ["test0"] * 3 + ["test1"])
    pred.insert(1, "cell_id", [1, 2, 3, 1])
    pred.insert(2, "model", "cycle2")
    pred.to_parquet(run / "predictions_test.parquet")
    cfg = build_config("quick")
    cfg.data = str(data)
    return run, cfg


def test_report_without_ground_truth_by_hand(run_without_gt):
    run, cfg = run_without_gt
    r = build_report(run, cfg)
    assert r["scored"] is False and "methods" not in r
    lvl = r["summary"]["image_level"]
    assert lvl["n_images"] == 3 and lvl["n_positive"][:3] == [2, 2, 0]
    # image model: class 0 ranks V1 .9 (+), V3 .4 (+), V2 .2 -> AP 1; class 1: V2 .8 (+), V1 .3, V3 .1 (+)
    #   -> AP 1/2 x 1 + 1/2 x 2/3 = 5/6; other classes have no positive image; mAP 11/12
    im = lvl["methods"]["image_model"]
    assert im["ap_per_class"][:2] == pytest.approx([1.0, 5 / 6]) and im["mAP"] == pytest.approx(11 / 12)
    assert im["ap_per_class"][2] is None and im["ap_per_class"][18] is None
    # cycle 1, max over cells (T1 is not in the fold, V3 has no cell: 0): class 0: V1 .7 (+), V2 .1, V3 0 (+)
    #   -> 5/6; class 1: V2 .9 (+), V1 .6, V3 0 (+) -> 5/6
    c1 = lvl["methods"]["cycle1"]
    assert c1["ap_per_class"][:2] == pytest.approx([5 / 6, 5 / 6]) and c1["mAP"] == pytest.approx(5 / 6)
    cov = r["summary"]["pseudo_coverage"]["cycle1"]
    assert cov["eligible"][:2] == [3, 1] and cov["eligible"][18] == 4 and cov["labelled"][:2] == [2, 1]
    assert cov["filled"] is None
    top = r["summary"]["test_top_classes"]
    assert top["counts"][0] == 2 and top["counts"][5] == 1 and top["counts"][18] == 1 and top["model"] == "cycle2"
    assert top["mean_conf"][0] == pytest.approx(0.7) and top["mean_conf"][1] is None
    assert r["summary"]["cells_per_field"]["train"] == {"fields": 4, "no_cells": 1, "min": 0, "median": 1.0,
                                                         "mean": 1.0, "max": 2, "cells": 4}
    md = render_markdown(r)
    for text in ("## Not run (no ground truth)", "## What the run says without cell labels",
                 "- Segmenter (test): `classical`: auto: no hpacellseg weights set",
                 "- Cells per field (train): 4 fields, 4 cells; min 0, median 1, mean 1.0, max 2; 1 field(s) without any cell.",
                 "- Fields skipped as unreadable: 0.", "| **mAP** | | **0.9167** | **0.8333** |",
                 "| 1 Nuclear membrane | 2 | 0.833 | 0.833 |", "| 0 Nucleoplasm | 3 | 2 (67%) |",
                 "| 5 Nuclear bodies | 1 | 25.0% | 0.300 |"):
        assert text in md, text
    assert md.index("## Not run") < md.index("## What the run says")
    assert summary_table(r).startswith("no ground truth")


def test_report_markdown_scores_both_modes_side_by_side():
    def entry(a, b):
        return {"mAP": a, "ap_per_class": [a] + [None] * 18, "ci95": [a - 0.01, b]}

    r = {"run": "R", "data": "D", "profile": "quick", "mode": "strict", "modes": ["strict", "oid"], "combine": "cell",
         "bootstrap": {"resamples": 10}, "submitted": "cycle1",
         "by_mode": {"oid": {"methods": {"broadcast": entry(0.8, 0.85), "cycle1": entry(0.9, 0.95), "oracle": entry(1.0, 1.0)},
                             "steps": [{"from": "broadcast", "to": "cycle1", "gain": 0.1, "ci95": [0.05, 0.15], "p_better": 1.0}],
                             "ablations": {"v1": 0.9, "v2": 0.7}},
                     "strict": {"methods": {"broadcast": entry(0.5, 0.55), "cycle1": entry(0.6, 0.65), "oracle": entry(0.8, 0.8)},
                                "steps": [{"from": "broadcast", "to": "cycle1", "gain": 0.1, "ci95": [-0.01, 0.2], "p_better": 0.9}],
                                "ablations": {"v1": 0.5, "v2": 0.6}}}}
    r.update(r["by_mode"]["strict"])
    md = render_markdown(r)
    assert "| method | what | strict mAP | 95% CI | oid mAP | 95% CI |" in md
    assert "| cycle1 | cycle-1 cell model | 0.6000 | 0.5900-0.6500 | 0.9000 | 0.8900-0.9500 |" in md
    assert "Submitted model `cycle1` reaches 0.750 (strict), 0.900 (oid) of the oracle." in md
    assert "| broadcast -> cycle1 | +0.1000 | -0.0100 to +0.2000 | 90% | +0.1000 | +0.0500 to +0.1500 | 100% |" in md
    assert "### AP per class (strict)" in md and "### AP per class (oid)" in md
    assert "| 0 Nucleoplasm | 0.500 | 0.600 | 0.800 |" in md and "true cells (images)" not in md  # an older report
    r["true_per_class"] = {"cells": [3] + [0] * 18, "images": [2] + [0] * 18}
    md2 = render_markdown(r)
    assert "| class | true cells (images) | broadcast | cycle1 | oracle |" in md2
    assert "| 0 Nucleoplasm | 3 (2) | 0.500 | 0.600 | 0.800 |" in md2
    assert "fewer than 5 true test cells: 0 Nucleoplasm (3)." in md2 and "1/19 = 0.053" in md2
    r["true_per_class"]["cells"][0] = 5
    assert "fewer than 5" not in render_markdown(r)
    assert md.index("| v2 | 0.6000 | 0.7000 |") < md.index("| v1 | 0.5000 | 0.9000 |")  # sorted by the lead mode
    lines = summary_table(r).splitlines()
    assert lines[1].startswith("cycle1     mAP strict=0.6000  oid=0.9000")
    assert mode_order("strict") == ("strict", "oid") and mode_order("oid") == ("oid", "strict")


def test_cells_per_field_and_top_classes_of_nothing():
    assert cells_per_field(pd.DataFrame({"n_cells": []})) == {"fields": 0, "no_cells": 0}
    empty = pd.DataFrame(columns=["ID", "cell_id"] + CONF_COLS)
    assert top_classes(empty)["n_cells"] == 0
