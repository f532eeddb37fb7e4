"""Per-cell answers for one field (hpa.cells.answer): the same numbers as stages 02, 05 and 06 compute."""

import numpy as np
import pytest
import torch

from hpa.cam.methods import compute_cams
from hpa.cells.answer import STEPS, CropSpec, FieldPredictor
from hpa.cells.combine import combine, needs_cell_probs, needs_image_probs, quality_factor, rule_confidences
from hpa.cells.crops import crop_image_cells
from hpa.cells.table import cell_geometry
from hpa.engine.amp import prepare_batch
from hpa.engine.inference import field_probs, predict
from hpa.io.fields import resize_field, to_uint8
from hpa.models.factory import build_model

MEAN, STD = [0.2, 0.25, 0.3, 0.35], [0.1, 0.15, 0.2, 0.25]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    image = build_model("resnet18", output_stride=16, input_norm="per_image").eval()
    cell = build_model("resnet18", output_stride=32).eval()
    with torch.no_grad():
        image.head.bias.uniform_(-1, 1)
        cell.head.bias.uniform_(-1, 1)
    image_meta = {"image_size": 64, "tile": 32, "mean": MEAN, "std": STD, "task": "multilabel", "num_classes": 19,
                  "in_channels": 4}
    cell_meta = {"task": "multiclass", "num_classes": 19, "in_channels": 4, "mean": MEAN, "std": STD, "crop_size": 24,
                 "margin": 0.1, "outside": "dim", "dim_factor": 0.25}
    return image, image_meta, cell, cell_meta


@pytest.fixture(scope="module")
def field_and_mask():
    rng = np.random.default_rng(3)
    field = rng.integers(0, 255, (4, 90, 120)).astype(np.uint8)
    mask = np.zeros((90, 120), np.int32)
    mask[10:40, 10:50] = 1
    mask[50:88, 20:60] = 2
    mask[0:30, 90:120] = 3  # touches the border
    mask[60:64, 100:104] = 4  # small
    return field, mask


def _predictor(models, **kw):
    image, image_meta, cell, cell_meta = models
    return FieldPredictor(cell, cell_meta, image, image_meta, **kw)


@pytest.mark.parametrize("tta", [False, True])
def test_answers_equal_the_stages_arithmetic(models, field_and_mask, tta):
    image, image_meta, cell, cell_meta = models
    field, mask = field_and_mask
    ans = _predictor(models, image_tta_flip=tta, combine="cell", negative="max").predict(field, mask)
    geo = cell_geometry(mask)
    assert ans.cells[["cell_id", "x0", "y0", "x1", "y1", "area"]].equals(geo[["cell_id", "x0", "y0", "x1", "y1", "area"]])
    assert ans.cells["cell_id"].tolist() == [1, 2, 3, 4] and ans.cells["area"].tolist() == [1200, 1520, 900, 16]
    # image probabilities: stage 02's (the cache's uint8 field, normalised, compute_cams' logits)
    x = prepare_batch(torch.from_numpy(to_uint8(resize_field(field, 64)))[None],
                      torch.tensor(MEAN).view(1, -1, 1, 1), torch.tensor(STD).view(1, -1, 1, 1))
    logits, _ = compute_cams(image, x, "cam", tta_flip=tta, tile=32)
    np.testing.assert_allclose(ans.image_probs, 1 / (1 + np.exp(-logits[0].astype(np.float64))), atol=2e-6)
    # cell probabilities: stage 05's crops and predict()
    crops = crop_image_cells(field, mask, geo, 24, 0.1, "dim", 0.25)
    np.testing.assert_array_equal(ans.cell_probs, predict(cell, cell_meta, crops, batch_size=256))
    assert ans.cell_probs.shape == (4, 19) and np.allclose(ans.cell_probs.sum(1), 1, atol=1e-5)
    # the rule: the cell model alone, Negative = max(cell, image), quality penalty
    q = quality_factor(geo["rel_area"], geo["touches_border"])
    expect = combine(np.repeat(ans.image_probs[None], 4, 0), ans.cell_probs, "cell", "max", q)
    np.testing.assert_array_equal(ans.conf, expect)
    assert q[2] == pytest.approx(0.8) and q[3] == pytest.approx(np.sqrt(16 / 1050 / 0.5))  # border; small
    assert set(ans.seconds) == set(STEPS) and all(v >= 0 for v in ans.seconds.values())


def test_field_probs_without_tiles_is_the_sigmoid_of_the_logits(models):
    image = models[0]
    x = torch.rand(2, 4, 32, 32)
    with torch.no_grad():
        expect = torch.sigmoid(image(x)).numpy()
    np.testing.assert_allclose(field_probs(image, x, tile=None), expect, atol=1e-6)
    np.testing.assert_allclose(field_probs(image, x, tile=32), expect, atol=1e-6)  # no larger than a tile


def test_only_what_the_rule_reads_is_computed(models, field_and_mask):
    image, image_meta, cell, cell_meta = models
    field, mask = field_and_mask
    assert needs_image_probs("cell", "max") and not needs_image_probs("cell", "cell")
    assert needs_image_probs("product", "cell") and needs_image_probs("mean", "min_complement")
    assert needs_cell_probs("cell") and not needs_cell_probs("image")
    cell_only = FieldPredictor(cell, cell_meta, None, None, combine="cell", negative="cell").predict(field, mask)
    assert cell_only.image_probs is None and cell_only.seconds["image_model"] == 0.0
    np.testing.assert_array_equal(cell_only.conf[:, 18], (cell_only.cell_probs[:, 18]
                                                          * quality_factor(cell_only.cells["rel_area"],
                                                                           cell_only.cells["touches_border"])))
    image_only = FieldPredictor(None, None, image, image_meta, combine="image", negative="max").predict(field, mask)
    assert image_only.cell_probs is None and image_only.seconds["crops"] == 0.0
    q = quality_factor(image_only.cells["rel_area"], image_only.cells["touches_border"])
    np.testing.assert_allclose(image_only.conf, image_only.image_probs[None] * q[:, None], rtol=1e-6)
    with pytest.raises(ValueError, match="needs the image model"):
        FieldPredictor(cell, cell_meta, None, None, combine="cell", negative="max")
    with pytest.raises(ValueError, match="needs a cell model"):
        FieldPredictor(None, None, image, image_meta, combine="product")


def test_rule_confidences_by_hand():
    img = np.full((1, 19), 0.2, np.float32)
    img[0, 18] = 0.3
    cell = np.full((1, 19), 0.02, np.float32)
    cell[0, 0], cell[0, 18] = 0.6, 0.1
    conf = rule_confidences(img, cell, np.array([0.125]), np.array([True]), "cell", "max", True)
    # quality: sqrt(0.125 / 0.5) = 0.5, x 0.8 at the border
    assert conf[0, 0] == pytest.approx(0.6 * 0.4) and conf[0, 18] == pytest.approx(0.3 * 0.4)
    conf = rule_confidences(img, cell, np.array([0.125]), np.array([True]), "product", "cell", False)
    assert conf[0, 0] == pytest.approx(0.12) and conf[0, 18] == pytest.approx(0.1)
    assert rule_confidences(None, cell, np.array([1.0]), np.array([False]), "cell", "cell", True)[0, 0] == \
        pytest.approx(0.6)
    with pytest.raises(ValueError, match="needs image probabilities"):
        rule_confidences(None, cell, np.array([1.0]), np.array([False]), "cell", "max", True)


def test_a_field_without_cells_and_bad_meta(models, field_and_mask):
    field, _ = field_and_mask
    ans = _predictor(models).predict(field, np.zeros(field.shape[1:], np.int32))
    assert ans.conf.shape == (0, 19) and len(ans.cells) == 0 and ans.cell_probs.shape == (0, 19)
    with pytest.raises(ValueError, match="same size"):
        _predictor(models).predict(field, np.zeros((5, 5), np.int32))
    with pytest.raises(ValueError, match=r"no crop settings \['margin'"):
        CropSpec.from_meta({"crop_size": 32}, "m.pt")
    image, image_meta, cell, cell_meta = models
    with pytest.raises(ValueError, match="multiclass cell model"):
        FieldPredictor(cell, dict(cell_meta, task="multilabel"), image, image_meta)
