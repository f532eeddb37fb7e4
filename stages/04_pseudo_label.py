#!/usr/bin/env python
"""Stage 04: cell pseudo-labels from CAMs (cycle 1) or CAMs + the cycle-1 cell model (cycle 2).

Reads RUN/masks/train (stage 03), RUN/cams/train (stage 02) and, for cycle 2,
RUN/cycle1/cell_probs_train.parquet (stage 05). Writes RUN/cells/train.parquet (once),
RUN/cycle{k}/pseudo_labels.parquet (ID, cell_id, label 0..18, confidence, weight) and
RUN/cycle{k}/pseudo_report.json (thresholds, coverage, precision/recall against gt/ when present).
The cell table is built per image and can be sharded: --shard i/N writes
RUN/cells/train.shard-i-of-N.parquet (the shard that finishes last joins them into
train.parquet); thresholds are global, so labels come from a run without --shard, which joins
a complete set of shard tables itself, or from --merge N:
    python stages/04_pseudo_label.py --run RUN --shard 0/4      # ... 3/4, e.g. as a job array
    python stages/04_pseudo_label.py --run RUN --cycle 1 --merge 4
"""

import argparse
from pathlib import Path

from hpa.config import add_common_args, resolve_device, setup_run
from hpa.pipeline.cli import run_stage
from hpa.pipeline.pseudo_labels import cell_table_shard_stage, make_pseudo_labels, merge_cell_tables
from hpa.utils.shards import parse_shard
from hpa.utils.timing import stage_timer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--cycle", type=int, choices=(1, 2), help="1: CAM only; 2: adds cycle-1 cell model")
    ap.add_argument("--shard", default=None, help="i/N: only the cell table of every N-th image from the i-th")
    ap.add_argument("--merge", type=int, metavar="N", default=None, help="join the N shard tables, then label")
    ap.add_argument("--force", action="store_true", help="rebuild the cell table (or shard table) and labels")
    args = ap.parse_args(argv)
    shard = parse_shard(args.shard)
    if shard[1] == 1 and args.cycle is None:
        ap.error("give --cycle 1|2 (or --shard i/N to build one shard of the cell table)")
    if shard[1] > 1 and args.merge:
        ap.error("--merge N joins the shards after they all ran: give it without --shard")
    run_stage("04_pseudo_label", args.run, lambda: run(args))


def run(args):
    shard = parse_shard(args.shard)
    cfg = setup_run(args.run, args.data, args.profile, args.config, args.overrides)
    if shard[1] > 1:
        cell_table_shard_stage(args.run, cfg, "train", shard, "04", force=args.force)
        return
    out = Path(args.run) / f"cycle{args.cycle}" / "pseudo_labels.parquet"
    if out.is_file() and not args.force and not args.merge:
        print(f"{out} exists; use --force to redo")
        return
    with stage_timer(args.run, f"04_pseudo_label_cycle{args.cycle}"):
        if args.merge:
            merge_cell_tables(args.run, cfg.data, "train", args.merge)
        make_pseudo_labels(args.run, cfg.data, args.cycle, cfg.pseudo, force=args.force and not args.merge,
                           device=resolve_device(cfg.device), amp=cfg.image_model.amp)


if __name__ == "__main__":
    main()
