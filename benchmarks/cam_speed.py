#!/usr/bin/env python
"""CAMs of all 19 classes for a batch: our one-pass ``cam`` against grad-cam's GradCAM per class.

For each input size, side by side in one process on the same random model and batch:
  cam          hpa.cam.methods.compute_cams(model, x): one forward pass gives all 19 maps
  grad-cam     pytorch_grad_cam.GradCAM on the backbone, called once per class with one
               ClassifierOutputTarget per image (19 forward + 19 backward passes), as users do
  hpa-gradcam  hpa.cam.methods.compute_cams(model, x, "gradcam"): grad-cam's weights without its
               normalisation, one forward pass + 19 backward passes through the head only
The last line is the speed-up of cam over grad-cam summed over the sizes: ``speedup=NN.Nx``.
    python benchmarks/cam_speed.py [--arch efficientnet-b0] [--batch 4] [--sizes 256 512]

``--passes``: instead, stage 02's case on the CPU: a batch of 16 fields of 128 px seen as 64-px tiles,
maps at ``cam.scale`` 1 and 2, with every tile of the batch in one forward pass against passes of
at most ``hpa.engine.tiling.CPU_PASS_PIXELS`` (what stage 02 does), side by side; prints seconds per
field and ``passes_speedup=N.Nx`` at scale 2; then the same for stage 05's cell predictions (1,024 random
64-px crops, ``cell_model.predict_batch_size`` 256), in cells per second.
    python benchmarks/cam_speed.py --passes [--threads 2]
"""

import argparse
import platform
import time

import numpy as np
import torch

from hpa.cam.methods import cam_target_layer, compute_cams, image_cams
from hpa.engine import tiling
from hpa.constants import NUM_CLASSES
from hpa.models.factory import build_model


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def grad_cam_loop(model, x):
    """All classes with the grad-cam package as documented: one call per class."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    maps = []
    with GradCAM(model=model, target_layers=[cam_target_layer(model)]) as gc:
        for k in range(NUM_CLASSES):
            maps.append(gc(x, [ClassifierOutputTarget(k) for _ in range(x.shape[0])]))
    return np.stack(maps, 1)  # (B, 19, S, S), min-max normalised by grad-cam


def tiled_passes(model, repeats: int) -> None:
    """Stage 02's tiled maps with one pass per batch against CPU-sized passes (module docstring)."""
    x = torch.randn(16, 4, 128, 128)
    print(f"{'scale':>5} {'one pass s/field':>17} {'passes s/field':>15} {'speed-up':>9}")
    chunked = tiling.CPU_PASS_PIXELS
    speedup = 0.0
    for scale in (1.0, 2.0):
        image_cams(model, x[:1], tile=64, scale=scale)  # warm-up
        tiling.CPU_PASS_PIXELS = 1 << 40  # every tile of the batch at once
        t_one, _ = _timed(lambda: image_cams(model, x, tile=64, scale=scale), repeats)
        tiling.CPU_PASS_PIXELS = chunked
        t_pass, _ = _timed(lambda: image_cams(model, x, tile=64, scale=scale), repeats)
        speedup = t_one / t_pass
        print(f"{scale:>5g} {t_one / 16:>17.3f} {t_pass / 16:>15.3f} {speedup:>8.2f}x", flush=True)
    print(f"passes_speedup={speedup:.1f}x")
    from hpa.engine.inference import predict

    crops = np.random.default_rng(0).integers(0, 256, (1024, 4, 64, 64), dtype=np.uint8)
    meta = {"in_channels": 4, "task": "multiclass", "num_classes": NUM_CLASSES}
    times = {}
    for name, budget in (("one pass of 256 crops", 1 << 40), ("passes of 36 crops", chunked)):
        tiling.CPU_PASS_PIXELS = budget
        predict(model, meta, crops[:256], batch_size=256)  # warm-up
        times[name], _ = _timed(lambda: predict(model, meta, crops, batch_size=256), repeats)
    tiling.CPU_PASS_PIXELS = chunked
    print("cell predictions: " + ", ".join(f"{k} {len(crops) / v:.0f} cells/s" for k, v in times.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="efficientnet-b0")
    ap.add_argument("--output-stride", type=int, default=16, choices=(16, 32))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--repeats", type=int, default=1, help="timings are the median of this many runs")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--passes", action="store_true", help="tiled maps: one pass against CPU-sized passes")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.arch, output_stride=args.output_stride).to(args.device).eval()
    print(f"# {args.arch} (output stride {args.output_stride}), batch {args.batch}, {NUM_CLASSES} classes, "
          f"device {args.device}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    if args.passes:
        return tiled_passes(model, args.repeats)
    print(f"{'size':>5} {'cam s':>8} {'grad-cam s':>11} {'hpa-gradcam s':>14} {'speedup':>8}")
    total_cam = total_gc = 0.0
    for size in args.sizes:
        x = torch.randn(args.batch, 4, size, size, device=args.device)
        compute_cams(model, x[:1])  # warm-up
        t_cam, (_, cams) = _timed(lambda: compute_cams(model, x), args.repeats)
        t_gc, theirs = _timed(lambda: grad_cam_loop(model, x), args.repeats)
        t_ours_gc, _ = _timed(lambda: compute_cams(model, x, "gradcam"), args.repeats)
        assert cams.shape[:2] == (args.batch, NUM_CLASSES) and theirs.shape[:2] == (args.batch, NUM_CLASSES)
        total_cam += t_cam
        total_gc += t_gc
        print(f"{size:>5} {t_cam:>8.2f} {t_gc:>11.2f} {t_ours_gc:>14.2f} {t_gc / t_cam:>7.1f}x", flush=True)
    print(f"speedup={total_gc / total_cam:.1f}x")


if __name__ == "__main__":
    main()
