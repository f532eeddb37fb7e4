"""Seconds per field of stage 08 (new fields -> per-cell answers) on real HPA fields, per step, and its memory.

Fields: the five 8-bit PNG fields of ../shared/data/hpa_real/images (2048 px, one 3072 px) and
the two colour-JPEG fields of ../shared/data/hpa_portal_jpg (2048 and 1728 px) beside the
repository, repeated to ``--n`` fields by symbolic links under new IDs in a temporary folder
(nothing is copied, nothing is written into the repository).

The run: ``--run RUN`` (a trained run), or else a quick-profile run trained here on a small
synthetic set with the default profile's input sizes (``cell_model.crop_size=64``,
``segment.classical.work_size=512``; the image model's 128 px is the same): its weights are
barely trained, but timing only needs their shapes.

Stage 08 runs as its own process twice on fresh output folders: on the first ``--mem-n``
fields (default 10), then on all ``--n`` (default 50), with ``key=value`` settings passed on
(e.g. ``device=cpu``). It prints the seconds per field of every step, from the per-field records
``OUT/fields/{ID}.json`` of the larger run (the first field, which pays for warming the models
up, left out), by field kind and over all fields, as wall clock and as the process's CPU time
(on a machine shared with other jobs the CPU time of a one-thread run tells what the wall clock
would be on an idle machine), the stage's wall clock per field (process
start, model loading and the summary files included), the machine's load average before and
after, and the peak resident memory of each stage process (``ru_maxrss``): flat memory gives
about the same figure at both sizes. Threads: as the environment says (``OMP_NUM_THREADS``;
torch uses every core when unset). The last line is ``seconds_per_field=N.NN``, the wall clock
per field of the larger run.

    python benchmarks/predict_speed.py [--run RUN] [--n 50] [--mem-n 10] [--workers 0] [--work DIR] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SOURCES = [(SHARED / "hpa_real" / "images", ".png"), (SHARED / "hpa_portal_jpg", ".jpg")]
CHANNELS = ("red", "green", "blue", "yellow")
STEPS = ("read", "segment", "geometry", "image_model", "crops", "cell_model", "combine", "write", "viewer")


def source_fields() -> list[tuple[Path, str, str]]:
    """``(folder, ID, extension)`` of every real field found."""
    out = []
    for folder, ext in SOURCES:
        for p in sorted(folder.glob(f"*_red{ext}")):
            out.append((folder, p.name[: -len(f"_red{ext}")], ext))
    return out


def link_fields(sources, n: int, folder: Path) -> list[str]:
    """``n`` fields in ``folder``: symbolic links to the sources in turn, IDs ``r{k}-{source ID}``."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for k in range(n):
        src, image_id, ext = sources[k % len(sources)]
        new = f"r{k:03d}-{image_id}"
        for ch in CHANNELS:
            (folder / f"{new}_{ch}{ext}").symlink_to(src / f"{image_id}_{ch}{ext}")
        ids.append(new)
    return ids


def build_run(work: Path) -> Path:
    """A quick-profile run with the default profile's input sizes, trained to cycle 1 on 24 synthetic fields."""
    data, run = work / "synth", work / "run"
    py = [sys.executable]
    sets = ["cell_model.crop_size=64", "segment.classical.work_size=512"]
    steps = [["-m", "hpa.synth", str(data), "--n-train", "24", "--n-test", "2", "--size", "256", "--seed", "0"],
             ["stages/01_train_image.py", "--data", str(data), "--run", str(run), "--profile", "quick", "--no-progress",
              *sets],
             ["stages/03_segment.py", "--run", str(run), "--split", "train"],
             ["stages/02_cam.py", "--run", str(run), "--split", "train"],
             ["stages/04_pseudo_label.py", "--run", str(run), "--cycle", "1"],
             ["stages/05_train_cell.py", "--run", str(run), "--cycle", "1", "--no-progress"]]
    for step in steps:
        print("building the run:", " ".join(step[:2]), flush=True)
        subprocess.run(py + step, cwd=ROOT, check=True, capture_output=True)
    return run


def run_stage(run: Path, fields: Path, out: Path, workers: int, settings: list[str]) -> tuple[float, float]:
    """Stage 08 as its own process: ``(wall seconds, peak resident MiB)``."""
    cmd = [sys.executable, "stages/08_predict_new.py", "--run", str(run), "--data", str(fields), "--out", str(out),
           "--workers", str(workers), "--no-progress", *settings]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"stage 08 failed:\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 1024  # KiB on Linux


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="a trained run (default: a quick run trained here)")
    ap.add_argument("--n", type=int, default=50, help="fields of the timed run")
    ap.add_argument("--mem-n", type=int, default=10, help="fields of the smaller run (memory comparison)")
    ap.add_argument("--workers", type=int, default=0, help="stage 08 processes (0: one process)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new folder under /tmp, deleted after)")
    ap.add_argument("settings", nargs="*", metavar="key=value", help="settings for stage 08, e.g. device=cpu")
    args = ap.parse_args(argv)
    sources = source_fields()
    if not sources:
        print(f"no real fields in {SOURCES[0][0]} or {SOURCES[1][0]}: nothing to time", file=sys.stderr)
        return 1
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="predict_speed_", dir="/tmp"))
    try:
        run = Path(args.run) if args.run else build_run(work)
        fields = work / "fields"
        ids = link_fields(sources, args.n, fields)
        small = work / "fields_small"
        link_fields(sources, min(args.mem_n, args.n), small)
        print(f"run {run}; {args.n} fields repeated from {len(sources)} real ones; workers {args.workers}; "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; settings {args.settings or '-'}")
        load0 = os.getloadavg()
        _, rss_small = run_stage(run, small, work / "out_small", args.workers, args.settings)
        wall, rss = run_stage(run, fields, work / "out", args.workers, args.settings)
        load1 = os.getloadavg()
        recs = [json.loads((work / "out" / "fields" / f"{i}.json").read_text()) for i in ids]
        report(recs[1:], sources)
        print(f"load average (1, 5, 15 min) before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after "
              f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} on {os.cpu_count()} cores")
        print(f"peak resident memory of stage 08: {rss_small:.0f} MiB at {min(args.mem_n, args.n)} fields, {rss:.0f} MiB "
              f"at {args.n} fields (ratio {rss / rss_small:.2f})")
        print(f"stage wall clock {wall:.1f} s for {args.n} fields (process start, model loading, summary files and "
              f"viewer page included)")
        print(f"seconds_per_field={wall / args.n:.2f}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(recs: list[dict], sources) -> None:
    """Mean seconds per step by kind of field (size and format) and over all fields: wall clock, then CPU."""
    kinds: dict[str, list[dict]] = {}
    fmt = {image_id: ext for _, image_id, ext in sources}
    for r in recs:
        src = r["ID"].split("-", 1)[1]
        kinds.setdefault(f"{r['width']}px {fmt[src].lstrip('.')}", []).append(r)
    kinds["all"] = recs
    head = f"{'fields':<11} {'n':>3} {'cells':>5} " + " ".join(f"{s:>11}" for s in STEPS) + f" {'total':>7} {'answers':>7}"
    for key, what in (("seconds", "wall clock"), ("cpu_seconds", "CPU time of the process (all its threads)")):
        print(f"seconds per field by step, {what} (mean; 'answers' = total without the viewer's picture):")
        print(head)
        for name, group in kinds.items():
            sec = np.array([[g[key][s] for s in STEPS] for g in group])
            mean = sec.mean(0)
            cells = np.mean([g["n_cells"] for g in group])
            print(f"{name:<11} {len(group):>3} {cells:>5.1f} " + " ".join(f"{v:>11.3f}" for v in mean)
                  + f" {mean.sum():>7.3f} {mean.sum() - mean[STEPS.index('viewer')]:>7.3f}")


if __name__ == "__main__":
    sys.exit(main())
