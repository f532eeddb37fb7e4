"""Criteria of the two tasks (multi-label BCE / focal, multi-class cross-entropy) and the head's prior bias.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

TASKS = ("multilabel", "multiclass")
LOSSES = {"multilabel": ("bce", "focal"), "multiclass": ("ce",)}


def make_loss(task: str, loss: str, label_smoothing: float = 0.0, class_weights: Sequence[float] | None = None,
              focal_gamma: float = 2.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A criterion ``(logits (B, K) float, target) -> scalar``.

    multilabel: ``bce`` (binary cross-entropy, targets in [0, 1] smoothed towards 0.5 by
    ``label_smoothing``) or ``focal`` (sigmoid focal loss, ``focal_gamma``), mean over batch
    and classes. multiclass: ``ce`` with ``label_smoothing``; target class indices ``(B,)``
    or probabilities ``(B, K)``. ``class_weights`` (K,) multiply each class's term.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if loss not in LOSSES[task]:
        raise ValueError(f"loss {loss!r} does not fit task {task!r}; valid: {', '.join(LOSSES[task])}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    cw = None if class_weights is None else torch.as_tensor(np.asarray(class_weights, np.float32))

    if task == "multiclass":
        def ce(logits, target):
            w = None if cw is None else cw.to(logits.device)
            return F.cross_entropy(logits, target, weight=w, label_smoothing=label_smoothing)
        return ce

    def multilabel(logits, target):
        target = target.float()
        if label_smoothing:
            target = target * (1 - label_smoothing) + 0.5 * label_smoothing
        if loss == "focal":  # torchvision's sigmoid focal loss; alpha=-1: no positive/negative weighting
            per = sigmoid_focal_loss(logits, target, alpha=-1, gamma=focal_gamma, reduction="none")
        else:
            per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if cw is not None:
            per = per * cw.to(logits.device)
        return per.mean()
    return multilabel


def init_head_bias(model: nn.Module, targets: np.ndarray, task: str = "multilabel", floor: float = 1e-3) -> None:
    """Start the head's bias at the class prior (the first steps then learn patterns, not frequencies).

    multilabel: ``bias_k = log(p_k / (1 - p_k))`` with ``p_k`` the positive rate of class k in
    ``targets`` ``(N, K)``; multiclass: ``bias_k = log p_k`` (targets one-hot/soft ``(N, K)``).
    Rates are clipped to ``[floor, 1 - floor]``.
    """
    t = np.asarray(targets, np.float64)
    head = model.head if hasattr(model, "head") else None
    if head is None or t.ndim != 2 or t.shape[1] != head.out_features:
        raise ValueError(f"targets must be (N, {getattr(head, 'out_features', '?')}), got {t.shape}")
    p = np.clip(t.mean(0), floor, 1 - floor)
    bias = np.log(p / (1 - p)) if task == "multilabel" else np.log(p / p.sum())
    with torch.no_grad():
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
