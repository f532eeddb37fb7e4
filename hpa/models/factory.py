"""Backbones by name, 4 input channels, and a global-average-pooling + linear head.

Every model here is a :class:`HPANet`: ``backbone`` maps a float ``(B, 4, H, W)`` batch
to a feature map ``(B, C, h, w)``; ``head`` is one ``nn.Linear(C, num_classes)`` applied
after global average pooling. Because pooling and the head are both linear, the logit
of class k equals the spatial mean of ``head.weight[k] . F(x, y) + head.bias[k]``: the
class activation map (CAM) of stage 02 is exact and costs one forward pass for all
classes. The backbones themselves are built in :mod:`hpa.models.backbones`.

No weights are ever downloaded. ``pretrained`` is either a path to a local state dict or
``"imagenet"``: the ImageNet weights that an installed package ships for the architecture
(EfficientNet-Lite0/1/2, :data:`hpa.models.backbones.PACKAGED_WEIGHTS`).

Input normalisation with ImageNet weights. The packaged Lite weights were trained on
``(pixel - 127) / 128`` (zero-centred, per-channel spread about 0.45 on ImageNet photos). The
pipeline feeds its own standardisation instead, once, unchanged: per-channel dataset mean/std
(:func:`hpa.engine.trainer.fit`), then optionally ``input_norm=per_image`` inside the model;
both are zero-centred with spread 1, about twice ImageNet's. No extra rescaling is applied
because the stem convolution has no bias and is followed by BatchNorm: in training mode
(batch statistics) ``BN(conv(a * x)) == BN(conv(x))`` for any scale ``a`` (up to BN's epsilon),
so the factor only touches the stem BN's running statistics, which fine-tuning re-estimates
within the first epoch (bn_momentum 0.1). The weights' features therefore see the same
normalised stem activations as on ImageNet (tested in tests/test_models.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from hpa.constants import NUM_CLASSES
from hpa.models.backbones import (
    EFFICIENTNET_LITES,
    EFFICIENTNETS,
    PACKAGED_WEIGHTS,
    TORCHVISION,
    efficientnet,
    packaged_weights,
    torchvision_backbone,
)

log = logging.getLogger(__name__)

#: ``pretrained`` value that selects the packaged ImageNet weights of the architecture.
IMAGENET = "imagenet"
#: Output strides :func:`build_model` accepts (8 and 16: EfficientNets and ResNets only).
OUTPUT_STRIDES = (8, 16, 32)


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(EFFICIENTNETS) + list(EFFICIENTNET_LITES) + list(TORCHVISION)


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


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The first convolution of a model (the one that sees the input channels)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise ValueError("model has no Conv2d")


def adapt_first_conv_weight(weight: torch.Tensor, in_channels: int = 4) -> torch.Tensor:
    """Turn an ImageNet first-conv weight ``(O, 3, k, k)`` into ``(O, in_channels, k, k)``.

    HPA channel order is red (microtubules), green (protein), blue (nucleus), yellow (ER).
    The RGB filters are kept unchanged for red, green and blue (so a 3-channel ImageNet
    model sees those channels as it was trained to); yellow gets the mean of the red and
    green filters. That is exactly the network's response to the usual HPA RGB composite
    ``(R + Y/2, G + Y/2, B)`` (yellow light shown half in red, half in green): the stem is
    linear, so ``W_r (R + Y/2) + W_g (G + Y/2) + W_b B = W_r R + W_g G + W_b B + ((W_r + W_g)/2) Y``.
    The larger input spread of four channels is absorbed by the BatchNorm after the stem.
    Extra channels beyond 4 get the mean of all three.
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


def load_pretrained_backbone(model: HPANet, path: str | os.PathLike) -> dict:
    """Load ImageNet weights (3-channel) into ``model``'s backbone; returns a summary.

    Args:
        model: an :class:`HPANet` (its ``arch`` decides the key mapping).
        path: ``"imagenet"`` for the weights an installed package ships for ``model.arch``
            (:func:`hpa.models.backbones.packaged_weights`: located through the import system,
            SHA-256 checked; loaded strictly: every backbone tensor must come from the file and
            every file tensor but the 1000-class classifier must be used), or a local state dict
            of efficientnet-pytorch (keys like ``_conv_stem.weight``) or torchvision
            (``conv1.weight`` ...), possibly wrapped in a dict with a ``state_dict`` entry; a local
            file must fill at least 90% of the backbone's tensors (the rest is reported).
    Returns:
        ``{"path": str, "loaded": int, "total": int}`` (tensors loaded / backbone tensors).

    The first convolution is adapted from 3 to 4 channels by :func:`adapt_first_conv_weight`;
    the ImageNet classifier (``_fc``, ``fc``, ``classifier``) is dropped.
    """
    strict = str(path).strip().lower() == IMAGENET
    if strict:
        path = packaged_weights(model.arch)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} not found (weights are never downloaded; give a local "
                                f"file, or {IMAGENET!r} for the packaged weights of {', '.join(PACKAGED_WEIGHTS)})")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    target = model.backbone.state_dict()
    conv_key = next(k for k, v in target.items() if v.ndim == 4)
    prefix = "net." if model.arch.startswith("efficientnet") else ""
    mapped, unused = {}, []
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
            if k2 == conv_key and v.ndim == 4 and v.shape[1] == 3 and target[k2].shape[1] != 3:
                v = adapt_first_conv_weight(v, target[k2].shape[1])
            if v.shape == target[k2].shape:
                mapped[k2] = v
                continue
        if k.partition(".")[0] not in ("_fc", "fc", "classifier"):
            unused.append(k)
    missing = [k for k in target if k not in mapped]
    if strict and (missing or unused):
        raise ValueError(f"{path}: the packaged weights do not fit {model.arch} exactly: {len(missing)} backbone "
                         f"tensor(s) missing {missing[:3]}, {len(unused)} file tensor(s) unused {unused[:3]}")
    if len(mapped) < 0.9 * len(target):
        raise ValueError(f"{path}: only {len(mapped)} of {len(target)} backbone tensors of {model.arch} match; "
                         "is this a state dict of the same architecture?")
    model.backbone.load_state_dict(mapped, strict=False)
    log.info("loaded %d/%d backbone tensors of %s from %s (missing: %s)", len(mapped), len(target), model.arch,
             path, missing[:5])
    return {"path": str(path), "loaded": len(mapped), "total": len(target)}


def build_model(arch: str, num_classes: int = NUM_CLASSES, in_channels: int = 4, dropout: float = 0.2,
                pretrained: str | os.PathLike | None = None, image_size: int | None = None,
                output_stride: int = 32, bn_momentum: float | None = None,
                zero_init_residual: bool = False, input_norm: str = "none",
                drop_connect: float | None = None) -> HPANet:
    """Build an :class:`HPANet` by name (see :func:`available_models`), random or with ImageNet weights.

    ``pretrained``: None (random), ``"imagenet"`` (the weights an installed package ships for
    ``arch``: EfficientNet-Lite0/1/2) or a local state dict file; see :func:`load_pretrained_backbone`.
    ``output_stride`` 32 is the backbone as published; 16 keeps the last stride-2 stage at
    full resolution, so the feature map (and the CAM) of a 256-px input is 16x16, not 8x8;
    8 also the one before (32x32, EfficientNets and ResNets). The parameters are the same
    either way, so pretrained weights load into all three.
    ``bn_momentum`` (None: the architecture's own; EfficientNet's is 0.01, tuned for long
    ImageNet runs) sets every BatchNorm's running-statistics momentum: 0.1 lets a short
    training validate with settled statistics. It does not change the weights.
    ``zero_init_residual`` starts the last BatchNorm scale of every residual block at 0, so
    each block begins as the identity (Goyal et al. 2017): faster training from scratch;
    ignored when ``pretrained`` is given (the weights set those scales).
    ``input_norm`` ``per_image`` standardises each input image and channel first (see :class:`HPANet`).
    ``drop_connect``: EfficientNet's stochastic depth rate (None: its own 0.2; 0 switches it
    off, which suits short trainings from scratch); training only, ignored by other architectures.
    """
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    if arch in EFFICIENTNETS or arch in EFFICIENTNET_LITES:
        backbone, nf = efficientnet(arch, in_channels, image_size, output_stride, drop_connect)
    elif arch in TORCHVISION:
        backbone, nf = torchvision_backbone(arch, in_channels, output_stride)
    else:
        raise ValueError(f"unknown model {arch!r}; available models: {', '.join(available_models())}")
    model = HPANet(backbone, nf, num_classes, dropout, arch, input_norm)
    if bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = float(bn_momentum)
    if pretrained:
        load_pretrained_backbone(model, pretrained)
    elif zero_init_residual:
        zero_residual_bn(model)
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
        output_stride: 8, 16 or 32 (None: the image model's); the weights are the same either way.
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
    """8, 16 or 32: the total stride of a model's backbone, measured on a 64-px input."""
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    with torch.no_grad():
        f = model.backbone(torch.zeros(1, 4, 64, 64, device=param.device, dtype=param.dtype))
    model.train(was_training)
    return 64 // f.shape[-1]
