"""Seconds per field of a segmenter at several field sizes, reading and writing included.

For each size it writes a field to a temporary folder as four PNG channels (a real HPA
field resized, from ../shared/data/hpa_real beside the repository, or a generated one
when that is absent), then times ``read_field`` + ``segment`` + two ``write_mask`` calls
in one single-threaded process (OpenCV and BLAS limited to one thread, as each worker
process of stage 03 is), and reports the split of the time and the peak memory:
``tracemalloc`` peak of the segment call (NumPy's allocations) and the process's peak
resident size (``resource.getrusage``).

    python benchmarks/segment_speed.py [--sizes 256 512 2048 3072] [--repeats 3] [key=value ...]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import yaml

from hpa.io.fields import read_field, resize_field, write_field, write_mask
from hpa.segment import get_segmenter

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "hpa_real"
REAL_ID = "f0ac7116-bb99-11e8-b2b9-ac1f6b6435d0"  # the densest of the five (46 reference cells)


def source_field() -> tuple[np.ndarray, str]:
    """A (4, S, S) uint8 field to resize to every size, and where it came from."""
    if (REAL / "images" / f"{REAL_ID}_red.png").is_file():
        return read_field(REAL / "images", REAL_ID), f"real HPA field {REAL_ID[:8]} (2048 px) resized"
    from hpa.synth.generate import make_field

    return make_field(np.random.default_rng(0), size=512).field, "synthetic 512-px field (hpa.synth) resized"


def time_size(seg, base: np.ndarray, size: int, repeats: int, folder: Path) -> dict:
    field = resize_field(base, size)
    write_field(folder, f"f{size}", field)
    seg.segment(field)  # warm-up (imports, caches)
    t_read = t_seg = t_write = 0.0
    for k in range(repeats):
        t0 = time.perf_counter()
        f = read_field(folder, f"f{size}")
        t1 = time.perf_counter()
        cells, nuclei = seg.segment(f)
        t2 = time.perf_counter()
        write_mask(folder / f"f{size}_nucleimask.png", nuclei)
        write_mask(folder / f"f{size}_cellmask.png", cells)
        t3 = time.perf_counter()
        t_read, t_seg, t_write = t_read + t1 - t0, t_seg + t2 - t1, t_write + t3 - t2
    tracemalloc.start()
    seg.segment(f)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    n = repeats
    return dict(size=size, cells=int(cells.max()), read=t_read / n, segment=t_seg / n, write=t_write / n,
                total=(t_read + t_seg + t_write) / n, peak_mb=peak / 2**20)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 2048, 3072])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--segmenter", default="classical")
    ap.add_argument("settings", nargs="*", metavar="key=value", help="segmenter settings, e.g. work_size=768")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    kw = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.settings)}
    seg = get_segmenter(args.segmenter, **kw)
    base, where = source_field()
    print(f"segmenter {args.segmenter} {kw or ''}; field: {where}; one thread; mean of {args.repeats} runs")
    print(f"{'size':>5} {'cells':>5} {'read_s':>7} {'segment_s':>9} {'write_s':>7} {'total_s':>7} {'peak_MiB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            r = time_size(seg, base, size, args.repeats, Path(tmp))
            print(f"{r['size']:5d} {r['cells']:5d} {r['read']:7.3f} {r['segment']:9.3f} {r['write']:7.3f} "
                  f"{r['total']:7.3f} {r['peak_mb']:8.1f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"process peak resident memory: {rss:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
