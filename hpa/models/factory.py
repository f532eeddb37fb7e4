"""Backbones by name, 4 input channels, and a global-average-pooling + linear head.

Every model here is a :class:`HPANet`: ``backbone`` maps a float ``(B, 4, H, W)`` batch
to a feature map ``(B, C, h, w)``; ``head`` is one ``nn.Linear(C, num_classes)`` applied
after global average pooling. Because pooling and the head are both linear, the logit
of class k equals the spatial mean of ``head.weight[k] . F(x, y) + head.bias[k]``: the
class activation map (CAM) of stage 02 is exact and costs one forward pass for all
classes.

No weights are ever downloaded: ``pretrained`` is a path to a local state dict.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from hpa.constants import NUM_CLASSES

log = logging.getLogger(__name__)

EFFICIENTNETS = tuple(f"efficientnet-b{i}" for i in range(8))
TORCHVISION = ("resnet18", "resnet34", "resnet50", "densenet121", "convnext_tiny")


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(EFFICIENTNETS) + list(TORCHVISION)


#: Input normalisations an :class:`HPANet` can apply before its backbone (parameter-free).
INPUT_NORMS = ("none", "per_image")


class PerImageNorm(nn.Module):
    """Standardise every image and channel by its own spatial mean and std: ``(x - m) / (s + eps)``.

    Removes the field-to-field brightness and contrast differences of each stain, so the
    network learns patterns, not exposure. No parameters (state dicts are unchanged).
    """

    def __init__(self, eps: float = 0.1):
        super().__init__()
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True)
        return (x - mean) / (std + self.eps)


class HPANet(nn.Module):
    """[Per-image input normalisation] -> backbone -> global average pooling -> dropout -> linear head.

    Input: float32 ``(B, in_channels, H, W)``, normalised. Output: logits ``(B, num_classes)``.
    ``input_norm`` (:data:`INPUT_NORMS`): ``per_image`` applies :class:`PerImageNorm` first,
    inside :meth:`features`, so every caller (training, prediction, CAMs) gets it.
    """

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, dropout: float, arch: str,
                 input_norm: str = "none"):
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {input_norm!r}; valid: {', '.join(INPUT_NORMS)}")
        self.arch = arch
        self.input_norm_name = input_norm
        self.input_norm = PerImageNorm() if input_norm == "per_image" else nn.Identity()
        self.backbone = backbone
        self.num_features = num_features
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map ``(B, C, h, w)`` (C = ``num_features``)."""
        return self.backbone(self.input_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.head(self.dropout(f.mean(dim=(2, 3))))

    def forward_with_cams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, K)`` and raw class activation maps ``(B, K, h, w)`` in one pass.

        ``cams[b, k] = head.weight[k] . F[b] + head.bias[k]`` so that
        ``cams.mean((2, 3)) == logits`` exactly (dropout is inactive in eval mode).
        """
        f = self.features(x)
        cams = torch.einsum("bchw,kc->bkhw", f, self.head.weight) + self.head.bias[None, :, None, None]
        logits = self.head(f.mean(dim=(2, 3)))
        return logits, cams


class _EffNetFeatures(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.extract_features(x)


def _efficientnet(arch: str, in_channels: int, image_size: int | None, output_stride: int,
                  drop_connect: float | None = None) -> tuple[nn.Module, int]:
    from efficientnet_pytorch import EfficientNet
    from efficientnet_pytorch.utils import get_model_params

    params = {"image_size": image_size} if image_size else {}
    if drop_connect is not None:
        params["drop_connect_rate"] = float(drop_connect) or None  # None: the blocks skip it entirely
    blocks_args, global_params = get_model_params(arch, params or None)
    if output_stride == 16:  # the last stride-2 stage keeps its resolution: CAMs twice as fine
        last = max(i for i, b in enumerate(blocks_args) if b.stride == [2])
        blocks_args[last] = blocks_args[last]._replace(stride=[1])
    net = EfficientNet(blocks_args, global_params)
    _native_silu(net)
    net._change_in_channels(in_channels)
    num_features = net._fc.in_features
    net._fc = nn.Identity()
    return _EffNetFeatures(net), num_features


def _native_silu(net: nn.Module) -> int:
    """Replace efficientnet-pytorch's Python swish modules by ``nn.SiLU`` (the same function, x * sigmoid(x)).

    Its default ``MemoryEfficientSwish`` is a custom autograd function; PyTorch's fused SiLU
    trains EfficientNet-B0 about 12% faster on CPU (64-px inputs, 2 threads). No parameters
    are involved, so state dicts are unchanged. Returns how many modules were replaced.
    """
    n = 0
    for module in net.modules():
        for name, child in list(module.named_children()):
            if type(child).__name__ in ("MemoryEfficientSwish", "Swish"):
                setattr(module, name, nn.SiLU())
                n += 1
    return n


def _torchvision(arch: str, in_channels: int, output_stride: int) -> tuple[nn.Module, int]:
    import torchvision

    if output_stride == 16 and not arch.startswith("resnet"):
        raise ValueError(f"output_stride=16 is supported for efficientnet-* and resnet*, not {arch}")
    if arch.startswith("resnet"):
        net = getattr(torchvision.models, arch)(weights=None)
        if output_stride == 16:  # stride 1 in layer4, as in DeepLab
            block = net.layer4[0]
            conv = block.conv2 if arch == "resnet50" else block.conv1
            conv.stride = (1, 1)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
    else:
        net = getattr(torchvision.models, arch)(weights=None)
    if arch.startswith("resnet"):
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        num_features = net.fc.in_features
        body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
        return body, num_features
    if arch == "densenet121":
        old = net.features.conv0
        net.features.conv0 = nn.Conv2d(in_channels, old.out_channels, 7, 2, 3, bias=False)
        return nn.Sequential(net.features, nn.ReLU(inplace=False)), net.classifier.in_features
    if arch == "convnext_tiny":
        old = net.features[0][0]
        net.features[0][0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride)
        return net.features, net.classifier[-1].in_features
    raise AssertionError(arch)


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The first convolution of a model (the one that sees the input channels)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise ValueError("model has no Conv2d")


def adapt_first_conv_weight(weight: torch.Tensor, in_channels: int = 4) -> torch.Tensor:
    """Turn an ImageNet first-conv weight ``(O, 3, k, k)`` into ``(O, in_channels, k, k)``.

    HPA channel order is red, green, blue, yellow. The RGB filters are kept unchanged
    for red, green and blue (so a 3-channel ImageNet model sees those channels as it
    was trained to); yellow (ER, imaged as red + green light) gets the mean of the red
    and green filters. Extra channels beyond 4 get the mean of all three.
    """
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected a (O, 3, k, k) first-conv weight, got {tuple(weight.shape)}")
    if in_channels < 3:
        raise ValueError(f"in_channels must be >= 3, got {in_channels}")
    extra = []
    if in_channels >= 4:
        extra.append(weight[:, :2].mean(dim=1, keepdim=True))
    extra += [weight.mean(dim=1, keepdim=True)] * (in_channels - 4)
    return torch.cat([weight] + extra, dim=1)


def load_pretrained_backbone(model: HPANet, path: str | os.PathLike) -> None:
    """Load a local ImageNet state dict (3-channel) into ``model``'s backbone.

    Accepts the state dicts of efficientnet-pytorch (keys like ``_conv_stem.weight``)
    and torchvision (``conv1.weight`` ...), or a dict with a ``state_dict`` entry. The
    first convolution is adapted from 3 to 4 channels by :func:`adapt_first_conv_weight`;
    the ImageNet classifier is dropped. Keys that do not fit are reported, not ignored
    silently: if fewer than 90% of backbone tensors load, it is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} not found (weights are never downloaded; give a local file)")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    target = model.backbone.state_dict()
    conv_key = next(k for k, v in target.items() if v.ndim == 4)
    prefix = "net." if model.arch.startswith("efficientnet") else ""
    mapped = {}
    for k, v in sd.items():
        k2 = prefix + k if prefix + k in target else k
        if model.arch.startswith("resnet"):  # torchvision resnet names -> nn.Sequential indices
            names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
            head, _, rest = k.partition(".")
            if head in names:
                k2 = f"{names.index(head)}.{rest}"
        elif model.arch == "densenet121" and k.startswith("features."):
            k2 = "0." + k[len("features."):]
        elif model.arch == "convnext_tiny" and k.startswith("features."):
            k2 = k[len("features."):]
        if k2 in target:
            if k2 == conv_key and v.shape[1] == 3 and target[k2].shape[1] != 3:
                v = adapt_first_conv_weight(v, target[k2].shape[1])
            if v.shape == target[k2].shape:
                mapped[k2] = v
    frac = len(mapped) / max(len(target), 1)
    if frac < 0.9:
        raise ValueError(f"{path}: only {len(mapped)} of {len(target)} backbone tensors of {model.arch} match; "
                         "is this a state dict of the same architecture?")
    missing = model.backbone.load_state_dict(mapped, strict=False).missing_keys
    log.info("loaded %d/%d backbone tensors from %s (missing: %s)", len(mapped), len(target), path, missing[:5])


def build_model(arch: str, num_classes: int = NUM_CLASSES, in_channels: int = 4, dropout: float = 0.2,
                pretrained: str | os.PathLike | None = None, image_size: int | None = None,
                output_stride: int = 32, bn_momentum: float | None = None,
                zero_init_residual: bool = False, input_norm: str = "none",
                drop_connect: float | None = None) -> HPANet:
    """Build an :class:`HPANet` by name (see :func:`available_models`), random or from a local file.

    ``output_stride`` 32 is the backbone as published; 16 keeps the last stride-2 stage at
    full resolution, so the feature map (and the CAM) of a 256-px input is 16x16, not 8x8.
    The parameters are the same either way, so pretrained weights load into both.
    ``bn_momentum`` (None: the architecture's own; EfficientNet's is 0.01, tuned for long
    ImageNet runs) sets every BatchNorm's running-statistics momentum: 0.1 lets a short
    training from scratch validate with settled statistics. It does not change the weights.
    ``zero_init_residual`` starts the last BatchNorm scale of every residual block at 0, so
    each block begins as the identity (Goyal et al. 2017): faster training from scratch.
    ``input_norm`` ``per_image`` standardises each input image and channel first (see :class:`HPANet`).
    ``drop_connect``: EfficientNet's stochastic depth rate (None: its own 0.2; 0 switches it
    off, which suits short trainings from scratch); training only, ignored by other architectures.
    """
    if output_stride not in (16, 32):
        raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
    if arch in EFFICIENTNETS:
        backbone, nf = _efficientnet(arch, in_channels, image_size, output_stride, drop_connect)
    elif arch in TORCHVISION:
        backbone, nf = _torchvision(arch, in_channels, output_stride)
    else:
        raise ValueError(f"unknown model {arch!r}; available models: {', '.join(available_models())}")
    model = HPANet(backbone, nf, num_classes, dropout, arch, input_norm)
    if bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = float(bn_momentum)
    if zero_init_residual:
        zero_residual_bn(model)
    if pretrained:
        load_pretrained_backbone(model, pretrained)
    return model


def zero_residual_bn(model: HPANet) -> int:
    """Set to 0 the scale of the BatchNorm that ends each residual block; returns how many.

    EfficientNet: the projection BN (``_bn2``) of MBConv blocks with an identity skip;
    ResNet: ``bn2`` (BasicBlock) / ``bn3`` (Bottleneck). Other architectures: 0 (unchanged).
    """
    n = 0
    for m in model.modules():
        args = getattr(m, "_block_args", None)
        if args is not None and hasattr(m, "_bn2"):
            if args.id_skip and args.input_filters == args.output_filters and all(s == 1 for s in _as_list(args.stride)):
                nn.init.zeros_(m._bn2.weight)
                n += 1
        elif type(m).__name__ == "BasicBlock" and hasattr(m, "bn2"):
            nn.init.zeros_(m.bn2.weight)
            n += 1
        elif type(m).__name__ == "Bottleneck" and hasattr(m, "bn3"):
            nn.init.zeros_(m.bn3.weight)
            n += 1
    return n


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


# --------------------------------------------------------------------------- the cell model
def cell_model_from_image_model(image_model: nn.Module, crop_size: int, dropout: float | None = None,
                                output_stride: int | None = None, bn_momentum: float | None = None,
                                seed: int = 0, drop_connect: float | None = None) -> nn.Module:
    """A new :class:`hpa.models.factory.HPANet` with the image model's architecture and backbone weights.

    Args:
        image_model: the trained image-level HPANet (its ``arch`` and ``backbone`` are used).
        crop_size: the cell crop size (EfficientNet's static padding is built for it).
        dropout: head dropout (None: the image model's).
        output_stride: 16 or 32 (None: the image model's); the weights are the same either way.
        bn_momentum: BatchNorm momentum (None: the architecture's own).
        seed: seeds the new head's initialisation.
        drop_connect: EfficientNet stochastic depth rate while training (None: the arch's own).
    Returns:
        a model whose ``backbone`` state equals the image model's and whose ``head`` is a new
        ``nn.Linear(num_features, 19)``.
    """
    from hpa.models.factory import build_model

    arch = getattr(image_model, "arch", None)
    if arch is None or not hasattr(image_model, "backbone"):
        raise TypeError(f"expected an hpa.models.factory.HPANet image model, got {type(image_model).__name__}")
    if output_stride is None:
        output_stride = model_output_stride(image_model)
    if dropout is None:
        dropout = float(image_model.dropout.p)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, num_classes=NUM_CLASSES, dropout=float(dropout), image_size=int(crop_size),
                            output_stride=int(output_stride), bn_momentum=bn_momentum, drop_connect=drop_connect)
    src = {k: v.detach().cpu() for k, v in image_model.backbone.state_dict().items()}
    model.backbone.load_state_dict(src, strict=True)
    return model


def model_output_stride(model: nn.Module) -> int:
    """16 or 32: the total stride of a model's backbone, measured on a 64-px input."""
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    with torch.no_grad():
        f = model.backbone(torch.zeros(1, 4, 64, 64, device=param.device, dtype=param.dtype))
    model.train(was_training)
    return 64 // f.shape[-1]
