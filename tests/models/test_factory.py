"""Model registry: names, output stride, exact CAMs, and 3 -> 4 channel pretrained loading."""

import pytest
import torch

from hpa.models.factory import (
    adapt_first_conv_weight,
    available_models,
    build_model,
    first_conv,
)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'effnet'; available models: efficientnet-b0, .*resnet18"):
        build_model("effnet")


@pytest.mark.parametrize("arch", ["efficientnet-b0", "resnet18"])
@pytest.mark.parametrize("stride", [16, 32])
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
