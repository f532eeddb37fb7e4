"""Class activation maps (CAMs): methods by name and their batched computation (maps: :mod:`hpa.cam.maps`).

Methods (:func:`available_methods`):

- ``cam`` (default): the class activation map of Zhou et al. (2016) for a global-average-
  pooling + linear head, exact. One forward pass
  (:meth:`hpa.models.factory.HPANet.forward_with_cams`) gives the maps of all classes:
  ``cam_k(y, x) = head.weight[k] . F(y, x)``, so that ``mean(cam_k) + head.bias[k]`` is the
  class logit exactly. The bias is kept apart (stored as ``bias``): it holds the class prior
  (stage 01 initialises it to the log-odds of the class frequency), and adding it before the
  ReLU would empty the maps of every labelled class the model is unsure of.
  ``cam_k + bias_k`` is a *local logit* for those who want one.
- every other name runs a method of the ``grad-cam`` package (pytorch-grad-cam) on the
  backbone's output (:func:`cam_target_layer`): ``gradcam``, ``gradcam++``, ``xgradcam``,
  ``layercam``, ``eigencam``, ``scorecam``, ... One class at a time over the whole batch.
  For this head Grad-CAM equals ``cam_k / (h * w)``: the same map up to a positive factor,
  at 19 times the cost.

The grad-cam wrapper (:func:`compute_cams`) keeps raw magnitudes and every map: grad-cam's
``__call__`` min-max normalises each map and resizes it to the input (its ``scale_cam_image``
step, issue #267), and pairs targets with images one to one, silently returning fewer maps
when a batch has fewer targets than images (#328). Here the method's own ``get_cam_image``
(which holds its ``get_cam_weights``) is called directly on the target layer's activations
and gradients, per class with one explicit target per image, inside a context that
releases grad-cam's hooks (it leaks memory otherwise) without swallowing errors (its
``__exit__`` swallows ``IndexError``); the count of maps is asserted. One forward pass
serves all classes; each class costs one backward pass through the head only.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

#: CAM methods by name: ``cam`` is ours (exact, one pass); the others are grad-cam classes.
METHODS: dict[str, str | None] = {
    "cam": None,
    "gradcam": "GradCAM",
    "hirescam": "HiResCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "gradcam-elementwise": "GradCAMElementWise",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
    "randomcam": "RandomCAM",
}


_FLOAT16_MAX = float(np.finfo(np.float16).max)


def available_methods() -> list[str]:
    """Names accepted by :func:`compute_cams` (``cam`` first)."""
    return list(METHODS)


def check_method(name: str) -> str:
    """Return ``name`` if it is a known method; otherwise raise listing the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown CAM method {name!r}; valid methods: {', '.join(available_methods())}")
    return name


def head_bias(model: nn.Module) -> np.ndarray:
    """float32 ``(K,)``: the bias of the model's linear ``head`` (zeros when it has none)."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        if head.bias is None:
            return np.zeros(head.out_features, np.float32)
        return head.bias.detach().float().cpu().numpy()
    raise TypeError(f"expected a model with a linear .head (hpa.models.factory.HPANet), got {type(model).__name__}")


def cam_target_layer(model: nn.Module) -> nn.Module:
    """The layer whose output is the last feature map: ``model.backbone`` of an HPANet.

    Its output is exactly what the pooling + linear head sees (for a ResNet it is the
    output of the last block, ``layer4``; for an EfficientNet the head convolution after
    the last block), so Grad-CAM on it is comparable with the exact CAM.
    """
    layer = getattr(model, "backbone", None)
    if not isinstance(layer, nn.Module):
        raise TypeError(f"expected an hpa.models.factory.HPANet (a model with a .backbone module), got {type(model).__name__}; "
                        "pass target_layer explicitly")
    return layer


# --------------------------------------------------------------------------- computation
@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@contextlib.contextmanager
def _released(cam_object) -> Iterator:
    """Like grad-cam's own ``with`` block (hooks released at the end) but errors propagate."""
    try:
        yield cam_object
    finally:
        cam_object.activations_and_grads.release()


def _check_batch(x: torch.Tensor, model: nn.Module) -> None:
    if not torch.is_tensor(x) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float (B, C, H, W) tensor (normalised fields), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    probe = next(model.parameters(), None)
    if probe is not None and probe.device != x.device:
        raise ValueError(f"batch is on {x.device} but the model is on {probe.device}")


def _native(model: nn.Module, x: torch.Tensor, classes: list[int], autocast: torch.dtype | None):
    if not hasattr(model, "forward_with_cams"):
        raise TypeError(f"method 'cam' needs a model with forward_with_cams (hpa.models.factory.HPANet), got "
                        f"{type(model).__name__}; use a grad-cam method such as 'gradcam'")
    ctx = (torch.autocast(device_type=x.device.type, dtype=autocast) if autocast is not None
           else contextlib.nullcontext())
    with torch.inference_mode(), ctx:
        logits, cams = model.forward_with_cams(x)
        if model.head.bias is not None:
            cams = cams - model.head.bias[None, :, None, None]  # W . F: the bias is kept apart
        cams = cams[:, classes].float()
    return logits.float(), cams


def _gradcam_family(model: nn.Module, x: torch.Tensor, classes: list[int], method: str, layer: nn.Module):
    try:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as exc:
        raise ImportError(f"CAM method {method!r} needs the grad-cam package: pip install grad-cam ({exc})") from exc
    cls = getattr(pytorch_grad_cam, METHODS[method])
    b = x.shape[0]
    live: dict[str, torch.Tensor] = {}
    hook = layer.register_forward_hook(lambda _m, _i, out: live.__setitem__("out", out))
    try:
        with _released(cls(model=model, target_layers=[layer])) as engine, torch.enable_grad():
            xg = x.detach().requires_grad_(True)  # the layer output needs a graph even with frozen weights
            logits = engine.activations_and_grads(xg)
            if "out" not in live or not torch.is_tensor(live["out"]) or live["out"].ndim != 4:
                raise RuntimeError(f"target layer {type(layer).__name__} gave no (B, C, h, w) output")
            out = live["out"]
            acts = out.detach().float().cpu().numpy()
            maps = []
            for n, k in enumerate(classes):
                targets = [ClassifierOutputTarget(int(k)) for _ in range(b)]  # one explicit target per image
                grads = None
                if engine.uses_gradients:
                    score = sum(t(o) for t, o in zip(targets, logits))
                    grads = torch.autograd.grad(score, out, retain_graph=n < len(classes) - 1)[0]
                    grads = grads.detach().float().cpu().numpy()
                raw = engine.get_cam_image(xg.detach(), layer, targets, acts, grads, False)
                engine.activations_and_grads.clear()  # score/ablation methods run the model again
                raw = np.asarray(raw, np.float32)
                if raw.shape != (b,) + acts.shape[2:]:
                    raise RuntimeError(f"grad-cam {METHODS[method]} returned maps of shape {raw.shape} for class {k}; "
                                       f"expected {b} maps of {acts.shape[2:]}")
                maps.append(raw)
    finally:
        hook.remove()
    cams = np.stack(maps, 1) if maps else np.zeros((b, 0) + acts.shape[2:], np.float32)
    return logits.detach().float(), torch.from_numpy(cams).to(x.device)


def _one_view(model, x, classes, method, layer, autocast):
    """One view of the batch in passes of :func:`hpa.engine.tiling.pass_size` items (tiles overflow a CPU's caches)."""
    from hpa.engine.tiling import pass_size

    n = pass_size(x)
    if x.shape[0] <= n:
        return _one_view_pass(model, x, classes, method, layer, autocast)
    parts = [_one_view_pass(model, xs, classes, method, layer, autocast) for xs in x.split(n)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _one_view_pass(model, x, classes, method, layer, autocast):
    if method == "cam":
        return _native(model, x, classes, autocast)
    return _gradcam_family(model, x, classes, method, layer)


#: (transform of the input, inverse transform of a (B, K, h, w) map) for flip TTA.
_FLIPS = ((lambda t: t, lambda t: t), (lambda t: t.flip(-1), lambda t: t.flip(-1)),
          (lambda t: t.flip(-2), lambda t: t.flip(-2)))


def compute_cams(model: nn.Module, x: torch.Tensor, method: str = "cam", classes: Sequence[int] | None = None,
                 tta_flip: bool = False, target_layer: nn.Module | None = None,
                 autocast: torch.dtype | None = None, tile: int | None = None,
                 tile_stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits and raw (un-normalised) CAMs of a batch.

    Args:
        model: an :class:`hpa.models.factory.HPANet` (any model for grad-cam methods, with
            ``target_layer``); put in eval mode for the call, its mode restored after.
        x: float32 ``(B, C, S, S)`` normalised fields on the model's device.
        method: a name of :func:`available_methods`.
        classes: class indices whose maps are returned (default: all K, in order).
        tta_flip: average logits and maps over the input, its horizontal and its vertical
            flip (maps flipped back before averaging).
        target_layer: grad-cam methods: the layer to explain (default :func:`cam_target_layer`).
        autocast: ``cam`` method on CUDA: e.g. ``torch.bfloat16`` (None: float32).
        tile, tile_stride: a model trained on crops of side ``tile`` sees the fields as
            overlapping tiles of that side (:mod:`hpa.engine.tiling`): logits are ``logit(mean over
            tiles of the tile probability)``, maps the tiles' maps averaged on the field's
            grid. None (or fields no larger than a tile): one pass per field.
    Returns:
        ``(logits, cams)``: float32 ``(B, K)`` and float32 ``(B, len(classes), h, w)`` raw
        maps (``cam``: ``head.weight[k] . F``, any sign; grad-cam methods: the method's map
        before its ReLU and min-max step). For ``cam`` without tiles: ``cams.mean((2, 3)) +
        head.bias == logits`` (with or without TTA), and ``gradcam`` gives ``cams / (h * w)``.
    """
    from hpa.engine.tiling import make_tiles, mean_tile_probs, needs_tiles, prob_logit, stitch

    check_method(method)
    _check_batch(x, model)
    k_all = None
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        k_all = head.out_features
    if classes is None:
        if k_all is None:
            raise ValueError("give classes explicitly for a model without a linear .head")
        classes = list(range(k_all))
    classes = [int(c) for c in classes]
    if k_all is not None and any(not 0 <= c < k_all for c in classes):
        raise ValueError(f"classes must lie in 0..{k_all - 1}, got {classes}")
    layer = None if method == "cam" else (target_layer or cam_target_layer(model))
    views = _FLIPS if tta_flip else _FLIPS[:1]
    tiled = needs_tiles(x, tile)
    xin, offsets = make_tiles(x, int(tile), tile_stride) if tiled else (x, None)
    logits_sum = cams_sum = None
    with _eval_mode(model):
        for fwd, inv in views:
            logits, cams = _one_view(model, fwd(xin), classes, method, layer, autocast)
            cams = inv(cams)
            logits_sum = logits if logits_sum is None else logits_sum + logits
            cams_sum = cams if cams_sum is None else cams_sum + cams
    n = float(len(views))
    logits, cams = logits_sum / n, (cams_sum / n).cpu().numpy().astype(np.float32)
    if tiled:
        b = x.shape[0]
        logits = prob_logit(mean_tile_probs(logits, b))
        cams = stitch(cams.reshape((b, len(offsets)) + cams.shape[1:]), offsets, tuple(x.shape[-2:]), int(tile))
    return logits.cpu().numpy().astype(np.float32), cams


@dataclass
class ImageCams:
    """CAMs of one image: ``logits``/``probs`` float32 (K,), ``classes`` int64 (K_sel,),
    ``cams`` float32 raw maps (K_sel, h, w) of those classes."""

    logits: np.ndarray
    probs: np.ndarray
    classes: np.ndarray
    cams: np.ndarray


def select_classes(probs: np.ndarray, labels: Sequence[int] | None = None, prob_floor: float = 0.0) -> list[int]:
    """Classes whose maps are kept for one image.

    Train images (``labels`` given): exactly their labels (sorted, duplicates removed).
    Test images (``labels`` None): every class with ``probs[c] >= prob_floor`` (floor 0:
    all K classes).
    """
    if labels is not None:
        return sorted({int(c) for c in labels})
    return [int(c) for c in np.flatnonzero(np.asarray(probs) >= prob_floor)]


def enlarge(x: torch.Tensor, scale: float) -> torch.Tensor:
    """A batch ``(B, C, H, W)`` resized (bilinear) to ``(round(H s), round(W s))``; ``scale`` 1: ``x`` itself."""
    if scale == 1:
        return x
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    h, w = x.shape[-2:]
    return torch.nn.functional.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))),
                                           mode="bilinear", align_corners=False)


def image_cams(model: nn.Module, x: torch.Tensor, method: str = "cam", labels: Sequence[Sequence[int]] | None = None,
               prob_floor: float = 0.0, tta_flip: bool = False, target_layer: nn.Module | None = None,
               autocast: torch.dtype | None = None, tile: int | None = None, scale: float = 1.0) -> list[ImageCams]:
    """:func:`compute_cams` with per-image class selection (:func:`select_classes`).

    Args:
        x: float32 ``(B, C, S, S)`` normalised batch on the model's device.
        labels: train: one list of class indices per image; test: None (all classes, or
            those with probability >= ``prob_floor``).
        tile: the model's training crop size, for tiled inference (:func:`compute_cams`).
        scale: the maps come from the batch enlarged ``scale`` times (:func:`enlarge`; tiles keep
            their side, so there are more of them), the logits and probabilities from the batch as
            given, the scale the model was trained at. At ``scale`` > 1 a cell spans more feature
            pixels and more of the network's receptive field: on the hard benchmark the maps then
            separate an image's cells better (docs/cams.md, "Enlarged maps").
    Returns:
        B :class:`ImageCams`. ``cam`` computes all classes in one pass and keeps the selected
        ones; grad-cam methods compute only the union of the batch's selected classes. The maps
        are ``scale`` times as many feature pixels a side as at 1.
    """
    if labels is not None and len(labels) != x.shape[0]:
        raise ValueError(f"labels: expected {x.shape[0]} lists (one per image), got {len(labels)}")
    from hpa.engine.inference import field_probs
    from hpa.engine.tiling import prob_logit

    wanted = pre_probs = None
    if scale != 1 or (method != "cam" and labels is None and prob_floor > 0):
        pre_probs = field_probs(model, x, tile, tta_flip)  # the probabilities compute_cams gives at scale 1
    if method != "cam":
        if labels is not None:
            wanted = sorted({int(c) for lab in labels for c in lab})
        elif prob_floor > 0:
            # a margin, so a class at the floor is not lost to rounding between the two passes
            wanted = sorted({c for p in pre_probs for c in select_classes(p, None, prob_floor - 1e-4)})
    logits, cams = compute_cams(model, enlarge(x, scale), method, wanted, tta_flip, target_layer, autocast, tile)
    if scale != 1:  # the probabilities at the model's own scale
        logits = prob_logit(pre_probs.astype(np.float64)).astype(np.float32)
    columns = list(range(logits.shape[1])) if wanted is None else wanted
    col_of = {c: i for i, c in enumerate(columns)}
    out = []
    for b in range(x.shape[0]):
        probs = 1.0 / (1.0 + np.exp(-logits[b].astype(np.float64)))
        sel = select_classes(probs, None if labels is None else labels[b], prob_floor)
        sel = [c for c in sel if c in col_of]
        out.append(ImageCams(logits[b], probs.astype(np.float32), np.asarray(sel, np.int64),
                             cams[b, [col_of[c] for c in sel]] if sel else np.zeros((0,) + cams.shape[2:], np.float32)))
    return out


