"""The training loop shared by the image model (stage 01) and the cell model (stage 05).

:func:`fit` trains any :class:`hpa.models.factory.HPANet` on two datasets and writes into ``out_dir``:

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
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from hpa.engine.amp import amp_dtype, autocast, prepare_batch
from hpa.engine.checkpoint import model_meta, save_checkpoint
from hpa.engine.distributed import barrier, broadcast_object, dist_info, local_device
from hpa.engine.losses import TASKS, make_loss
from hpa.engine.metrics import compute_metrics, tune_thresholds
from hpa.engine.plots import plot_curves
from hpa.engine.rng import rng_state, seed_everything, set_rng_state
from hpa.engine.sampler import EpochSampler, seed_worker
from hpa.engine.schedule import lr_at, param_groups
from hpa.utils.fs import write_csv, write_json

log = logging.getLogger(__name__)


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
        model: an :class:`hpa.models.factory.HPANet` (any arch); trained in place.
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
            e.g. :class:`hpa.data.augment.BatchAugment`.
        amp: ``auto`` (bf16 on CUDA), ``bf16``, ``off``. channels_last: memory format.
        grad_clip: clip the gradient norm to this value (None: no clipping).
        num_workers: DataLoader workers. seed: initialisation-independent seed of sampling,
            augmentation and dropout. device: ``cpu``, ``cuda`` or ``cuda:N``.
        val_index: DataFrame with one row per ``val_ds`` item (e.g. ``ID`` or ``ID, cell_id``),
            prepended to ``val_predictions.csv``.
        extra_meta: stored in ``model.pt``'s meta (e.g. fold, data path, cache size).
        val_every: validate after every this many epochs (and always after the last).
        val_tile: multilabel: validate items larger than this side as overlapping tiles of it
            (:func:`hpa.engine.tiling.tiled_probs`), as the model trained on crops of that size will be
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
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, weight_decay=weight_decay)
    history: list[dict] = []
    start_epoch, step = 0, 0
    meta = model_meta(model, task, in_shape, mean, std, epochs, extra_meta)
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
        set_rng_state(ckpt["rng"])
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
                                             worker_init_fn=seed_worker, persistent_workers=False)
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
                with autocast(device, dtype):
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
        row = broadcast_object(row)
        history.append(row)
        if main:
            log.info("epoch %d/%d: %s", epoch + 1, epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch",)))
            save_checkpoint(last_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "epoch": epoch + 1, "step": step, "history": history, "rng": rng_state(),
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
    from hpa.engine.tiling import make_tiles, mean_tile_probs, needs_tiles, prob_logit

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
            with autocast(device, dtype):
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


