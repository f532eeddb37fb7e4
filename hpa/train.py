"""The training loop shared by the image model (stage 01) and the cell model (stage 05).

:func:`fit` trains any :class:`hpa.models.HPANet` on two datasets and writes into ``out_dir``:

- ``last.pt`` after every epoch (model, optimizer, RNG states, step, history), atomically;
  re-running the same call resumes at the next epoch, and a run whose ``model.pt`` records
  the requested epochs is skipped (``force=True`` starts again);
- ``model.pt`` at the end: weights + everything :func:`load_model` needs (arch, output
  stride, classes, normalisation mean/std, input size, task, thresholds, ``extra_meta``);
- ``metrics.csv`` (one row per epoch), ``val_predictions.csv`` (index columns, ``p0..p18``
  probabilities, ``y0..y18`` targets), ``thresholds.json`` (multi-label: per-class F1-optimal
  thresholds on validation) and ``curves.png``.

Data contract: a dataset item is ``(x, target)``; ``x`` a uint8 ``(C, S, S)`` tensor in 0..255
or a float tensor in [0, 1] (raw intensities). On the device, the loop scales to [0, 1],
applies ``augment`` (training only) and normalises with the per-channel ``mean``/``std``
(``normalize=False``: batches go to the model unchanged, for datasets that normalise
themselves). Targets: multi-label ``(K,)`` 0/1 floats; multi-class a class index or a
``(K,)`` probability vector (soft labels).

Optimisation: AdamW (no weight decay on biases and norm layers), linear warm-up then cosine
decay per optimizer step, BCE / focal (multi-label) or cross-entropy with label smoothing
(multi-class), optional class weights, class-balanced sampling from ``sample_weights``,
bf16 autocast (CUDA by default, CPU on request), channels-last, gradient accumulation.

Distributed: launched by ``torchrun --nproc_per_node N``, :func:`init_distributed` joins the
process group (gloo on CPU, nccl on CUDA); the loop wraps the model in
DistributedDataParallel, gives each rank its share of every epoch's samples, validates on
rank 0 and only rank 0 writes files.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .constants import CLASS_NAMES
from .fsutil import atomic_path, write_csv, write_json

log = logging.getLogger(__name__)

TASKS = ("multilabel", "multiclass")
LOSSES = {"multilabel": ("bce", "focal"), "multiclass": ("ce",)}
AMP_CHOICES = ("auto", "bf16", "off")


# --------------------------------------------------------------------------- distributed
def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    Returns ``(rank, world_size)``; ``(0, 1)`` for an ordinary single process. Backend:
    nccl for CUDA devices, gloo otherwise. Safe to call twice.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of this process (``(0, 1)`` outside a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return dist_info()[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist_info()[1] > 1:
        torch.distributed.barrier()


def local_device(device: str) -> str:
    """``cuda`` -> ``cuda:LOCAL_RANK`` under torchrun; anything else unchanged."""
    if device == "cuda" and dist_info()[1] > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def _broadcast(obj):
    if dist_info()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- sampling
class EpochSampler(torch.utils.data.Sampler):
    """This rank's indices for one epoch, a pure function of ``(seed, epoch)``.

    Without weights: ``num_samples`` (default n) indices from consecutive permutations of
    ``0..n-1`` (``shuffle``) or ``0, 1, ..., n-1, 0, ...``. With
    ``weights``: ``num_samples`` draws with replacement, probability proportional to the
    weights (class-balanced sampling). Under DDP every rank draws the same list and takes
    every ``world``-th entry from ``rank`` (the list is padded to a multiple of ``world``),
    so the ranks see disjoint shares. Being stateless in the epoch, it makes a resumed run
    see the same samples an uninterrupted run would.
    """

    def __init__(self, n: int, weights: np.ndarray | None = None, num_samples: int | None = None,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world: int = 1):
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.weights = None
        if weights is not None:
            w = np.asarray(weights, np.float64)
            if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"sample_weights must be {n} finite non-negative numbers with a positive sum")
            self.weights = torch.from_numpy(w)
        self.num_samples = int(num_samples or n)
        self.per_rank = math.ceil(self.num_samples / world)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        if self.weights is not None:
            idx = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g)
        elif self.shuffle:  # whole permutations, as many as num_samples needs
            reps = -(-self.num_samples // self.n)
            idx = torch.cat([torch.randperm(self.n, generator=g) for _ in range(reps)])[: self.num_samples]
        else:
            idx = torch.arange(self.num_samples) % self.n
        idx = idx.tolist()
        total = self.per_rank * self.world
        idx += idx[: total - len(idx)]
        return idx[self.rank:total:self.world]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return self.per_rank


def _seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


# --------------------------------------------------------------------------- losses, schedule
def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float = 0.01) -> float:
    """Learning rate after ``step`` optimizer steps: linear warm-up to ``peak``, cosine to ``floor * peak``."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    t = min(max(t, 0.0), 1.0)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


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
        per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if loss == "focal":
            p = torch.sigmoid(logits)
            pt = p * target + (1 - p) * (1 - target)
            per = per * (1 - pt).pow(focal_gamma)
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


# --------------------------------------------------------------------------- metrics
def tune_thresholds(probs: np.ndarray, targets: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
    """Per-class threshold (K,) maximising F1 on ``(probs, targets)`` (0.5 for classes without positives)."""
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2) if grid is None else grid
    y = targets > 0.5
    thr = np.full(probs.shape[1], 0.5, np.float32)
    for k in range(probs.shape[1]):
        if not y[:, k].any():
            continue
        pred = probs[:, k][:, None] >= grid[None, :]
        tp = (pred & y[:, k][:, None]).sum(0)
        f1 = 2 * tp / np.maximum(pred.sum(0) + y[:, k].sum(), 1)
        thr[k] = grid[int(np.argmax(f1))]
    return thr


def compute_metrics(task: str, probs: np.ndarray, targets: np.ndarray,
                    thresholds: np.ndarray | None = None) -> dict[str, float]:
    """Validation metrics.

    multilabel: ``mAP`` (sklearn average precision, macro over classes with at least one
    positive), ``f1`` (macro F1 over those classes at per-class ``thresholds``; tuned here
    when None). multiclass: ``mAP`` (one-vs-rest, same rule), ``acc`` and ``f1`` (macro F1
    of the arg-max over the classes present). Targets of multiclass may be indices or
    probabilities (their arg-max is used).
    """
    from sklearn.metrics import average_precision_score, f1_score

    probs = np.asarray(probs, np.float64)
    k = probs.shape[1]
    if task == "multiclass":
        t = np.asarray(targets)
        y_idx = t.argmax(1) if t.ndim == 2 else t.astype(int)
        y = np.eye(k, dtype=bool)[y_idx]
    else:
        y = np.asarray(targets) > 0.5
    present = np.flatnonzero(y.any(0) & (~y).any(0))
    out = {"mAP": float("nan"), "f1": float("nan")}
    if present.size:
        out["mAP"] = float(np.mean([average_precision_score(y[:, c], probs[:, c]) for c in present]))
    if task == "multiclass":
        pred = probs.argmax(1)
        out["acc"] = float((pred == y_idx).mean())
        labels = np.flatnonzero(y.any(0))
        out["f1"] = float(f1_score(y_idx, pred, labels=labels, average="macro", zero_division=0))
    elif present.size:
        thr = tune_thresholds(probs, y) if thresholds is None else np.asarray(thresholds)
        pred = probs >= thr[None, :]
        out["f1"] = float(np.mean([f1_score(y[:, c], pred[:, c], zero_division=0) for c in present]))
    return out


# --------------------------------------------------------------------------- helpers
def amp_dtype(amp: str, device: str) -> torch.dtype | None:
    """``auto``: bf16 on CUDA, none on CPU; ``bf16``: bf16 everywhere; ``off``: none."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"unknown amp setting {amp!r}; valid: {', '.join(AMP_CHOICES)}")
    if amp == "bf16" or (amp == "auto" and str(device).startswith("cuda")):
        return torch.bfloat16
    return None


def _autocast(device: str, dtype):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type="cuda" if str(device).startswith("cuda") else "cpu", dtype=dtype)


def prepare_batch(x: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None,
                  augment: Callable | None = None, channels_last: bool = False) -> torch.Tensor:
    """uint8 0..255 or float [0, 1] ``(B, C, H, W)`` on the device -> augmented, normalised float32."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    else:
        x = x.float()
    if augment is not None:
        x = augment(x)
    if mean is not None:
        x = (x - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _check_dataset(ds, name: str) -> tuple[tuple, torch.dtype]:
    if ds is None or len(ds) == 0:
        raise ValueError(f"{name} dataset is empty")
    item = ds[0]
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(f"{name} dataset items must be (x, target) pairs, got {type(item).__name__}")
    x = item[0]
    if not torch.is_tensor(x) or x.ndim != 3 or x.dtype not in (torch.uint8, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} dataset: x must be a uint8 or float (C, H, W) tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    return tuple(x.shape), x.dtype


# --------------------------------------------------------------------------- checkpoints
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
    from .models import build_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found: train the model first (stage 01 or 05)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise ValueError(f"{path} is not a model written by hpa.train.fit (no 'model'/'meta' entries)")
    meta = ckpt["meta"]
    model = build_model(meta["arch"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                        dropout=meta.get("dropout", 0.0), image_size=meta.get("image_size"),
                        output_stride=meta.get("output_stride", 32), input_norm=meta.get("input_norm", "none"))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), meta


def _model_meta(model: nn.Module, task: str, in_shape: tuple, mean, std, epochs: int, extra: dict | None) -> dict:
    from .models import HPANet

    if not isinstance(model, HPANet):
        raise TypeError(f"fit trains hpa.models.HPANet models, got {type(model).__name__}")
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


# --------------------------------------------------------------------------- prediction
@torch.no_grad()
def predict(model: nn.Module, meta: dict, data, batch_size: int = 32, device: str = "cpu", tta_flip: bool = False,
            num_workers: int = 0, amp: str = "auto", progress: bool = False) -> np.ndarray:
    """Class probabilities of every field/crop of ``data``.

    Args:
        model, meta: from :func:`load_model` (or a trained model and its meta).
        data: uint8 array/memmap ``(N, C, H, W)`` (0..255), float array in [0, 1], or a
            dataset whose items are ``x`` or ``(x, target)`` as in :func:`fit`.
        tta_flip: average over the input and its horizontal flip.
    Multi-label models trained on crops (``meta["tile"]``) see items larger than a crop as
    overlapping tiles (:func:`hpa.tiling.tiled_probs`), as in their validation.
    Returns:
        float32 ``(N, K)``: sigmoid probabilities (multilabel) or softmax (multiclass).
    """
    from .tiling import make_tiles, needs_tiles

    if isinstance(data, np.ndarray):
        if data.ndim != 4 or data.shape[1] != meta["in_channels"]:
            raise ValueError(f"expected a (N, {meta['in_channels']}, H, W) array, got shape {data.shape}")
        data = _ArrayDataset(data)
    model = model.to(device).eval()
    mean = std = None
    if meta.get("mean") is not None and meta.get("normalize", True):
        mean = torch.tensor(meta["mean"], device=device).view(1, -1, 1, 1)
        std = torch.tensor(meta["std"], device=device).view(1, -1, 1, 1)
    dtype = amp_dtype(amp, device)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = []
    for batch in tqdm(loader, desc="predict", disable=not progress, mininterval=2.0):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = prepare_batch(x.to(device, non_blocking=True), mean, std)
        multiclass = meta.get("task") == "multiclass"
        tiled = not multiclass and needs_tiles(x, meta.get("tile"))
        xin = make_tiles(x, int(meta["tile"]))[0] if tiled else x
        with _autocast(device, dtype):
            logits = model(xin).float()
            if tta_flip:
                logits2 = model(xin.flip(-1)).float()
        act = (lambda z: torch.softmax(z, 1)) if multiclass else torch.sigmoid
        p = act(logits) if not tta_flip else 0.5 * (act(logits) + act(logits2))
        if tiled:
            p = p.reshape(len(x), -1, p.shape[-1]).mean(1)
        out.append(p.cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, meta["num_classes"]), np.float32)


class _ArrayDataset(torch.utils.data.Dataset):
    def __init__(self, arr: np.ndarray):
        self.arr = arr

    def __len__(self):
        return len(self.arr)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.arr[i]))


# --------------------------------------------------------------------------- the loop
def fit(model: nn.Module, train_ds, val_ds, out_dir: str | os.PathLike, *, task: str = "multilabel",
        epochs: int = 10, batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 1e-2,
        warmup_epochs: float = 1.0, loss: str = "bce", focal_gamma: float = 2.0, label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None, sample_weights: np.ndarray | None = None,
        samples_per_epoch: int | None = None, mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None, normalize: bool = True, augment: Callable | None = None,
        amp: str = "auto", channels_last: bool = True, accumulate: int = 1, grad_clip: float | None = None,
        num_workers: int = 0, seed: int = 0, device: str = "cpu", val_index: pd.DataFrame | None = None,
        extra_meta: dict | None = None, force: bool = False, progress: bool = True, val_every: int = 1,
        val_tile: int | None = None,
        on_epoch_end: Callable[[int, list], None] | None = None) -> list[dict]:
    """Train ``model`` and write its checkpoints, metrics and validation predictions to ``out_dir``.

    Args:
        model: an :class:`hpa.models.HPANet` (any arch); trained in place.
        train_ds, val_ds: datasets of ``(x, target)``, see the module docstring. ``val_ds``
            may be None (no validation metrics, no thresholds).
        task: ``multilabel`` (sigmoid per class) or ``multiclass`` (softmax).
        epochs: total epochs; a re-run with more epochs than a finished run continues it.
        batch_size: images per step per process; ``accumulate`` steps per optimizer update.
        lr, weight_decay, warmup_epochs: AdamW peak rate, decay, linear warm-up length (epochs,
            may be fractional), then cosine decay to 1% of ``lr``.
        loss, focal_gamma, label_smoothing, class_weights: see :func:`make_loss`.
        sample_weights: (len(train_ds),) non-negative: draw ``samples_per_epoch`` (default
            len(train_ds)) samples per epoch with replacement with these probabilities.
        mean, std: per-channel normalisation of [0, 1] inputs (C floats each), stored in
            model.pt; ``normalize=False`` skips it (the datasets normalise themselves).
        augment: callable on a float [0, 1] ``(B, C, H, W)`` batch on the device (training only),
            e.g. :class:`hpa.augment.BatchAugment`.
        amp: ``auto`` (bf16 on CUDA), ``bf16``, ``off``. channels_last: memory format.
        grad_clip: clip the gradient norm to this value (None: no clipping).
        num_workers: DataLoader workers. seed: initialisation-independent seed of sampling,
            augmentation and dropout. device: ``cpu``, ``cuda`` or ``cuda:N``.
        val_index: DataFrame with one row per ``val_ds`` item (e.g. ``ID`` or ``ID, cell_id``),
            prepended to ``val_predictions.csv``.
        extra_meta: stored in ``model.pt``'s meta (e.g. fold, data path, cache size).
        val_every: validate after every this many epochs (and always after the last).
        val_tile: multilabel: validate items larger than this side as overlapping tiles of it
            (:func:`hpa.tiling.tiled_probs`), as the model trained on crops of that size will be
            used; None: whole items. Recorded in the meta as ``tile``.
        force: start again even if ``last.pt`` / ``model.pt`` exist.
        on_epoch_end: called as ``f(epoch, history)`` after each epoch's checkpoint (tests use
            it to simulate an interruption).
    Returns:
        history: one dict per epoch (``epoch, train_loss, val_loss, mAP, f1, [acc], lr, seconds``).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("accumulate", accumulate)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    criterion = make_loss(task, loss, label_smoothing, class_weights, focal_gamma)
    in_shape, _ = _check_dataset(train_ds, "training")
    if val_ds is not None:
        _check_dataset(val_ds, "validation")
        if val_index is not None and len(val_index) != len(val_ds):
            raise ValueError(f"val_index has {len(val_index)} rows for {len(val_ds)} validation items")
    if normalize and (mean is None or std is None or len(mean) != in_shape[0] or len(std) != in_shape[0]):
        raise ValueError(f"normalize=True needs mean and std with {in_shape[0]} values each, got {mean} and {std}")
    if normalize and min(std) <= 0:
        raise ValueError(f"std must be > 0 per channel, got {std}")

    out_dir = Path(out_dir)
    rank, world = dist_info()
    main = rank == 0
    device = local_device(device)
    model_path, last_path = out_dir / "model.pt", out_dir / "last.pt"

    if not force and model_path.is_file():
        done = torch.load(model_path, map_location="cpu", weights_only=False)
        if done.get("meta", {}).get("epochs") == epochs and done.get("history"):
            log.info("%s is complete (%d epochs); skipping training (force=True retrains)", model_path, epochs)
            if main and not (out_dir / "metrics.csv").is_file():
                write_csv(out_dir / "metrics.csv", pd.DataFrame(done["history"]))
            model.load_state_dict(done["model"])
            return list(done["history"])
    barrier()  # nobody writes before every rank has looked at the old files
    if force and main:
        for p in (model_path, last_path):
            p.unlink(missing_ok=True)

    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, weight_decay=weight_decay)
    history: list[dict] = []
    start_epoch, step = 0, 0
    meta = _model_meta(model, task, in_shape, mean, std, epochs, extra_meta)
    meta["normalize"] = bool(normalize)
    meta["tile"] = None if val_tile is None else int(val_tile)
    if not force and last_path.is_file():
        ckpt = torch.load(last_path, map_location="cpu", weights_only=False)
        if ckpt.get("meta", {}).get("arch") != meta["arch"]:
            raise ValueError(f"{last_path} holds a {ckpt.get('meta', {}).get('arch')} model, not {meta['arch']}; "
                             "use a new output folder or force=True")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step, history = ckpt["epoch"], ckpt["step"], list(ckpt["history"])
        _set_rng_state(ckpt["rng"])
        log.info("resuming %s from epoch %d of %d", last_path, start_epoch + 1, epochs)
        if ckpt.get("meta", {}).get("epochs") != epochs:
            log.warning("%s was trained towards %s epochs, now %d: the learning-rate schedule changes",
                        last_path, ckpt.get("meta", {}).get("epochs"), epochs)
    else:
        seed_everything(seed + 1000 * rank)

    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if str(device).startswith("cuda") else None)
    sampler = EpochSampler(len(train_ds), sample_weights, samples_per_epoch, shuffle=True, seed=seed, rank=rank,
                           world=world)
    steps_per_epoch = max(1, len(sampler) // batch_size // accumulate)
    total_steps = steps_per_epoch * epochs
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    dtype = amp_dtype(amp, device)
    mean_t = std_t = None
    if normalize:
        mean_t = torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1)
    pin = str(device).startswith("cuda")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log.info("training %s (%s, %d+%d samples, %d epochs x %d steps, batch %d x %d accum x %d procs, lr %.2g, "
                 "amp %s, channels_last %s, device %s)", meta["arch"], task, len(train_ds),
                 0 if val_ds is None else len(val_ds), epochs, steps_per_epoch, batch_size, accumulate, world, lr,
                 dtype, channels_last, device)

    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        g = torch.Generator().manual_seed(seed * 7919 + epoch * 31 + rank)
        loader = torch.utils.data.DataLoader(train_ds, batch_size=batch_size, sampler=sampler, drop_last=True,
                                             num_workers=num_workers, pin_memory=pin, generator=g,
                                             worker_init_fn=_seed_worker, persistent_workers=False)
        train_model.train()
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not (progress and main), mininterval=5.0,
                   leave=False)
        optimizer.zero_grad(set_to_none=True)
        for i, (x, t) in enumerate(bar):
            last_micro = (i + 1) % accumulate == 0
            x = prepare_batch(x.to(device, non_blocking=True), mean_t, std_t, augment, channels_last)
            t = t.to(device, non_blocking=True)
            sync = nullcontext() if (last_micro or world == 1) else train_model.no_sync()
            with sync:
                with _autocast(device, dtype):
                    logits = train_model(x)
                batch_loss = criterion(logits.float(), t)
                (batch_loss / accumulate).backward()
            if not torch.isfinite(batch_loss):
                raise FloatingPointError(f"loss became {batch_loss.item()} at epoch {epoch + 1}, batch {i + 1}: "
                                         f"lower the learning rate (now {lr}) or check the inputs")
            losses.append(batch_loss.item())
            if last_micro:
                cur = lr_at(step, total_steps, warmup_steps, lr)
                for group in optimizer.param_groups:
                    group["lr"] = cur
                if grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{cur:.2g}", refresh=False)
        bar.close()
        train_loss = float(np.mean(losses)) if losses else float("nan")
        if world > 1:
            tl = torch.tensor([train_loss], device=device)
            torch.distributed.all_reduce(tl)
            train_loss = float(tl.item()) / world
        row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": lr_at(max(step - 1, 0), total_steps, warmup_steps, lr)}
        val = None
        if main and val_ds is not None and ((epoch + 1) % max(1, int(val_every)) == 0 or epoch + 1 == epochs):
            val = _validate(model, val_ds, task, criterion, mean_t, std_t, batch_size, device, dtype, channels_last,
                            num_workers, val_tile)
            row.update(val["metrics"])
        row["seconds"] = round(time.perf_counter() - t0, 2)
        row = _broadcast(row)
        history.append(row)
        if main:
            log.info("epoch %d/%d: %s", epoch + 1, epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch",)))
            save_checkpoint(last_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "epoch": epoch + 1, "step": step, "history": history, "rng": _rng_state(),
                                        "meta": meta})
            write_csv(out_dir / "metrics.csv", pd.DataFrame(history))
            if epoch + 1 == epochs:
                _finish(out_dir, model, meta, history, task, val, val_index)
        barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, history)
    if start_epoch >= epochs and main and not model_path.is_file():  # last.pt already at the end
        log.warning("%s already holds %d epochs; writing model.pt from it", last_path, start_epoch)
        val = _validate(model, val_ds, task, criterion, mean_t, std_t, batch_size, device, dtype, channels_last,
                        num_workers, val_tile) if val_ds is not None else None
        _finish(out_dir, model, meta, history, task, val, val_index)
    barrier()
    return history


def _validate(model, ds, task, criterion, mean_t, std_t, batch_size, device, dtype, channels_last, num_workers,
              tile=None):
    from .tiling import make_tiles, mean_tile_probs, needs_tiles, prob_logit

    model.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    probs, targets, losses, sizes = [], [], [], []
    with torch.no_grad():
        for x, t in loader:
            x = prepare_batch(x.to(device), mean_t, std_t, None, channels_last)
            t = t.to(device)
            tiled = task == "multilabel" and needs_tiles(x, tile)
            if tiled:
                x = make_tiles(x, int(tile))[0]
                x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            with _autocast(device, dtype):
                logits = model(x)
            logits = logits.float()
            if tiled:  # the loss of the tile-averaged probability
                logits = prob_logit(mean_tile_probs(logits, len(t)))
            losses.append(criterion(logits, t).item())
            sizes.append(len(t))
            probs.append((torch.softmax(logits, 1) if task == "multiclass" else torch.sigmoid(logits)).cpu().numpy())
            targets.append(t.cpu().numpy())
    probs, targets = np.concatenate(probs), np.concatenate(targets)
    metrics = {"val_loss": float(np.average(losses, weights=sizes))}
    thresholds = tune_thresholds(probs, targets) if task == "multilabel" else None
    metrics.update(compute_metrics(task, probs, targets, thresholds))
    return {"metrics": metrics, "probs": probs, "targets": targets, "thresholds": thresholds}


def _finish(out_dir: Path, model: nn.Module, meta: dict, history: list, task: str, val: dict | None,
            val_index: pd.DataFrame | None) -> None:
    """Write model.pt, val_predictions.csv, thresholds.json and curves.png (rank 0)."""
    meta = dict(meta)
    if val is not None:
        k = val["probs"].shape[1]
        df = val_index.reset_index(drop=True).copy() if val_index is not None else pd.DataFrame(
            {"index": np.arange(len(val["probs"]))})
        t = val["targets"]
        if t.ndim == 1:
            t = np.eye(k, dtype=np.float32)[t.astype(int)]
        df = pd.concat([df, pd.DataFrame(val["probs"], columns=[f"p{c}" for c in range(k)]),
                        pd.DataFrame(t.astype(np.float32), columns=[f"y{c}" for c in range(k)])], axis=1)
        write_csv(out_dir / "val_predictions.csv", df)
        if val["thresholds"] is not None:
            meta["thresholds"] = [float(v) for v in val["thresholds"]]
            write_json(out_dir / "thresholds.json", {"thresholds": meta["thresholds"],
                                                     "classes": meta["class_names"], "tuned_on": "validation",
                                                     "criterion": "per-class F1"})
    meta["final_metrics"] = {k: v for k, v in history[-1].items()}
    save_checkpoint(out_dir / "model.pt", {"model": model.state_dict(), "meta": meta, "history": history})
    plot_curves(history, out_dir / "curves.png")
    log.info("wrote %s", out_dir / "model.pt")


def plot_curves(history: list[dict], path: str | os.PathLike) -> Path:
    """Loss (train, val) and validation mAP/F1 per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(history)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(df["epoch"], df["train_loss"], "o-", label="train")
    val = df.dropna(subset=["val_loss"]) if "val_loss" in df else df.iloc[:0]
    if len(val):
        a1.plot(val["epoch"], val["val_loss"], "o-", label="validation")
    a1.set_xlabel("epoch"), a1.set_ylabel("loss"), a1.legend(), a1.grid(alpha=0.3)
    for key in ("mAP", "f1", "acc"):
        if key in val:
            a2.plot(val["epoch"], val[key], "o-", label=f"validation {key}")
    a2.set_xlabel("epoch"), a2.set_ylim(0, 1), a2.grid(alpha=0.3)
    if a2.lines:
        a2.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(path)
