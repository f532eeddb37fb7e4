"""``model.pt`` / ``last.pt``: atomic saves, the model's meta, and loading a trained model back.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from hpa.constants import CLASS_NAMES
from hpa.utils.fs import atomic_path


def save_checkpoint(path: str | os.PathLike, obj: dict) -> Path:
    """``torch.save`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_model(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Restore a model written by :func:`fit` (``model.pt``) in eval mode.

    Returns ``(model, meta)``; meta keys: ``arch, num_classes, in_channels, output_stride,
    input_norm, dropout, image_size, task, class_names, mean, std, epochs, thresholds`` (multi-label) and
    whatever ``extra_meta`` the training run added.
    """
    from hpa.models.factory import build_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found: train the model first (stage 01 or 05)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise ValueError(f"{path} is not a model written by hpa.engine.trainer.fit (no 'model'/'meta' entries)")
    meta = ckpt["meta"]
    model = build_model(meta["arch"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                        dropout=meta.get("dropout", 0.0), image_size=meta.get("image_size"),
                        output_stride=meta.get("output_stride", 32), input_norm=meta.get("input_norm", "none"))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), meta


def model_meta(model: nn.Module, task: str, in_shape: tuple, mean, std, epochs: int, extra: dict | None) -> dict:
    from hpa.models.factory import HPANet

    if not isinstance(model, HPANet):
        raise TypeError(f"fit trains hpa.models.factory.HPANet models, got {type(model).__name__}")
    probe = next(model.parameters())
    was = model.training
    model.eval()
    with torch.no_grad():
        f = model.features(torch.zeros(1, in_shape[0], 64, 64, device=probe.device))
    model.train(was)
    meta = {"arch": model.arch, "num_classes": model.head.out_features, "in_channels": int(in_shape[0]),
            "output_stride": int(64 // f.shape[-1]), "dropout": float(model.dropout.p), "image_size": int(in_shape[-1]),
            "input_norm": getattr(model, "input_norm_name", "none"),
            "task": task, "class_names": list(CLASS_NAMES)[: model.head.out_features]
            if model.head.out_features <= len(CLASS_NAMES) else [str(i) for i in range(model.head.out_features)],
            "mean": None if mean is None else [float(v) for v in mean],
            "std": None if std is None else [float(v) for v in std], "epochs": int(epochs)}
    meta.update(extra or {})
    return meta
