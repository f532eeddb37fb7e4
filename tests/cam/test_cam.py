"""CAMs: exactness against grad-cam, normalisation, upsampling geometry, storage, the split loop."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_fields import make_tiny_dataset, tiny_field
from torch import nn

from hpa.cam.maps import load_cam, normalize_cams, save_cam, upsample_cam
from hpa.cam.methods import (available_methods, check_method, compute_cams, enlarge, head_bias, image_cams,
                             select_classes)
from hpa.constants import NUM_CLASSES
from hpa.io.errors import InputError
from hpa.io.fields import resize_field, write_field
from hpa.models.factory import HPANet, build_model
from hpa.pipeline.cams import compute_split_cams, merge_split


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is faster and steadier
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = build_model("resnet18", output_stride=16).eval()
    with torch.no_grad():
        model.head.bias.uniform_(-0.5, 0.5)  # a bias that matters
    return model


def _corr(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


# --------------------------------------------------------------------------- exactness
def test_cam_is_exact_and_equals_gradcam_up_to_scale(resnet):
    x = torch.randn(2, 4, 64, 64)
    logits, cams = compute_cams(resnet, x)
    assert logits.shape == (2, NUM_CLASSES) and cams.shape == (2, NUM_CLASSES, 4, 4)
    assert logits.dtype == np.float32 and cams.dtype == np.float32
    with torch.no_grad():
        ref = resnet(x).numpy()
    bias = head_bias(resnet)
    np.testing.assert_allclose(logits, ref, atol=1e-4)
    np.testing.assert_allclose(cams.mean((2, 3)) + bias, logits, atol=1e-4)  # CAM mean + bias = logit
    # our un-normalised grad-cam wrapper: GradCAM_k = CAM_k / (h w), every class, every image
    glogits, grad = compute_cams(resnet, x, "gradcam")
    np.testing.assert_allclose(glogits, logits, atol=1e-4)
    np.testing.assert_allclose(grad * 16, cams, atol=1e-5 * np.abs(cams).max())


def test_cam_matches_the_grad_cam_package_for_every_class(resnet):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = torch.randn(2, 4, 64, 64)
    _, cams = compute_cams(resnet, x)
    relu = np.maximum(cams, 0)
    n_compared = 0
    with GradCAM(model=resnet, target_layers=[resnet.backbone[-1]]) as gc:  # the backbone's last block
        for k in range(NUM_CLASSES):
            theirs = gc(x, [ClassifierOutputTarget(k) for _ in range(2)])  # (B, 64, 64), min-max normalised
            assert theirs.shape == (2, 64, 64)
            ours = scale_cam_image(relu[:, k], (64, 64))  # our ReLU'd maps normalised the same way
            for b in range(2):
                if relu[b, k].max() <= 0:  # nothing positive: both all zero
                    assert np.abs(theirs[b]).max() < 1e-5
                    continue
                assert _corr(ours[b], theirs[b]) >= 0.99, (k, b)
                n_compared += 1
    assert n_compared >= NUM_CLASSES  # most maps had something to compare


def test_tta_flip_averages_three_views(resnet):
    x = torch.randn(1, 4, 64, 64)
    logits, cams = compute_cams(resnet, x, tta_flip=True)
    l0, c0 = compute_cams(resnet, x)
    l1, c1 = compute_cams(resnet, x.flip(-1))
    l2, c2 = compute_cams(resnet, x.flip(-2))
    np.testing.assert_allclose(cams, (c0 + c1[..., ::-1] + c2[..., ::-1, :]) / 3, atol=1e-5)
    np.testing.assert_allclose(logits, (l0 + l1 + l2) / 3, atol=1e-5)
    np.testing.assert_allclose(cams.mean((2, 3)) + head_bias(resnet), logits, atol=1e-4)


def test_unknown_method_lists_the_valid_ones(resnet):
    with pytest.raises(ValueError, match="unknown CAM method 'nope'.*cam, gradcam.*layercam"):
        compute_cams(resnet, torch.zeros(1, 4, 64, 64), "nope")
    with pytest.raises(ValueError, match="valid methods"):
        check_method("grad_cam")
    assert available_methods()[0] == "cam" and "gradcam++" in available_methods()


# --------------------------------------------------------------------------- grad-cam's methods, by hand
# Features F (C, h, w) straight from the input (an identity backbone), a linear head W (K, C) on their
# average: logit_k = b_k + sum_c W_kc mean(F_c), so every gradient is constant over the map,
# g_kc = W_kc / (h w), and each method's map has a closed form.
F_HAND = np.array([[[1.0, 2.0], [3.0, 4.0]],  # channel 0: sum 10
                   [[1.0, -1.0], [-1.0, 1.0]]], np.float32)  # channel 1: a checkerboard, sum 0
W_HAND = np.array([[4.0, 8.0], [4.0, -8.0]], np.float32)  # h w = 4: g = (1, 2) for class 0, (1, -2) for class 1


def _hand_model():
    model = HPANet(nn.Identity(), 2, 2, 0.0, "hand").eval()
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(W_HAND))
        model.head.bias.copy_(torch.tensor([0.5, -1.0]))
    return model


F0, F1 = F_HAND
HAND = {  # class 0, class 1
    "cam": (4 * F0 + 8 * F1, 4 * F0 - 8 * F1),  # W . F, the bias kept apart
    "gradcam": (F0 + 2 * F1, F0 - 2 * F1),  # mean gradient x F = cam / (h w)
    "hirescam": (F0 + 2 * F1, F0 - 2 * F1),  # gradient x F, summed over channels: the same for constant gradients
    "xgradcam": (F0, F0),  # weight sum(g F_c) / sum(F_c): g for channel 0, 0 for the zero-sum checkerboard
    "layercam": (F0 + 2 * F1, F0),  # ReLU(g) x F: class 1's negative weight on channel 1 drops out
    "gradcam-elementwise": (F0 + 2 * np.maximum(F1, 0), F0 + 2 * np.maximum(-F1, 0)),  # sum_c ReLU(g F_c)
    # weight_c = sum_ij ReLU(g) a, a = g^2 / (2 g^2 + S_c g^3): channel 0 (g 1, S 10): 4 x 1/12 = 1/3;
    # channel 1 (g 2, S 0): 4 x 2 x 1/2 = 4, and 0 where g = -2
    "gradcam++": (F0 / 3 + 4 * F1, F0 / 3),
}


@pytest.mark.parametrize("method", list(HAND))
def test_each_method_gives_its_hand_computed_map(method):
    logits, cams = compute_cams(_hand_model(), torch.from_numpy(F_HAND)[None], method)
    np.testing.assert_allclose(logits, [[0.5 + 4 * 2.5, -1.0 + 4 * 2.5]], rtol=1e-6)
    assert cams.shape == (1, 2, 2, 2)
    np.testing.assert_allclose(cams[0], np.stack(HAND[method]), rtol=1e-5, atol=1e-5)


def _assert_close_up_to_sign(got, want, atol=1e-5):
    """An SVD's component has no sign of its own: ``got`` must equal ``want`` or ``-want``."""
    assert min(np.abs(got - want).max(), np.abs(got + want).max()) <= atol, (got, want)


def test_eigencam_is_the_first_principal_component_of_the_features():
    model = _hand_model()
    m = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    rank1 = np.stack([3 * m, 4 * m])[None]  # F_c = u_c m, u = (3, 4): the component is u / 5, scores 5 (m - mean m)
    _, cams = compute_cams(model, torch.from_numpy(rank1), "eigencam")
    want = 5 * (m - m.mean())
    for k in range(2):  # gradient-free: the same map for every class
        _assert_close_up_to_sign(cams[0, k], want)
    # two orthogonal centred channels: the one of larger variance (channel 0, 5 against 4) wins
    _, cams = compute_cams(model, torch.from_numpy(F_HAND)[None], "eigencam")
    _assert_close_up_to_sign(cams[0, 0], F0 - 2.5)
    # eigengradcam: the component of g x F, class 0: (F0, 2 F1), the checkerboard now the larger (16 against 5)
    _, cams = compute_cams(model, torch.from_numpy(F_HAND)[None], "eigengradcam", classes=[0])
    _assert_close_up_to_sign(cams[0, 0], 2 * F1)


def test_grad_cam_methods_on_a_resnet_follow_their_closed_forms(resnet):
    """The same closed forms with a real backbone (non-negative features after its last ReLU), two images."""
    x = torch.randn(2, 4, 64, 64)
    classes = [2, 7]
    with torch.no_grad():
        feats = resnet.features(x).numpy().astype(np.float64)  # (B, C, h, w): what the head averages
    n = feats.shape[2] * feats.shape[3]
    g = resnet.head.weight.detach().numpy().astype(np.float64)[classes] / n  # (K, C): the constant gradients
    s = feats.sum((2, 3))  # (B, C)
    _, cam = compute_cams(resnet, x, classes=classes)
    forms = {
        "gradcam": np.broadcast_to(g, (2,) + g.shape),
        "hirescam": np.broadcast_to(g, (2,) + g.shape),
        "xgradcam": g[None] * (s / (s + 1e-7))[:, None],
        "layercam": np.broadcast_to(np.maximum(g, 0), (2,) + g.shape),
        "gradcam++": n * np.maximum(g, 0)[None] * g[None] ** 2 / (2 * g[None] ** 2 + s[:, None] * g[None] ** 3 + 1e-6),
    }
    scale = np.abs(cam).max() / n
    for method, weights in forms.items():  # weights (B, K, C): the map is sum_c weight_c F_c
        _, got = compute_cams(resnet, x, method, classes=classes)
        want = np.einsum("bkc,bchw->bkhw", weights, feats)
        np.testing.assert_allclose(got, want, atol=1e-4 * scale, err_msg=method)
    np.testing.assert_allclose(compute_cams(resnet, x, "hirescam", classes=classes)[1] * n, cam, atol=1e-4 * scale * n)


def test_bad_inputs_are_reported(resnet):
    with pytest.raises(ValueError, match="float"):
        compute_cams(resnet, torch.zeros(1, 4, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..18"):
        compute_cams(resnet, torch.zeros(1, 4, 64, 64), classes=[19])


# --------------------------------------------------------------------------- a hand-built model
class _Square(nn.Module):
    """Feature 0 = mean over 8x8 blocks of ReLU(green - 0.5); feature 1 = same for red."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 1] = 1.0
            self.conv.weight[1, 0] = 1.0
            self.conv.bias.fill_(-0.5)
        self.pool = nn.AvgPool2d(8)

    def forward(self, x):
        return self.pool(torch.relu(self.conv(x)))


def _square_model():
    model = HPANet(_Square(), 2, NUM_CLASSES, 0.0, "square").eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-2.0)
        model.head.weight[3, 0] = 10.0  # class 3: the bright green square
        model.head.weight[5, 1] = 10.0  # class 5: red
    return model


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_class_peak_lies_on_the_bright_square_of_a_non_square_field(method):
    h, w = 48, 96  # the original field; the model sees it squashed to 64 x 64 (one feature cell: 6 x 12 px)
    field = np.full((4, h, w), 0.1, np.float32)
    field[1, 18:30, 72:84] = 1.0  # the square, in original coordinates
    field[0, 30:36, 12:36] = 1.0  # something red elsewhere
    x = torch.from_numpy(resize_field(field, 64))[None]
    logits, cams = compute_cams(_square_model(), x, method, classes=[3, 5])
    assert cams.shape == (1, 2, 8, 8)
    up = upsample_cam(normalize_cams(cams[0]), (h, w))
    y, xx = np.unravel_index(up[0].argmax(), (h, w))
    assert 18 <= y < 30 and 72 <= xx < 84, (y, xx)
    y5, x5 = np.unravel_index(up[1].argmax(), (h, w))
    assert 30 <= y5 < 36 and 12 <= x5 < 36, (y5, x5)
    assert up[0][40:, :].max() == 0.0 and up[0][:, :60].max() == 0.0  # class 3 is dark away from the square
    if method == "cam":
        assert logits[0, 3] > logits[0, 0]


# --------------------------------------------------------------------------- normalisation, geometry
def test_normalize_relu_then_divide_by_map_max():
    raw = np.array([[[-1.0, 2.0], [4.0, 0.0]], [[-3.0, -1.0], [-2.0, -0.5]]], np.float32)
    out = normalize_cams(raw)
    np.testing.assert_array_equal(out[0], [[0.0, 0.5], [1.0, 0.0]])
    np.testing.assert_array_equal(out[1], np.zeros((2, 2)))  # nothing positive: all zero
    np.testing.assert_allclose(normalize_cams(raw, [0.5, 0.9])[0], [[0.0, 0.25], [0.5, 0.0]])
    assert normalize_cams(raw[None]).shape == (1, 2, 2, 2)  # (B, K, h, w) works too
    with pytest.raises(ValueError, match="one value per map"):
        normalize_cams(raw, [0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        normalize_cams(raw, [0.5, 1.5])


def test_upsampling_preserves_the_argmax_cell_at_any_aspect():
    rng = np.random.default_rng(1)
    h, w, big_h, big_w = 5, 7, 55, 133  # 11 x 19 px per cell: centres fall on pixels
    grid = rng.random((6, h, w)).astype(np.float32) * 0.5
    peaks = [(0, 0), (4, 6), (2, 3), (1, 5), (3, 1), (4, 0)]
    for k, (i, j) in enumerate(peaks):
        grid[k, i, j] = 1.0
    up = upsample_cam(grid, (big_h, big_w))
    assert up.shape == (6, big_h, big_w) and up.dtype == np.float32
    for k, (i, j) in enumerate(peaks):
        y, x = np.unravel_index(up[k].argmax(), (big_h, big_w))
        assert i * big_h / h <= y < (i + 1) * big_h / h and j * big_w / w <= x < (j + 1) * big_w / w
        # half-pixel centres: the cell's value sits exactly on the pixel at the cell's centre
        cy, cx = round((i + 0.5) * big_h / h - 0.5), round((j + 0.5) * big_w / w - 0.5)
        assert up[k][cy, cx] == pytest.approx(1.0) and up[k].max() == pytest.approx(1.0)
    near = upsample_cam(grid[0], (big_h, big_w), mode="nearest")  # (h, w) in, (H, W) out
    assert near.shape == (big_h, big_w) and near[0, 0] == grid[0, 0, 0] and near[-1, -1] == grid[0, -1, -1]
    assert upsample_cam(np.zeros((0, h, w)), (10, 10)).shape == (0, 10, 10)
    np.testing.assert_allclose(upsample_cam(np.full((1, 3, 3), 0.7), (20, 9)), 0.7, atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        upsample_cam(grid, (10, 10), mode="cubic")


def test_select_classes():
    probs = np.linspace(0, 1, NUM_CLASSES)
    assert select_classes(probs, [5, 2, 5]) == [2, 5]
    assert select_classes(probs) == list(range(NUM_CLASSES))
    assert select_classes(probs, None, 0.9) == [c for c in range(NUM_CLASSES) if probs[c] >= 0.9]


def test_image_cams_selects_labels_and_floor(resnet):
    x = torch.randn(2, 4, 64, 64)
    res = image_cams(resnet, x, labels=[[1, 4], [18]])
    assert [r.classes.tolist() for r in res] == [[1, 4], [18]]
    _, full = compute_cams(resnet, x)
    np.testing.assert_allclose(res[0].cams, full[0, [1, 4]], atol=1e-6)
    ranked = np.sort(res[0].probs)
    floor = float(ranked[9] + ranked[10]) / 2  # between two classes' probabilities
    for method in ("cam", "gradcam"):
        sel = image_cams(resnet, x, method, None, prob_floor=floor)
        assert sel[0].classes.tolist() == [c for c in range(NUM_CLASSES) if res[0].probs[c] >= floor]
        assert sel[0].cams.shape == (len(sel[0].classes), 4, 4)


@pytest.mark.parametrize("tile", [None, 32])
def test_enlarged_maps_keep_the_model_scale_probabilities(resnet, tile):
    x = torch.randn(2, 4, 64, 64)
    base = image_cams(resnet, x, labels=[[1, 4], [18]], tile=tile)
    big = image_cams(resnet, x, labels=[[1, 4], [18]], tile=tile, scale=2.0)
    _, ref = compute_cams(resnet, enlarge(x, 2.0), tile=tile)
    assert enlarge(x, 2.0).shape == (2, 4, 128, 128) and enlarge(x, 1.0) is x
    for b, r in enumerate(big):
        np.testing.assert_allclose(r.probs, base[b].probs, atol=1e-6)  # probabilities from the 64-px field
        np.testing.assert_allclose(r.logits, base[b].logits, atol=1e-4)
        assert r.classes.tolist() == base[b].classes.tolist()
        assert r.cams.shape == (len(r.classes), 8, 8) and base[b].cams.shape[1:] == (4, 4)
        np.testing.assert_allclose(r.cams, ref[b, r.classes], atol=1e-5)  # maps from the 128-px field
    # on the test split the floor selects from the model-scale probabilities, for grad-cam methods too
    floor = float(np.sort(base[0].probs)[9:11].mean())
    sel = image_cams(resnet, x, "gradcam", None, prob_floor=floor, tile=tile, scale=1.5)
    assert sel[0].classes.tolist() == [c for c in range(NUM_CLASSES) if base[0].probs[c] >= floor]
    assert sel[0].cams.shape[1:] == (6, 6)
    with pytest.raises(ValueError, match="scale must be > 0"):
        enlarge(x, 0.0)


# --------------------------------------------------------------------------- storage
def test_save_load_roundtrip_shapes_and_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    cams = rng.normal(0, 3, (2, 4, 6)).astype(np.float32)
    probs = rng.random(NUM_CLASSES).astype(np.float32)
    bias = rng.normal(size=NUM_CLASSES)
    path = save_cam(tmp_path / "a.npz", cams, [3, 11], probs, rng.normal(size=NUM_CLASSES), "cam", 64, bias)
    with np.load(path) as z:
        assert z["cams"].dtype == np.float16 and z["cams"].shape == (2, 4, 6)
        assert z["probs"].dtype == np.float32 and z["probs"].shape == (NUM_CLASSES,)
    rec = load_cam(path)
    assert rec.cams.dtype == np.float32 and rec.cams.shape == (2, 4, 6)
    assert rec.classes.dtype == np.int64 and rec.classes.tolist() == [3, 11]
    assert rec.method == "cam" and rec.input_size == 64
    np.testing.assert_allclose(rec.bias, bias, rtol=1e-6)
    np.testing.assert_allclose(rec.cams, cams, rtol=1e-3, atol=1e-3)  # float16 precision
    np.testing.assert_array_equal(rec.cam_of(11), rec.cams[1])
    np.testing.assert_allclose(rec.normalized(times_prob=True).max((1, 2)), probs[[3, 11]], rtol=1e-6)
    with pytest.raises(KeyError, match="stored classes"):
        rec.cam_of(0)
    with pytest.raises(InputError, match="run stage 02"):
        load_cam(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="K_sel = 3"):
        save_cam(tmp_path / "b.npz", cams, [1, 2, 3], probs, probs)
    with pytest.raises(ValueError, match="not finite"):
        save_cam(tmp_path / "b.npz", cams * np.nan, [1, 2], probs, probs)
    assert not (tmp_path / "b.npz").exists()
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read"):
        load_cam(tmp_path / "c.npz")


# --------------------------------------------------------------------------- the split loop
META = {"image_size": 64, "mean": [0.1, 0.2, 0.1, 0.1], "std": [0.2, 0.3, 0.2, 0.2]}


def _add_test_split(data, n=3, seed=5):
    rng = np.random.default_rng(seed)
    ids = [f"t{i}" for i in range(n)]
    for i in ids:
        write_field(data / "test", i, tiny_field(rng, [i == "t0"], 64))
    pd.DataFrame({"ID": ids}).to_csv(data / "test.csv", index=False)
    return ids


def test_split_cams_stored_resumed_and_merged(tmp_path, resnet):
    data = make_tiny_dataset(tmp_path / "data", n=5, size=64)
    run = tmp_path / "run"
    labels = pd.read_csv(data / "train.csv")
    stats = compute_split_cams(run, data, "train", resnet, META, batch_size=2, progress=False)
    assert stats == {"images": 5, "computed": 5, "done_before": 0, "skipped": 0, "complete": True}
    out = run / "cams" / "train"
    rec = load_cam(out / "img000.npz")
    assert rec.classes.tolist() == [int(c) for c in labels.loc[0, "Label"].split("|")]
    assert rec.cams.shape == (len(rec.classes), 4, 4)
    np.testing.assert_allclose(rec.bias, head_bias(resnet), atol=1e-7)
    # probabilities are the model's on the cached, normalised field
    cache = np.load(run / "cache" / "train_64.npy")
    x = (torch.from_numpy(cache[:1].astype(np.float32) / 255) - torch.tensor(META["mean"]).view(1, 4, 1, 1)) \
        / torch.tensor(META["std"]).view(1, 4, 1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(rec.probs, torch.sigmoid(resnet(x))[0].numpy(), atol=1e-3)
    probs = pd.read_csv(out / "probs.csv", dtype={"ID": str})
    assert probs["ID"].tolist() == labels["ID"].tolist() and list(probs.columns[1:]) == [f"p{c}" for c in range(19)]
    np.testing.assert_allclose(probs.iloc[0, 1:].to_numpy(float), rec.probs, atol=1e-6)
    assert pd.read_csv(out / "skipped.csv").empty
    # resume: nothing recomputed; a lost file is recomputed alone
    mtime = (out / "img001.npz").stat().st_mtime_ns
    (out / "img003.npz").unlink()
    stats = compute_split_cams(run, data, "train", resnet, META, batch_size=2, progress=False)
    assert (stats["computed"], stats["done_before"]) == (1, 4)
    assert (out / "img001.npz").stat().st_mtime_ns == mtime and (out / "img003.npz").is_file()
    # other settings on the same folder: an error unless forced
    with pytest.raises(InputError, match="method: 'cam' -> 'gradcam'.*--force"):
        compute_split_cams(run, data, "train", resnet, META, method="gradcam", progress=False)
    stats = compute_split_cams(run, data, "train", resnet, META, method="gradcam", force=True, progress=False)
    assert stats["computed"] == 5 and json.loads((out / "settings.json").read_text())["method"] == "gradcam"
    assert "scale" not in json.loads((out / "settings.json").read_text())  # at 1: as before the setting existed
    # enlarged maps: recorded, finer, same probabilities; a scale change needs --force
    with pytest.raises(InputError, match="scale.*--force"):
        compute_split_cams(run, data, "train", resnet, META, method="gradcam", scale=2.0, progress=False)
    stats = compute_split_cams(run, data, "train", resnet, META, method="gradcam", scale=2.0, force=True,
                               progress=False)
    big = load_cam(out / "img000.npz")
    assert json.loads((out / "settings.json").read_text())["scale"] == 2.0
    assert big.cams.shape == (len(rec.classes), 8, 8)
    np.testing.assert_allclose(big.probs, rec.probs, atol=1e-5)


def test_test_split_shards_merge_when_complete(tmp_path, resnet):
    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    ids = _add_test_split(data, n=3)
    run = tmp_path / "run"
    s0 = compute_split_cams(run, data, "test", resnet, META, shard=(0, 2), progress=False)
    out = run / "cams" / "test"
    assert s0["images"] == 2 and not s0["complete"] and not (out / "probs.csv").exists()
    assert not merge_split(run, "test", ids)
    s1 = compute_split_cams(run, data, "test", resnet, META, shard=(1, 2), progress=False)
    assert s1["images"] == 1 and s1["complete"]
    assert pd.read_csv(out / "probs.csv")["ID"].tolist() == ids
    assert load_cam(out / "t1.npz").classes.tolist() == list(range(NUM_CLASSES))  # floor 0: every class
    assert (run / "cache" / "test_64.shard-0-of-2.npy").is_file()  # shards never share a cache file


def test_bad_test_image_skipped_and_listed(tmp_path, resnet):
    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    ids = _add_test_split(data, n=3)
    (data / "test" / "t2_yellow.png").unlink()
    run = tmp_path / "run"
    with pytest.raises(InputError, match="t2_yellow"):
        compute_split_cams(run, data, "test", resnet, META, progress=False)
    stats = compute_split_cams(run, data, "test", resnet, META, on_bad_image="skip", progress=False)
    assert stats["complete"] and stats["computed"] == 2
    skipped = pd.read_csv(run / "cams" / "test" / "skipped.csv")
    assert skipped["ID"].tolist() == ["t2"] and "yellow" in skipped.loc[0, "reason"]
    assert pd.read_csv(run / "cams" / "test" / "probs.csv")["ID"].tolist() == ids[:2]
