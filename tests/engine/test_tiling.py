"""Tiled inference for crop-trained models: tile positions, probabilities, stitched CAMs, the callers."""

import numpy as np
import pytest
import torch

from hpa.cam.methods import compute_cams, head_bias, image_cams
from hpa.engine.inference import predict
from hpa.engine import tiling
from hpa.engine.inference import field_probs
from hpa.engine.tiling import (forward_in_passes, make_tiles, mean_tile_probs, pass_size, prob_logit, stitch, tile_starts,
                               tiled_probs)
from hpa.models.factory import build_model


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = build_model("resnet18", output_stride=16).eval()
    with torch.no_grad():
        model.head.bias.uniform_(-0.5, 0.5)
    return model


def test_tile_starts_cover_the_field_and_end_flush():
    assert tile_starts(128, 64) == [0, 32, 64]
    assert tile_starts(100, 64, 32) == [0, 32, 36]
    assert tile_starts(64, 64) == [0] and tile_starts(40, 64) == [0]
    assert tile_starts(256, 64, 64) == [0, 64, 128, 192]
    with pytest.raises(ValueError, match="must be >= 1"):
        tile_starts(128, 0)


def test_make_tiles_cuts_image_major_and_mean_probs_average_them():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    tiles, offsets = make_tiles(x, 4, 2)
    assert offsets == [(0, 0), (0, 2), (2, 0), (2, 2)] and tiles.shape == (8, 1, 4, 4)
    assert torch.equal(tiles[5], x[1, :, 0:4, 2:6]) and torch.equal(tiles[2], x[0, :, 2:6, 0:4])
    z = torch.tensor([[0.0], [2.0], [-2.0], [0.0], [1.0], [1.0], [1.0], [1.0]])
    p = mean_tile_probs(z, 2)
    assert p.shape == (2, 1) and p[0, 0] == pytest.approx(0.5) and p[1, 0] == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())
    assert float(prob_logit(torch.tensor(0.75))) == pytest.approx(np.log(3.0))
    with pytest.raises(ValueError, match="smaller than the 8-px tile"):
        make_tiles(x, 8)


def test_stitch_places_and_averages_tile_maps():
    # two 2x2 tile maps of a field whose grid is 3 wide: offsets 0 and 1 cell apart overlap in the middle column
    maps = np.zeros((1, 2, 1, 2, 2), np.float32)
    maps[0, 0], maps[0, 1] = 1.0, 3.0
    out = stitch(maps, [(0, 0), (0, 16)], (32, 48), tile=32)
    assert out.shape == (1, 1, 2, 3)
    np.testing.assert_allclose(out[0, 0], [[1, 2, 3], [1, 2, 3]])


def test_tiled_probabilities_and_cams_agree_with_tiles_run_one_by_one(resnet):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 96, 96)
    with torch.no_grad():
        ref = torch.stack([torch.sigmoid(resnet(x[:, :, a:a + 64, b:b + 64])) for a in (0, 32) for b in (0, 32)]).mean(0)
    p = tiled_probs(resnet, x, 64)
    torch.testing.assert_close(p, ref, atol=1e-5, rtol=1e-4)
    logits, cams = compute_cams(resnet, x, tile=64)
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), ref.numpy(), atol=1e-5)
    assert cams.shape == (2, 19, 6, 6)  # the 96-px field's grid at stride 16
    _, tile_cams = compute_cams(resnet, x[:, :, 32:96, 0:64])  # the bottom-left tile alone
    corner = cams[:, :, 4:6, 0:2]  # cells only that tile covers
    np.testing.assert_allclose(corner, tile_cams[:, :, 2:4, 0:2], atol=1e-4)
    # each tile's map still sums to its own logit: the corner tile's logit from its map
    with torch.no_grad():
        z = resnet(x[:, :, 32:96, 0:64]).numpy()
    np.testing.assert_allclose(tile_cams.mean((2, 3)) + head_bias(resnet), z, atol=1e-4)
    # without tiling (field no larger than the tile) nothing changes
    small = x[:, :, :64, :64]
    a, b = compute_cams(resnet, small, tile=64), compute_cams(resnet, small)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_cpu_passes_give_the_values_of_one_pass(resnet, monkeypatch):
    torch.manual_seed(2)
    x = torch.randn(3, 4, 96, 96)
    assert pass_size(x) == tiling.CPU_PASS_PIXELS // (96 * 96) and pass_size(torch.randn(1, 4, 4096, 4096)) == 1
    crops = np.random.default_rng(3).integers(0, 256, (12, 4, 64, 64), dtype=np.uint8)
    meta = {"in_channels": 4, "task": "multiclass", "num_classes": 19}
    whole = (compute_cams(resnet, x, tile=64), compute_cams(resnet, x, "gradcam", [2, 5], tile=64),
             field_probs(resnet, x, 64, tta_flip=True), tiled_probs(resnet, x, 64).numpy(),
             predict(resnet, meta, crops, batch_size=12, tta_flip=True))
    with torch.no_grad():
        one = resnet(x)
    monkeypatch.setattr(tiling, "CPU_PASS_PIXELS", 64 * 64 * 5)  # 12 tiles in passes of 5, 5 and 2
    assert pass_size(make_tiles(x, 64)[0]) == 5
    with torch.no_grad():
        torch.testing.assert_close(forward_in_passes(resnet, x.repeat(4, 1, 1, 1)), one.repeat(4, 1), atol=1e-5,
                                   rtol=1e-4)
    split = (compute_cams(resnet, x, tile=64), compute_cams(resnet, x, "gradcam", [2, 5], tile=64),
             field_probs(resnet, x, 64, tta_flip=True), tiled_probs(resnet, x, 64).numpy(),
             predict(resnet, meta, crops, batch_size=12, tta_flip=True))
    for a, b in ((whole[0][0], split[0][0]), (whole[0][1], split[0][1]), (whole[1][1], split[1][1]),
                 (whole[2], split[2]), (whole[3], split[3]), (whole[4], split[4])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_image_cams_and_predict_use_the_tiles(resnet):
    torch.manual_seed(2)
    x = torch.rand(3, 4, 128, 128)
    ref = tiled_probs(resnet, x, 64).numpy()
    res = image_cams(resnet, x, "cam", None, 0.0, tile=64)
    np.testing.assert_allclose(np.stack([r.probs for r in res]), ref, atol=1e-5)
    v = np.sort(ref.ravel())
    mid = float(v[len(v) // 2] + v[len(v) // 2 + 1]) / 2  # a floor between two probabilities, not on one
    floor = image_cams(resnet, x, "gradcam", None, prob_floor=mid, tile=64)
    assert [r.classes.tolist() for r in floor] == [np.flatnonzero(r >= mid).tolist() for r in ref]
    meta = {"in_channels": 4, "num_classes": 19, "task": "multilabel", "mean": None, "tile": 64}
    np.testing.assert_allclose(predict(resnet, meta, x.numpy(), batch_size=2), ref, atol=1e-5)
    whole = predict(resnet, {**meta, "tile": None}, x.numpy())
    assert not np.allclose(whole, ref, atol=1e-3)
