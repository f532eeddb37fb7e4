#!/usr/bin/env python
"""Stage 05: the cell-level single-label classifier, and its probabilities for every cell.

Reads RUN/masks/{train,test} (stage 03), DATA/{train,test} fields, RUN/image_model/model.pt and
RUN/splits.csv (stage 01), and RUN/cycle{k}/pseudo_labels.parquet (stage 04) -- or, with --oracle,
the true cell labels of DATA/gt moved onto our cells by IoU >= 0.6 matching (the upper bound).
Writes RUN/cell_cache/{split}_{S}.npy + .parquet (cell crops, reused by later runs) and
RUN/cycle{k}/ (RUN/oracle/ with --oracle):
  cell_model/  model.pt, last.pt, metrics.csv (val accuracy, macro-F1, mAP against the labels),
               val_predictions.csv, curves.png
  cell_probs_train.parquet, cell_probs_test.parquet   ID, cell_id, p0..p18 (softmax) for EVERY
               cell (oracle: test only; test skipped when RUN/masks/test is missing)
A re-run resumes training from last.pt; finished outputs are skipped unless --force.
Settings: cell_model.* in hpa/config.py (crop_size, epochs, ...), e.g. cell_model.epochs=3.
Multi-GPU: torchrun --nproc_per_node N stages/05_train_cell.py -- --run RUN --cycle 1
"""

import argparse
from contextlib import nullcontext
from pathlib import Path

from hpa.config import add_common_args, resolve_device, setup_run
from hpa.engine.distributed import init_distributed, is_main_process
from hpa.eval.gt import has_gt
from hpa.pipeline.cell_model import outputs, stale_out_of_fold, train_cell_stage
from hpa.pipeline.cli import run_stage
from hpa.utils.timing import stage_timer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--cycle", type=int, choices=(1, 2), help="train on RUN/cycle{k}/pseudo_labels.parquet")
    ap.add_argument("--oracle", action="store_true", help="train on the true cell labels (DATA/gt) -> RUN/oracle/")
    ap.add_argument("--force", action="store_true", help="retrain and re-predict even if the outputs exist")
    ap.add_argument("--no-progress", action="store_true", help="no per-epoch progress bar (log lines only)")
    args = ap.parse_args(argv)
    if args.cycle is None and not args.oracle:
        ap.error("give --cycle 1|2, or --oracle")
    run_stage("05_train_cell", args.run, lambda: run(args))


def run(args):
    cfg = setup_run(args.run, args.data, args.profile, args.config, args.overrides)
    device = resolve_device(cfg.device)
    init_distributed(device)
    name = "oracle" if args.oracle else f"cycle{args.cycle}"
    if args.oracle and not has_gt(cfg.data):  # real data: no truth, no upper bound; the report says so
        print(f"oracle skipped: {Path(cfg.data) / 'gt' / 'cell_labels.csv'} not found (the oracle needs true cell labels)")
        return
    folds = cfg.cell_model.oof_folds
    wanted = outputs(args.run, args.cycle, args.oracle, folds)
    if not (Path(args.run) / "masks" / "test").is_dir():
        wanted.pop("probs_test")
    done = all(p.is_file() for p in wanted.values()) and not stale_out_of_fold(args.run, args.cycle, args.oracle, folds)
    if not args.force and done:
        print(f"{name} cell model and probabilities exist in {wanted['model'].parents[1]}; use --force to redo")
        return
    with stage_timer(args.run, f"05_train_cell_{name}") if is_main_process() else nullcontext():
        written = train_cell_stage(args.run, cfg, args.cycle, args.oracle, device=device, force=args.force,
                                   progress=not args.no_progress)
    if is_main_process():
        print(f"{name} cell model: " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()
