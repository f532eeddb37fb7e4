#!/usr/bin/env python
"""Training and inference speed of the image model, with the uint8 cache and with PNG decoding.

For each input size (default 256 and 512 px) and device (cpu, and cuda when available) it
prints images/second for:

- ``load cache`` / ``load png``: the DataLoader alone (no model): batches from the memory-mapped
  uint8 cache vs. decoding + resizing the four channel PNGs of every field every epoch;
- ``train cache`` / ``train png``: full training steps (augmentation, forward, backward, AdamW)
  fed by each loader;
- ``infer``: forward passes only (eval mode, cache-fed).

Fields come from ``--images DIR`` (any folder of ``{ID}_{red,green,blue,yellow}.png``; default: the
real HPA fields in ../shared/data/hpa_real/images when present) and/or a small synthetic set
generated on the fly (``--synth N`` fields of ``--synth-size`` px). Example:

    python benchmarks/train_speed.py --sizes 256 512 --steps 6 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hpa.data.augment import BatchAugment
from hpa.data.cache import FieldDataset, build_field_cache
from hpa.engine.amp import amp_dtype, prepare_batch
from hpa.io.fields import field_to_uint8, read_field
from hpa.models.factory import build_model

ROOT = Path(__file__).resolve().parents[1]


class PngDataset(torch.utils.data.Dataset):
    """Decodes and resizes the field's PNGs on every access (what the cache avoids)."""

    def __init__(self, folder, ids, size):
        self.folder, self.ids, self.size = folder, ids, size

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        f = field_to_uint8(read_field(self.folder, self.ids[i]), self.size)
        return torch.from_numpy(f), torch.zeros(19)


def loader(ds, batch, workers, n):
    idx = [i % len(ds) for i in range(n)]
    return torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=batch, num_workers=workers)


def time_loading(ds, batch, workers, n):
    t = time.perf_counter()
    count = sum(len(x) for x, _ in loader(ds, batch, workers, n))
    return count / (time.perf_counter() - t)


def time_training(model, ds, batch, workers, steps, device, amp, mean, std):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    aug = BatchAugment(crop_scale=(0.6, 1.0), intensity=0.2)
    dtype = amp_dtype(amp, device)
    ctx = (lambda: torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype)) if dtype else None
    model.train()
    n, t = 0, None
    for i, (x, y) in enumerate(loader(ds, batch, workers, batch * (steps + 1))):
        if i == 1:  # the first step warms up allocators and kernels
            _sync(device)
            t = time.perf_counter()
        x = prepare_batch(x.to(device), mean, std, aug, channels_last=True)
        if ctx:
            with ctx():
                out = model(x)
        else:
            out = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.float(), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 1:
            n += len(x)
    _sync(device)
    return n / (time.perf_counter() - t)


@torch.no_grad()
def time_inference(model, ds, batch, workers, steps, device, amp, mean, std):
    model.eval()
    dtype = amp_dtype(amp, device)
    n, t = 0, None
    for i, (x, _) in enumerate(loader(ds, batch, workers, batch * (steps + 1))):
        if i == 1:
            _sync(device)
            t = time.perf_counter()
        x = prepare_batch(x.to(device), mean, std, channels_last=True)
        with torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            model(x)
        if i >= 1:
            n += len(x)
    _sync(device)
    return n / (time.perf_counter() - t)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["efficientnet-b0"],
                    help="model names (hpa.models.factory.available_models()); several: timed side by side, same data")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="input sizes in pixels")
    ap.add_argument("--batch", type=int, default=8, help="images per step")
    ap.add_argument("--steps", type=int, default=5, help="timed training/inference steps per setting")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--amp", default="auto", help="auto (bf16 on CUDA) | bf16 | off")
    ap.add_argument("--images", default=None, help="folder of {ID}_{red,green,blue,yellow}.png fields")
    ap.add_argument("--synth", type=int, default=16, help="synthetic fields to generate (0: none)")
    ap.add_argument("--synth-size", type=int, default=512, help="side of the synthetic fields")
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    real = ROOT.parent / "shared" / "data" / "hpa_real" / "images"
    sources = []
    tmp = tempfile.TemporaryDirectory()
    if args.images or real.is_dir():
        folder = Path(args.images) if args.images else real
        ids = sorted(p.name[: -len("_red.png")] for p in folder.glob("*_red.png"))
        sources.append(("real HPA" if not args.images else str(folder), folder, ids))
    if args.synth:
        from hpa.synth.generate import generate_dataset

        out = Path(tmp.name) / "synth"
        generate_dataset(out, args.synth, 0, size=args.synth_size, seed=0)
        ids = sorted(p.name[: -len("_red.png")] for p in (out / "train").glob("*_red.png"))
        sources.append((f"synthetic {args.synth_size} px", out / "train", ids))

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; arch {', '.join(args.arch)}, batch {args.batch}, {args.workers} loader workers")
    for name, folder, ids in sources:
        first = read_field(folder, ids[0])
        print(f"\n== {name}: {len(ids)} fields of {first.shape[2]}x{first.shape[1]} px ({first.dtype})")
        print(f"{'device':6} {'size':>5} {'arch':>18} {'load cache':>11} {'load png':>10} {'train cache':>12} "
              f"{'train png':>10} {'infer':>8}   (images/s)")
        for size in args.sizes:
            cpath = Path(tmp.name) / f"{abs(hash(str(folder)))}_{size}.npy"
            t = time.perf_counter()
            build_field_cache(folder.parent, folder.name, ids, size, cpath, workers=args.workers)
            build_s = time.perf_counter() - t
            cache_ds = FieldDataset(cpath, targets=np.zeros((len(ids), 19), np.float32))
            png_ds = PngDataset(folder, ids, size)
            n_load = max(2 * len(ids), 4 * args.batch)
            load_c = time_loading(cache_ds, args.batch, args.workers, n_load)
            load_p = time_loading(png_ds, args.batch, args.workers, n_load)
            for device in devices:
                mean = torch.full((1, 4, 1, 1), 0.1, device=device)
                std = torch.full((1, 4, 1, 1), 0.2, device=device)
                for arch in args.arch:  # one after the other on the same batches: their ratio is the figure
                    model = build_model(arch, image_size=size, output_stride=16).to(device)
                    model = model.to(memory_format=torch.channels_last)
                    tr_c = time_training(model, cache_ds, args.batch, args.workers, args.steps, device, args.amp, mean,
                                         std)
                    tr_p = time_training(model, png_ds, args.batch, args.workers, args.steps, device, args.amp, mean,
                                         std)
                    inf = time_inference(model, cache_ds, args.batch, args.workers, args.steps, device, args.amp,
                                         mean, std)
                    print(f"{device:6} {size:5d} {arch:>18} {load_c:11.1f} {load_p:10.1f} {tr_c:12.2f} {tr_p:10.2f} "
                          f"{inf:8.2f}", flush=True)
            print(f"       (cache of {len(ids)} fields at {size} px built once in {build_s:.1f} s)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
