"""CAM maps after computation: normalisation, upsampling to the field, and storage.

Normalisation (:func:`normalize_cams`), documented once for every later stage: raw map
-> ReLU -> divided by its own maximum (per image and class) -> float32 in [0, 1]; a map
with no positive value stays 0. Optionally times the image-level probability of the class.

Storage (:func:`save_cam`, :func:`load_cam`): one ``.npz`` per image with the raw maps of
the selected classes as float16 at feature-map resolution ``(K_sel, h, w)``, their class
indices, and the image's 19 probabilities, logits and head biases.

Geometry (:func:`upsample_cam`): the model saw the whole field resized (squashed when not
square) to ``S x S``; feature cell ``(i, j)`` of an ``h x w`` grid covers rows
``[i H / h, (i + 1) H / h)`` and columns ``[j W / w, (j + 1) W / w)`` of the original
``H x W`` field. Bilinear upsampling with half-pixel centres maps each cell's value to the
centre of that box, independently in y and x, so non-square fields come out right.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from hpa.cam.methods import _FLOAT16_MAX
from hpa.constants import NUM_CLASSES
from hpa.utils.fs import atomic_path

#: Keys of a stored CAM file.
NPZ_KEYS = ("cams", "classes", "probs", "logits", "bias", "method", "input_size")


# --------------------------------------------------------------------------- normalisation
def normalize_cams(cams: np.ndarray, scale: np.ndarray | Sequence[float] | None = None) -> np.ndarray:
    """Raw maps ``(..., h, w)`` -> ReLU -> divided by each map's maximum -> float32 in [0, 1].

    Each map (per image and class) is divided by its own maximum, so its peak is 1 and
    its zero is the raw zero (for ``cam``: no evidence beyond the class's bias). A map with
    no positive value is all 0. ``scale``: optional multipliers ``(...,)`` in [0, 1], one per
    map (for example the image-level probabilities of the maps' classes), applied last.
    """
    cams = np.asarray(cams, np.float32)
    if cams.ndim < 2:
        raise ValueError(f"expected maps of shape (..., h, w), got {cams.shape}")
    pos = np.maximum(cams, 0.0)
    peak = pos.max(axis=(-2, -1), keepdims=True) if pos.size else np.zeros(cams.shape[:-2] + (1, 1), np.float32)
    out = np.divide(pos, peak, out=np.zeros_like(pos), where=peak > 0)
    if scale is not None:
        scale = np.asarray(scale, np.float32)
        if scale.shape != cams.shape[:-2]:
            raise ValueError(f"scale must have shape {cams.shape[:-2]} (one value per map), got {scale.shape}")
        if scale.size and (scale.min() < 0 or scale.max() > 1):
            raise ValueError(f"scale values must lie in [0, 1], got {scale.min():.3g}..{scale.max():.3g}")
        out = out * scale[..., None, None]
    return out


# --------------------------------------------------------------------------- geometry
def upsample_cam(cam: np.ndarray, out_hw: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Map CAMs from the feature grid onto a field of ``out_hw = (H, W)`` pixels.

    Args:
        cam: ``(K, h, w)`` (or ``(h, w)``) maps over the model's square input, which was the
            whole field resized to ``S x S``.
        out_hw: the ORIGINAL field's ``(H, W)`` (any aspect) or any other size of it.
        mode: ``bilinear`` (half-pixel centres: cell ``(i, j)``'s value lands on the centre of
            rows ``[i H/h, (i+1) H/h)``, columns ``[j W/w, (j+1) W/w)``) or ``nearest``
            (each cell fills that box).
    Returns:
        float32 ``(K, H, W)`` (or ``(H, W)``), the same values range as the input.
    """
    cam = np.asarray(cam, np.float32)
    squeeze = cam.ndim == 2
    if squeeze:
        cam = cam[None]
    if cam.ndim != 3:
        raise ValueError(f"expected (K, h, w) or (h, w) maps, got shape {cam.shape}")
    h_out, w_out = (int(v) for v in out_hw)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"out_hw must be positive, got {out_hw}")
    interp = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}.get(mode)
    if interp is None:
        raise ValueError(f"unknown mode {mode!r}; valid: bilinear, nearest")
    k = cam.shape[0]
    if k == 0:
        out = np.zeros((0, h_out, w_out), np.float32)
    else:
        out = np.empty((k, h_out, w_out), np.float32)
        for start in range(0, k, 4):  # cv2 resizes up to 4 channels per call without surprises
            chunk = np.ascontiguousarray(cam[start:start + 4].transpose(1, 2, 0))
            res = cv2.resize(chunk, (w_out, h_out), interpolation=interp)
            out[start:start + 4] = res.reshape(h_out, w_out, -1).transpose(2, 0, 1)
    return out[0] if squeeze else out


# --------------------------------------------------------------------------- storage
@dataclass(frozen=True)
class CamRecord:
    """One stored image: ``cams`` float32 raw maps ``(K_sel, h, w)`` (stored as float16),
    ``classes`` int64 ``(K_sel,)``, ``probs`` float32 ``(19,)`` in [0, 1], ``logits`` float32
    ``(19,)``, the ``method`` name, the model's ``input_size`` S and its head ``bias`` float32
    ``(19,)`` (``cams[i] + bias[classes[i]]``: local logits, for method ``cam``)."""

    cams: np.ndarray
    classes: np.ndarray
    probs: np.ndarray
    logits: np.ndarray
    method: str
    input_size: int
    bias: np.ndarray | None = None

    def normalized(self, times_prob: bool = False) -> np.ndarray:
        """:func:`normalize_cams` of the stored maps, optionally times each class's probability."""
        return normalize_cams(self.cams, self.probs[self.classes] if times_prob else None)

    def cam_of(self, c: int) -> np.ndarray:
        """The raw map ``(h, w)`` of class ``c``; KeyError if it was not stored."""
        hits = np.flatnonzero(self.classes == int(c))
        if not hits.size:
            raise KeyError(f"no CAM stored for class {c}; stored classes: {self.classes.tolist()}")
        return self.cams[hits[0]]


def save_cam(path: str | os.PathLike, cams: np.ndarray, classes: Sequence[int], probs: np.ndarray,
             logits: np.ndarray, method: str = "cam", input_size: int = 0, bias: np.ndarray | None = None) -> Path:
    """Write one image's CAMs atomically as ``.npz``.

    Args:
        cams: raw maps ``(K_sel, h, w)``, stored as float16 (values beyond +-65504 are clipped).
        classes: ``K_sel`` distinct class indices in 0..18. probs, logits: ``(19,)``.
        bias: the model's head bias ``(19,)`` (:func:`head_bias`; None: zeros).
    """
    path = Path(path)
    cams = np.asarray(cams, np.float32)
    classes = np.asarray(classes, np.int64).reshape(-1)
    probs = np.asarray(probs, np.float32).reshape(-1)
    logits = np.asarray(logits, np.float32).reshape(-1)
    bias = np.zeros(NUM_CLASSES, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(-1)
    if cams.ndim != 3 or cams.shape[0] != classes.size:
        raise ValueError(f"{path.name}: cams must be (K_sel, h, w) with K_sel = {classes.size} classes, got {cams.shape}")
    if len(set(classes.tolist())) != classes.size or (classes.size and not (0 <= classes.min() and classes.max() < NUM_CLASSES)):
        raise ValueError(f"{path.name}: classes must be distinct indices in 0..{NUM_CLASSES - 1}, got {classes.tolist()}")
    if probs.shape != (NUM_CLASSES,) or logits.shape != (NUM_CLASSES,) or bias.shape != (NUM_CLASSES,):
        raise ValueError(f"{path.name}: probs, logits and bias must have {NUM_CLASSES} values, got {probs.shape}, "
                         f"{logits.shape}, {bias.shape}")
    if not (np.isfinite(cams).all() and np.isfinite(logits).all()):
        raise ValueError(f"{path.name}: CAMs or logits are not finite (NaN/inf): is the model diverged?")
    if probs.min() < 0 or probs.max() > 1:
        raise ValueError(f"{path.name}: probabilities must lie in [0, 1]")
    with atomic_path(path) as tmp:
        np.savez(tmp, cams=np.clip(cams, -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16), classes=classes,
                 probs=probs, logits=logits, bias=bias, method=np.array(method), input_size=np.array(int(input_size)))
    return path


def load_cam(path: str | os.PathLike) -> CamRecord:
    """Read a file written by :func:`save_cam`; errors name the file and what is wrong."""
    from hpa.io.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: CAM file not found (run stage 02 for this split: stages/02_cam.py)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise InputError(f"{path}: not a CAM file of stage 02 (missing {missing})")
            rec = CamRecord(z["cams"].astype(np.float32), z["classes"].astype(np.int64), z["probs"].astype(np.float32),
                            z["logits"].astype(np.float32), str(z["method"]), int(z["input_size"]),
                            z["bias"].astype(np.float32))
    except InputError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise InputError(f"{path}: cannot read CAM file ({type(exc).__name__}: {exc})") from None
    if rec.cams.ndim != 3 or rec.cams.shape[0] != rec.classes.size or rec.probs.shape != (NUM_CLASSES,):
        raise InputError(f"{path}: inconsistent CAM file (cams {rec.cams.shape}, classes {rec.classes.shape}, "
                         f"probs {rec.probs.shape})")
    return rec
