"""Peak memory of the per-image stages (03, 02, 04, 06) against the number of 2048-px fields.

For each N (default 50 and 200) it builds a data folder of N train and N test fields: symlinks
to the 2048-px real fields of ../shared/data/hpa_real beside the repository, repeated under
new IDs (nothing is copied), or, when that folder is absent, to a few synthetic 2048-px fields
(``python -m hpa.synth --size 2048``). Then it runs, each as its own process on a fresh run
(profile ``default``, device cpu):

    03_segment --split train / test, 02_cam --split train / test (a randomly initialised
    image model of the run's architecture), 04_pseudo_label --cycle 1, 06_predict

Stage 06 needs the cycle-1 cell model's test probabilities (stage 05, whose training is
not measured here); they are drawn at random for every test cell before it runs.

Per stage process it records the wall time, the peak resident memory of the stage process
(``ru_maxrss`` from ``wait4``: the largest single process of its tree) and the peak memory of
the stage with its worker processes: the stage's resident size plus the workers' private pages
(``/proc/PID/smaps_rollup`` sampled every 100 ms, at least ``ru_maxrss``; pages workers share
with the stage through the fork, and shared libraries, count once). It prints a table and,
last, the ratio peak(N_max) / peak(N_min) per stage: flat memory gives about 1.0. The
with-workers figure varies from run to run by about +-10% (pages a forked worker shares with
the stage become the worker's own when either writes them), so ``--repeats`` runs everything
again on fresh runs and reports the largest peak.

    python benchmarks/memory.py [--sizes 50 200] [--repeats 2] [--work DIR] [--workers 2] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

REAL = ROOT.parent / "shared" / "data" / "hpa_real"
CHANNELS = ("red", "green", "blue", "yellow")
STAGES = [  # (name, script, arguments)
    ("03 segment train", "03_segment.py", ["--split", "train"]),
    ("03 segment test", "03_segment.py", ["--split", "test"]),
    ("02 cam train", "02_cam.py", ["--split", "train"]),
    ("02 cam test", "02_cam.py", ["--split", "test"]),
    ("04 pseudo-label", "04_pseudo_label.py", ["--cycle", "1"]),
    ("06 predict", "06_predict.py", []),
]


# --------------------------------------------------------------------------- data
def source_fields(work: Path) -> tuple[Path, list[tuple[str, str]], str]:
    """``(folder, [(ID, Label)], description)`` of the 2048-px fields to repeat."""
    from PIL import Image

    if (REAL / "labels.csv").is_file():
        labels = pd.read_csv(REAL / "labels.csv", dtype=str)
        pool = [(i, lab) for i, lab in zip(labels["ID"], labels["Label"])
                if Image.open(REAL / "images" / f"{i}_red.png").size == (2048, 2048)]
        return REAL / "images", pool, f"{len(pool)} real 2048-px HPA fields ({REAL})"
    synth = work / "synth-2048"
    subprocess.run([sys.executable, "-m", "hpa.synth", str(synth), "--n-train", "4", "--n-test", "1", "--size", "2048",
                    "--seed", "0"], cwd=ROOT, check=True)
    labels = pd.read_csv(synth / "train.csv", dtype=str)
    return synth / "train", list(zip(labels["ID"], labels["Label"])), "4 synthetic 2048-px fields (hpa.synth)"


def make_data(folder: Path, src: Path, pool: list[tuple[str, str]], n: int) -> Path:
    """``folder``: N train + N test fields as symlinks into ``src`` under new IDs."""
    for split in ("train", "test"):
        rows = []
        (folder / split).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            orig, label = pool[k % len(pool)]
            new = f"{split}{k:04d}-{orig[:8]}"
            for ch in CHANNELS:
                link = folder / split / f"{new}_{ch}.png"
                if not link.is_symlink():
                    link.symlink_to(src / f"{orig}_{ch}.png")
            rows.append({"ID": new, "Label": label} if split == "train" else {"ID": new})
        pd.DataFrame(rows).to_csv(folder / f"{split}.csv", index=False)
    return folder


def make_image_model(run: Path) -> None:
    """A stage-01-style ``model.pt`` with random weights (the run's architecture and input size)."""
    import torch

    from hpa.config import load_run_config
    from hpa.constants import CLASS_NAMES
    from hpa.engine.checkpoint import save_checkpoint
    from hpa.models.factory import build_model
    from hpa.pipeline.image_model import image_model_dir

    c = load_run_config(run).image_model
    torch.manual_seed(0)
    model = build_model(c.arch, image_size=c.image_size, output_stride=c.output_stride,
                        input_norm=c.input_norm)
    meta = {"arch": c.arch, "num_classes": 19, "in_channels": 4, "output_stride": c.output_stride,
            "input_norm": c.input_norm, "dropout": 0.2, "image_size": c.image_size, "task": "multilabel",
            "class_names": list(CLASS_NAMES), "mean": [0.1] * 4, "std": [0.1] * 4, "epochs": 0, "normalize": True}
    save_checkpoint(image_model_dir(run) / "model.pt", {"model": model.state_dict(), "meta": meta, "history": []})


def fake_cell_probs(run: Path, data: Path) -> None:
    """``RUN/cycle1/cell_probs_test.parquet``: random softmax rows for every cell of the test masks."""
    from hpa.io.fields import read_mask
    from hpa.io.layout import list_split

    ids, _ = list_split(data, "test")
    rows = []
    for i in ids:
        cells = np.unique(read_mask(run / "masks" / "test" / f"{i}_cellmask.png"))
        rows += [(i, int(c)) for c in cells if c]
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(19), len(rows)).astype(np.float32)
    df = pd.DataFrame(rows, columns=["ID", "cell_id"])
    df[[f"p{c}" for c in range(19)]] = probs
    (run / "cycle1").mkdir(parents=True, exist_ok=True)
    df.to_parquet(run / "cycle1" / "cell_probs_test.parquet", index=False)


# --------------------------------------------------------------------------- measuring
def _rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0])
    return out


def _tree_kib(pid: int) -> int:
    """Memory (KiB) of ``pid`` and its descendants: the stage process's resident size plus each
    worker's private pages (pages a forked worker still shares with the stage, or libraries
    shared with any process, are counted once, in the stage's RSS or not at all)."""
    total, todo = 0, [(pid, True)]
    while todo:
        p, top = todo.pop()
        try:
            m = _rollup(p)
            total += m["Rss"] if top else m["Private_Clean"] + m["Private_Dirty"]
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [(int(c), False) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError, KeyError):
            continue
    return total


def run_measured(cmd: list[str], log_path: Path) -> dict:
    """Run ``cmd``; wall seconds, ``ru_maxrss`` (MiB) and the sampled peak of :func:`_tree_kib` (MiB)."""
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        peak = [0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _tree_kib(proc.pid))
                done.wait(0.1)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:3])} failed (exit {proc.returncode}); see {log_path}")
    return {"seconds": time.perf_counter() - t0, "maxrss_mib": usage.ru_maxrss / 1024,
            "tree_mib": max(peak[0], usage.ru_maxrss) / 1024}


def _helper(what: str, run: Path, data: Path) -> None:
    """Run a preparation step in its own process: this process stays small, because a child's
    ``ru_maxrss`` starts from its parent's resident size at the fork."""
    subprocess.run([sys.executable, __file__, "--helper", what, str(run), str(data)], cwd=ROOT, check=True)


def measure(n: int, work: Path, src: Path, pool: list, workers: int, overrides: list[str],
            repeat: int = 0) -> list[dict]:
    """Every stage of :data:`STAGES` once on a fresh run over N fields; one row per stage."""
    data = make_data(work / f"data-{n}", src, pool, n)
    run = work / f"run-{n}"
    if run.exists():
        shutil.rmtree(run)
    env_log = work / f"log-{n}.txt"
    common = ["--run", str(run)]
    rows = []
    for k, (name, script, args) in enumerate(STAGES):
        first = ["--data", str(data), "--profile", "default", "device=cpu", f"num_workers={workers}", *overrides]
        cmd = [sys.executable, str(ROOT / "stages" / script), *common, *args, *(first if k == 0 else [])]
        if script == "02_cam.py" and not (run / "image_model" / "model.pt").is_file():
            _helper("model", run, data)
        if script == "06_predict.py":
            _helper("cell-probs", run, data)
        res = run_measured(cmd, env_log)
        rows.append({"N": n, "stage": name, "repeat": repeat, **res})
        print(f"N={n:4d} #{repeat}  {name:18s} {res['seconds']:7.1f} s  process {res['maxrss_mib']:7.0f} MiB  "
              f"with workers {res['tree_mib']:7.0f} MiB", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 200], help="numbers of fields per split")
    ap.add_argument("--work", default=None, help="folder for data links and runs (default: a temporary folder)")
    ap.add_argument("--workers", type=int, default=2, help="num_workers of the stages")
    ap.add_argument("--repeats", type=int, default=1, help="runs per N (peaks: the largest; the range is shown)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="extra settings for the runs")
    ap.add_argument("--helper", nargs=3, metavar=("WHAT", "RUN", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.helper:
        what, run, data = args.helper
        make_image_model(Path(run)) if what == "model" else fake_cell_probs(Path(run), Path(data))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="hpa-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    src, pool, what = source_fields(work)
    print(f"fields: {what}; work folder {work}; {os.cpu_count()} CPUs", flush=True)
    rows = []
    try:
        for repeat in range(args.repeats):
            for n in sorted(args.sizes):
                rows += measure(n, work, src, pool, args.workers, args.overrides, repeat)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print_summary(pd.DataFrame(rows), min(args.sizes), max(args.sizes))


def print_summary(df: pd.DataFrame, lo: int, hi: int) -> None:
    """Table of seconds and peaks (MiB) per N and stage over repeats, then the ratio line."""
    order = {name: k for k, (name, _, _) in enumerate(STAGES)}
    g = df.groupby(["N", "stage"])
    table = pd.DataFrame({"seconds": g["seconds"].mean(), "process_MiB": g["maxrss_mib"].max(),
                          "process_min": g["maxrss_mib"].min(), "with_workers_MiB": g["tree_mib"].max(),
                          "with_workers_min": g["tree_mib"].min()}).reset_index()
    table = table.sort_values(["N", "stage"], key=lambda c: c.map(order) if c.name == "stage" else c)
    print()
    print(table.to_string(index=False, float_format=lambda v: f"{v:.0f}"))
    a, b = (table[table["N"] == n].set_index("stage") for n in (lo, hi))
    ratios = ", ".join(f"{s} {b.loc[s, 'with_workers_MiB'] / a.loc[s, 'with_workers_MiB']:.2f}/"
                       f"{b.loc[s, 'process_MiB'] / a.loc[s, 'process_MiB']:.2f}" for s in a.index)
    print(f"peak({hi})/peak({lo}) per stage (stage + workers / largest process): {ratios}")


if __name__ == "__main__":
    main()
