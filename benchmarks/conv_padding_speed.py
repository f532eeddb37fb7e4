#!/usr/bin/env python
"""EfficientNet with efficientnet-pytorch's stride-1 "SAME" convolutions vs plain ``nn.Conv2d`` ones.

``hpa.models.backbones._plain_stride_one_convs`` replaces every stride-1 convolution of an
efficientnet-pytorch model (a separate ``F.pad`` copy, then an unpadded convolution) by one with
the same zero padding built in. This prints, side by side in one process and interleaved
(``--repeats`` rounds, median per setting), steps per second of the pipeline's three CNN
workloads on the CPU, and checks that both versions give the same outputs:

- ``cell train``: a cell-model training step (B0 at output stride 32, 64 crops of 64 px);
- ``image train``: an image-model training step (B0 at output stride 16, 32 crops of 64 px);
- ``cam forward``: an image-model forward pass on 16 fields of 256 px (stage 02's maps at 2x
  of the 128-px cache).

    python benchmarks/conv_padding_speed.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import hpa.models.backbones as backbones
from hpa.models.factory import build_model

WORKLOADS = {  # name: (output stride, batch, side, train)
    "cell train": (32, 64, 64, True),
    "image train": (16, 32, 64, True),
    "cam forward": (16, 16, 256, False),
}


def make(plain: bool, output_stride: int):
    keep = backbones._plain_stride_one_convs
    if not plain:
        backbones._plain_stride_one_convs = lambda net: 0
    try:
        torch.manual_seed(0)
        model = build_model("efficientnet-b0", output_stride=output_stride, drop_connect=0.2)
    finally:
        backbones._plain_stride_one_convs = keep
    return model.to(memory_format=torch.channels_last)


def timed_steps(model, x, t, train: bool, steps: int) -> float:
    """Seconds per step (after one untimed step)."""
    if train:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), 1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), t).backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(x)
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds per setting (median reported)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name, (stride, batch, side, train) in WORKLOADS.items():
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 4, side, side, generator=gen).contiguous(memory_format=torch.channels_last)
        t = torch.randint(0, 19, (batch,), generator=gen)
        models = {plain: make(plain, stride) for plain in (False, True)}
        with torch.no_grad():
            out = {plain: m.eval()(x) for plain, m in models.items()}
        same = torch.equal(out[False], out[True])
        diff = (out[False] - out[True]).abs().max().item()
        secs = {False: [], True: []}
        for _ in range(args.repeats):
            for plain in (False, True):
                secs[plain].append(timed_steps(make(plain, stride), x, t, train, args.steps))
        a, b = statistics.median(secs[False]), statistics.median(secs[True])
        print(f"{name:12s} (stride {stride}, {batch} x {side} px): F.pad + conv {1 / a:6.2f} steps/s, "
              f"plain conv {1 / b:6.2f} steps/s, x{a / b:.2f}; outputs {'identical' if same else f'differ by {diff:.2e}'}")


if __name__ == "__main__":
    main()
