"""The training loop shared by the image model (stage 01) and the cell model (stage 05).

:func:`fit` trains any :class:`hpa.models.factory.HPANet` on two datasets under one
:class:`TrainSettings` and writes into ``out_dir``:

- ``last.pt`` after every epoch (model, optimizer, grad scaler, RNG states, step, history),
  atomically; re-running the same call resumes at the next epoch, and a run whose ``model.pt``
  records the requested epochs is skipped (``force=True`` starts again);
- ``model.pt`` at the end: weights + everything :func:`hpa.engine.checkpoint.load_model` needs
  (arch, output stride, classes, normalisation mean/std, input size, task, thresholds, ``extra_meta``);
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
decay per optimizer step (:mod:`hpa.engine.schedule`), BCE / focal (multi-label) or
cross-entropy with label smoothing (multi-class), optional class weights, class-balanced
sampling from ``sample_weights``, mixed precision (bf16, or fp16 with a gradient scaler;
:mod:`hpa.engine.amp`), channels-last, gradient accumulation.

Distributed: launched by ``torchrun --nproc_per_node N``, :func:`hpa.engine.distributed.init_distributed`
joins the process group (gloo on CPU, nccl on CUDA); the loop wraps the model in
DistributedDataParallel, gives each rank its share of every epoch's samples, validates on
rank 0 and only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from hpa.engine.amp import AMP_CHOICES, amp_dtype, autocast, grad_scaler, prepare_batch
from hpa.engine.checkpoint import model_meta, save_checkpoint
from hpa.engine.distributed import barrier, broadcast_object, dist_info, local_device
from hpa.engine.losses import LOSSES, TASKS, make_loss
from hpa.engine.metrics import compute_metrics, tune_thresholds
from hpa.engine.plots import plot_curves
from hpa.engine.rng import rng_state, seed_everything, set_rng_state
from hpa.engine.sampler import EpochSampler, seed_worker
from hpa.engine.schedule import lr_at, param_groups
from hpa.engine.tiling import forward_in_passes, make_tiles, mean_tile_probs, needs_tiles, prob_logit
from hpa.utils.fs import write_csv, write_json

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """How :func:`fit` trains. Build it from a settings section with :meth:`of`."""

    task: str = "multilabel"  # multilabel (sigmoid per class) | multiclass (softmax)
    epochs: int = 10  # total epochs; a re-run with more epochs than a finished run continues it
    batch_size: int = 16  # items per step per process; ``accumulate`` steps per optimizer update
    lr: float = 1e-3  # AdamW peak rate after the linear warm-up, then cosine decay to 1% of it
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0  # may be fractional
    loss: str | None = None  # multilabel: bce | focal; multiclass: ce; None: the task's first (make_loss)
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    samples_per_epoch: int | None = None  # None: len(train_ds)
    amp: str = "auto"  # auto | bf16 | fp16 | off (hpa.engine.amp.amp_dtype)
    channels_last: bool = True
    accumulate: int = 1
    grad_clip: float | None = None  # clip the gradient norm to this value (None: no clipping)
    num_workers: int = 0  # DataLoader workers
    val_every: int = 1  # validate after every this many epochs (and always after the last)
    seed: int = 0  # sampling, augmentation and dropout (initialisation is the caller's)

    @classmethod
    def of(cls, section, **values) -> "TrainSettings":
        """The fields of a settings section that share a name with these, then ``values`` on top."""
        names = [f.name for f in dataclasses.fields(cls)]
        kw = {n: getattr(section, n) for n in names if hasattr(section, n)}
        kw.update(values)
        return cls(**kw)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; valid tasks: {', '.join(TASKS)}")
        if self.loss is None:
            self.loss = LOSSES[self.task][0]
        for name in ("epochs", "batch_size", "accumulate", "val_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"unknown amp setting {self.amp!r}; valid: {', '.join(AMP_CHOICES)}")


def fit(model: nn.Module, train_ds, val_ds, out_dir: str | os.PathLike, settings: TrainSettings | None = None, *,
        device: str = "cpu", mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
        normalize: bool = True, augment: Callable | None = None, class_weights: Sequence[float] | None = None,
        sample_weights: np.ndarray | None = None, val_index: pd.DataFrame | None = None, val_tile: int | None = None,
        extra_meta: dict | None = None, force: bool = False, progress: bool = True,
        on_epoch_end: Callable[[int, list], None] | None = None, **overrides) -> list[dict]:
    """Train ``model`` and write its checkpoints, metrics and validation predictions to ``out_dir``.

    Args:
        model: an :class:`hpa.models.factory.HPANet` (any arch); trained in place.
        train_ds, val_ds: datasets of ``(x, target)``, see the module docstring. ``val_ds``
            may be None (no validation metrics, no thresholds).
        settings: :class:`TrainSettings` (defaults when None); keyword ``overrides`` named like its
            fields replace them (``fit(..., epochs=3)``).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        mean, std: per-channel normalisation of [0, 1] inputs (C floats each), stored in
            model.pt; ``normalize=False`` skips it (the datasets normalise themselves).
        augment: callable on a float [0, 1] ``(B, C, H, W)`` batch on the device (training only),
            e.g. :class:`hpa.data.augment.BatchAugment`.
        class_weights: (K,) multiply each class's loss term (:func:`hpa.engine.losses.make_loss`).
        sample_weights: (len(train_ds),) non-negative: draw ``samples_per_epoch`` samples per
            epoch with replacement with these probabilities.
        val_index: DataFrame with one row per ``val_ds`` item (e.g. ``ID`` or ``ID, cell_id``),
            prepended to ``val_predictions.csv``.
        val_tile: multilabel: validate items larger than this side as overlapping tiles of it
            (:func:`hpa.engine.tiling.tiled_probs`), as the model trained on crops of that size will be
            used; None: whole items. Recorded in the meta as ``tile``.
        extra_meta: stored in ``model.pt``'s meta (e.g. fold, data path, cache size).
        force: start again even if ``last.pt`` / ``model.pt`` exist.
        on_epoch_end: called as ``f(epoch, history)`` after each epoch's checkpoint (tests use
            it to simulate an interruption).
    Returns:
        history: one dict per epoch (``epoch, train_loss, val_loss, mAP, f1, [acc], lr, seconds``).
    """
    valid = {f.name for f in dataclasses.fields(TrainSettings)}
    if set(overrides) - valid:
        raise TypeError(f"fit() got unknown setting(s) {sorted(set(overrides) - valid)}; valid: {sorted(valid)}")
    settings = dataclasses.replace(settings or TrainSettings(), **overrides)
    trainer = Trainer(model, train_ds, val_ds, Path(out_dir), settings, device=device, mean=mean,
                      std=std, normalize=normalize, augment=augment, class_weights=class_weights,
                      sample_weights=sample_weights, val_index=val_index, val_tile=val_tile, extra_meta=extra_meta,
                      force=force, progress=progress, on_epoch_end=on_epoch_end)
    return trainer.run()


class Trainer:
    """One training run of :func:`fit`: resume or skip, one epoch, validate, end of epoch, finish."""

    def __init__(self, model: nn.Module, train_ds, val_ds, out_dir: Path, s: TrainSettings, *, device: str,
                 mean, std, normalize: bool, augment, class_weights, sample_weights, val_index, val_tile,
                 extra_meta, force: bool, progress: bool, on_epoch_end):
        self.model, self.train_ds, self.val_ds, self.out_dir, self.s = model, train_ds, val_ds, out_dir, s
        self.mean, self.std, self.normalize, self.augment = mean, std, normalize, augment
        self.sample_weights, self.val_index, self.val_tile = sample_weights, val_index, val_tile
        self.extra_meta, self.force, self.progress, self.on_epoch_end = extra_meta, force, progress, on_epoch_end
        self.criterion = make_loss(s.task, s.loss, s.label_smoothing, class_weights, s.focal_gamma)
        self.in_shape = self._check_inputs()
        self.rank, self.world = dist_info()
        self.main = self.rank == 0
        self.device = local_device(device)
        self.model_path, self.last_path = out_dir / "model.pt", out_dir / "last.pt"
        self.history: list[dict] = []
        self.start_epoch = self.step = 0

    def _check_inputs(self) -> tuple:
        in_shape, _ = check_dataset(self.train_ds, "training")
        if self.val_ds is not None:
            check_dataset(self.val_ds, "validation")
            if self.val_index is not None and len(self.val_index) != len(self.val_ds):
                raise ValueError(f"val_index has {len(self.val_index)} rows for {len(self.val_ds)} validation items")
        c = in_shape[0]
        if self.normalize and (self.mean is None or self.std is None or len(self.mean) != c or len(self.std) != c):
            raise ValueError(f"normalize=True needs mean and std with {c} values each, got {self.mean} and {self.std}")
        if self.normalize and min(self.std) <= 0:
            raise ValueError(f"std must be > 0 per channel, got {self.std}")
        return in_shape

    # ------------------------------------------------------------------ the run
    def run(self) -> list[dict]:
        done = self.completed()
        if done is not None:
            return done
        barrier()  # nobody writes before every rank has looked at the old files
        if self.force and self.main:
            for p in (self.model_path, self.last_path):
                p.unlink(missing_ok=True)
        self.prepare()
        for epoch in range(self.start_epoch, self.s.epochs):
            t0 = time.perf_counter()
            row = self.train_one_epoch(epoch)
            val = self.validate() if self.main and self.validation_due(epoch) else None
            if val is not None:
                row.update(val["metrics"])
            row["seconds"] = round(time.perf_counter() - t0, 2)
            self.end_of_epoch(epoch, broadcast_object(row), val)
        if self.start_epoch >= self.s.epochs and self.main and not self.model_path.is_file():  # last.pt at the end
            log.warning("%s already holds %d epochs; writing model.pt from it", self.last_path, self.start_epoch)
            self.finish(self.validate() if self.val_ds is not None else None)
        barrier()
        return self.history

    def completed(self) -> list[dict] | None:
        """The history of a finished run with the same epochs (its weights loaded), or None."""
        if self.force or not self.model_path.is_file():
            return None
        done = torch.load(self.model_path, map_location="cpu", weights_only=False)
        if done.get("meta", {}).get("epochs") != self.s.epochs or not done.get("history"):
            return None
        log.info("%s is complete (%d epochs); skipping training (force=True retrains)", self.model_path, self.s.epochs)
        if self.main and not (self.out_dir / "metrics.csv").is_file():
            write_csv(self.out_dir / "metrics.csv", pd.DataFrame(done["history"]))
        self.model.load_state_dict(done["model"])
        return list(done["history"])

    def prepare(self) -> None:
        """Model on the device, optimizer, meta, resumed state (or fresh seeds), sampler and schedule."""
        s, device = self.s, self.device
        self.model = self.model.to(device)
        if s.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, s.weight_decay), lr=s.lr,
                                           weight_decay=s.weight_decay)
        self.dtype = amp_dtype(s.amp, device)
        self.scaler = grad_scaler(self.dtype, device)
        self.meta = model_meta(self.model, s.task, self.in_shape, self.mean, self.std, s.epochs, self.extra_meta)
        self.meta["normalize"] = bool(self.normalize)
        self.meta["tile"] = None if self.val_tile is None else int(self.val_tile)
        if not self.force and self.last_path.is_file():
            self.resume()
        else:
            seed_everything(s.seed + 1000 * self.rank)
        self.train_model = self.model
        if self.world > 1:
            ids = [torch.device(device).index] if str(device).startswith("cuda") else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.sampler = EpochSampler(len(self.train_ds), self.sample_weights, s.samples_per_epoch, shuffle=True,
                                    seed=s.seed, rank=self.rank, world=self.world)
        self.steps_per_epoch = max(1, len(self.sampler) // s.batch_size // s.accumulate)
        self.total_steps = self.steps_per_epoch * s.epochs
        self.warmup_steps = int(round(s.warmup_epochs * self.steps_per_epoch))
        self.mean_t = self.std_t = None
        if self.normalize:
            self.mean_t = torch.tensor(self.mean, device=device, dtype=torch.float32).view(1, -1, 1, 1)
            self.std_t = torch.tensor(self.std, device=device, dtype=torch.float32).view(1, -1, 1, 1)
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            log.info("training %s (%s, %d+%d samples, %d epochs x %d steps, batch %d x %d accum x %d procs, lr %.2g, "
                     "amp %s, channels_last %s, device %s)", self.meta["arch"], s.task, len(self.train_ds),
                     0 if self.val_ds is None else len(self.val_ds), s.epochs, self.steps_per_epoch, s.batch_size,
                     s.accumulate, self.world, s.lr, self.dtype, s.channels_last, device)

    def resume(self) -> None:
        """Weights, optimizer, scaler, step, history and RNG states from ``last.pt``."""
        ckpt = torch.load(self.last_path, map_location="cpu", weights_only=False)
        arch = ckpt.get("meta", {}).get("arch")
        if arch != self.meta["arch"]:
            raise ValueError(f"{self.last_path} holds a {arch} model, not {self.meta['arch']}; "
                             "use a new output folder or force=True")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.step, self.history = ckpt["epoch"], ckpt["step"], list(ckpt["history"])
        set_rng_state(ckpt["rng"])
        log.info("resuming %s from epoch %d of %d", self.last_path, self.start_epoch + 1, self.s.epochs)
        if ckpt.get("meta", {}).get("epochs") != self.s.epochs:
            log.warning("%s was trained towards %s epochs, now %d: the learning-rate schedule changes",
                        self.last_path, ckpt.get("meta", {}).get("epochs"), self.s.epochs)

    # ------------------------------------------------------------------ one epoch
    def train_one_epoch(self, epoch: int) -> dict:
        """One pass over this epoch's samples; returns the epoch's row (loss, lr)."""
        s = self.s
        self.sampler.set_epoch(epoch)
        g = torch.Generator().manual_seed(s.seed * 7919 + epoch * 31 + self.rank)
        loader = torch.utils.data.DataLoader(self.train_ds, batch_size=s.batch_size, sampler=self.sampler,
                                             drop_last=True, num_workers=s.num_workers,
                                             pin_memory=str(self.device).startswith("cuda"), generator=g,
                                             worker_init_fn=seed_worker, persistent_workers=False)
        self.train_model.train()
        losses: list[float] = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{s.epochs}", disable=not (self.progress and self.main),
                   mininterval=5.0, leave=False)
        self.optimizer.zero_grad(set_to_none=True)
        for i, (x, t) in enumerate(bar):
            losses.append(self.train_step(x, t, last_micro=(i + 1) % s.accumulate == 0, where=(epoch, i)))
            if (i + 1) % s.accumulate == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{self.current_lr():.2g}", refresh=False)
        bar.close()
        train_loss = float(np.mean(losses)) if losses else float("nan")
        if self.world > 1:
            tl = torch.tensor([train_loss], device=self.device)
            torch.distributed.all_reduce(tl)
            train_loss = float(tl.item()) / self.world
        return {"epoch": epoch + 1, "train_loss": train_loss,
                "lr": lr_at(max(self.step - 1, 0), self.total_steps, self.warmup_steps, s.lr)}

    def current_lr(self) -> float:
        return lr_at(max(self.step - 1, 0), self.total_steps, self.warmup_steps, self.s.lr)

    def train_step(self, x: torch.Tensor, t: torch.Tensor, last_micro: bool, where: tuple[int, int]) -> float:
        """Forward and backward of one batch; an optimizer step after the last of ``accumulate`` batches."""
        s = self.s
        x = prepare_batch(x.to(self.device, non_blocking=True), self.mean_t, self.std_t, self.augment,
                          s.channels_last)
        t = t.to(self.device, non_blocking=True)
        sync = nullcontext() if (last_micro or self.world == 1) else self.train_model.no_sync()
        with sync:
            with autocast(self.device, self.dtype):
                logits = self.train_model(x)
            batch_loss = self.criterion(logits.float(), t)
            self.scaler.scale(batch_loss / s.accumulate).backward()
        if not torch.isfinite(batch_loss):
            raise FloatingPointError(f"loss became {batch_loss.item()} at epoch {where[0] + 1}, batch {where[1] + 1}: "
                                     f"lower the learning rate (now {s.lr}) or check the inputs")
        if last_micro:
            cur = lr_at(self.step, self.total_steps, self.warmup_steps, s.lr)
            for group in self.optimizer.param_groups:
                group["lr"] = cur
            if s.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
        return batch_loss.item()

    def validation_due(self, epoch: int) -> bool:
        return self.val_ds is not None and ((epoch + 1) % self.s.val_every == 0 or epoch + 1 == self.s.epochs)

    def validate(self) -> dict:
        """Loss, metrics, probabilities, targets and (multi-label) tuned thresholds on ``val_ds``."""
        return evaluate(self.model, self.val_ds, self.s, self.criterion, self.mean_t, self.std_t, self.device,
                        self.dtype, self.val_tile)

    def end_of_epoch(self, epoch: int, row: dict, val: dict | None) -> None:
        """History, ``last.pt``, ``metrics.csv``; after the last epoch also :meth:`finish`."""
        self.history.append(row)
        if self.main:
            log.info("epoch %d/%d: %s", epoch + 1, self.s.epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch",)))
            save_checkpoint(self.last_path, {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                             "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                                             "epoch": epoch + 1, "step": self.step, "history": self.history,
                                             "rng": rng_state(), "meta": self.meta})
            write_csv(self.out_dir / "metrics.csv", pd.DataFrame(self.history))
            if epoch + 1 == self.s.epochs:
                self.finish(val)
        barrier()
        if self.on_epoch_end is not None:
            self.on_epoch_end(epoch + 1, self.history)

    def finish(self, val: dict | None) -> None:
        """Write val_predictions.csv, thresholds.json, curves.png and, last, model.pt (rank 0).

        ``model.pt`` marks the run as finished (:meth:`completed` skips it from then on), so it is
        written after every other file: a run interrupted before it is finished from ``last.pt``
        on the next call (:meth:`run`), and its files are those of an uninterrupted run.
        """
        meta = dict(self.meta)
        if val is not None:
            write_csv(self.out_dir / "val_predictions.csv", validation_frame(val, self.val_index))
            if val["thresholds"] is not None:
                meta["thresholds"] = [float(v) for v in val["thresholds"]]
                write_json(self.out_dir / "thresholds.json", {"thresholds": meta["thresholds"],
                                                              "classes": meta["class_names"], "tuned_on": "validation",
                                                              "criterion": "per-class F1"})
        meta["final_metrics"] = dict(self.history[-1])
        plot_curves(self.history, self.out_dir / "curves.png")
        save_checkpoint(self.model_path, {"model": self.model.state_dict(), "meta": meta, "history": self.history})
        log.info("wrote %s", self.model_path)


def evaluate(model: nn.Module, ds, s: TrainSettings, criterion, mean_t, std_t, device: str, dtype,
             tile: int | None = None) -> dict:
    """Validation pass: ``{"metrics", "probs", "targets", "thresholds"}`` (thresholds: multi-label only)."""
    model.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=s.batch_size, shuffle=False, num_workers=s.num_workers)
    probs, targets, losses, sizes = [], [], [], []
    with torch.no_grad():
        for x, t in loader:
            x = prepare_batch(x.to(device), mean_t, std_t, None, s.channels_last)
            t = t.to(device)
            tiled = s.task == "multilabel" and needs_tiles(x, tile)
            if tiled:
                x = make_tiles(x, int(tile))[0]
                x = x.contiguous(memory_format=torch.channels_last) if s.channels_last else x
            with autocast(device, dtype):
                logits = forward_in_passes(model, x)  # passes of a few dozen tiles on the CPU
            logits = logits.float()
            if tiled:  # the loss of the tile-averaged probability
                logits = prob_logit(mean_tile_probs(logits, len(t)))
            losses.append(criterion(logits, t).item())
            sizes.append(len(t))
            probs.append((torch.softmax(logits, 1) if s.task == "multiclass" else torch.sigmoid(logits)).cpu().numpy())
            targets.append(t.cpu().numpy())
    probs, targets = np.concatenate(probs), np.concatenate(targets)
    metrics = {"val_loss": float(np.average(losses, weights=sizes))}
    thresholds = tune_thresholds(probs, targets) if s.task == "multilabel" else None
    metrics.update(compute_metrics(s.task, probs, targets, thresholds))
    return {"metrics": metrics, "probs": probs, "targets": targets, "thresholds": thresholds}


def validation_frame(val: dict, val_index: pd.DataFrame | None) -> pd.DataFrame:
    """``val_predictions.csv``: the index columns, ``p0..`` probabilities and ``y0..`` (one-hot) targets."""
    k = val["probs"].shape[1]
    df = val_index.reset_index(drop=True).copy() if val_index is not None else pd.DataFrame(
        {"index": np.arange(len(val["probs"]))})
    t = val["targets"]
    if t.ndim == 1:
        t = np.eye(k, dtype=np.float32)[t.astype(int)]
    return pd.concat([df, pd.DataFrame(val["probs"], columns=[f"p{c}" for c in range(k)]),
                      pd.DataFrame(t.astype(np.float32), columns=[f"y{c}" for c in range(k)])], axis=1)


def check_dataset(ds, name: str) -> tuple[tuple, torch.dtype]:
    """``(C, H, W)`` and dtype of a dataset's first item; ValueError naming the dataset when it does not fit."""
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
