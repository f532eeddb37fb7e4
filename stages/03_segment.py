#!/usr/bin/env python
"""Stage 03: nuclei and whole-cell instance masks for every image of a split.

Writes RUN/masks/{split}/{ID}_cellmask.png and {ID}_nucleimask.png (uint16, cell k's nucleus
carries k) and RUN/masks/{split}/cells.csv (ID, height, width, n_cells, mean/median cell area,
mean nucleus area, seconds). With --shard i/N it writes cells.shard-i-of-N.csv; the shard that
finishes last merges all tables into cells.csv (or run --merge N afterwards). Resumable: images
whose two masks exist are skipped unless --force. Needs no earlier stage:
    python stages/03_segment.py --data DIR --split test --run RUN
"""

import argparse
from pathlib import Path

from hpa.config import add_common_args, resolve_device, setup_run
from hpa.io.layout import list_split
from hpa.pipeline.cli import run_stage
from hpa.pipeline.segmentation import merge_tables, record_segmenter, segment_split, segmenter_settings
from hpa.segment import available_segmenters
from hpa.utils.shards import parse_shard
from hpa.utils.timing import stage_timer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--split", choices=("train", "test"), default="train")
    ap.add_argument("--segmenter", choices=["auto"] + available_segmenters(), default=None,
                    help="default: setting segment.segmenter (auto: hpacellseg when installed and given weights)")
    ap.add_argument("--nuclei-model", default=None, help="hpacellseg: local nuclei model file (never downloaded)")
    ap.add_argument("--cell-model", default=None, help="hpacellseg: local cell model file (never downloaded)")
    ap.add_argument("--device", default=None, help="cpu | cuda | auto (hpacellseg only; default: config device)")
    ap.add_argument("--shard", default=None, help="i/N: segment every N-th image from the i-th (0-based)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: config num_workers)")
    ap.add_argument("--force", action="store_true", help="re-segment images whose masks exist")
    ap.add_argument("--merge", type=int, metavar="N", default=None, help="only merge the N shard tables into cells.csv")
    args = ap.parse_args(argv)
    run_stage("03_segment", args.run, lambda: run(args))


def run(args):
    overrides = list(args.overrides)
    for key, value in (("segmenter", args.segmenter), ("hpacellseg.nuclei_weights", args.nuclei_model),
                       ("hpacellseg.cell_weights", args.cell_model)):
        if value is not None:
            overrides.append(f"segment.{key}={value}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    cfg = setup_run(args.run, args.data, args.profile, args.config, overrides)
    out_dir = Path(args.run) / "masks" / args.split
    if args.merge:
        merge_tables(out_dir, args.merge, list_split(cfg.data, args.split)[0])
        return
    shard = parse_shard(args.shard)
    name, kw, reason = segmenter_settings(cfg.segment, resolve_device(cfg.device))
    record_segmenter(out_dir, name, kw, reason)
    workers = cfg.num_workers if args.workers is None else args.workers
    stage = f"03_segment_{args.split}" + (f"_shard{shard[0]}of{shard[1]}" if shard[1] > 1 else "")
    with stage_timer(args.run, stage):
        segment_split(cfg.data, args.split, out_dir, segmenter=name, segmenter_kw=kw, shard=shard,
                      workers=workers, force=args.force, on_bad_image=cfg.on_bad_image)


if __name__ == "__main__":
    main()
