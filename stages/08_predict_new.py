#!/usr/bin/env python
"""Stage 08: per-cell answers for new fields with a trained run (no training, no ground truth).

Segments every field of DIR the way the run's settings say, gives every cell a confidence for
each of the 19 classes with the run's image model, its cell model (cycle 2 when trained, or
--cycle 1) and its rule (predict.*), and writes OUT/submission.csv (competition format),
OUT/cell_predictions.csv (ID, cell_id, bbox, area, conf0..conf18, top class and confidence) and
OUT/viewer/index.html (every cell outlined and labelled on its field). Nothing is written into RUN.
DIR is a Kaggle-layout folder (DIR/test/, test.csv optional) or a flat folder of
{ID}_{red,green,blue,yellow}.{png,tif,jpg} files; --ids FILE (a CSV with an ID column) picks fields.
Resumable (finished fields are kept) and shardable; the call that finishes the last field writes
the summary files:
    python stages/08_predict_new.py --run runs/default --data DIR --out OUT
    python stages/08_predict_new.py --run RUN --data DIR --out OUT --shard 0/4   # ... 3/4
Settings of the run can be overridden for this call only, e.g. on_bad_image=skip device=cuda.
"""

import argparse

from hpa.config import load_run_config, parse_overrides
from hpa.pipeline.cli import run_stage
from hpa.pipeline.predict_new import predict_new
from hpa.utils.shards import parse_shard
from hpa.utils.timing import stage_timer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the trained run (read only)")
    ap.add_argument("--data", required=True, help="folder of fields (Kaggle layout or flat)")
    ap.add_argument("--out", required=True, help="output folder (not inside the run)")
    ap.add_argument("--split", default="test", help="Kaggle layout: the sub-folder of DIR holding the fields")
    ap.add_argument("--cycle", type=int, choices=(1, 2), default=None,
                    help="the cell model's cycle (default: setting predict.cycle, last = 2 when trained)")
    ap.add_argument("--ids", default=None, help="CSV with an ID column: these fields, in this order")
    ap.add_argument("--shard", default=None, help="i/N: every N-th field from the i-th (0-based)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: setting num_workers)")
    ap.add_argument("--viewer-size", type=int, default=1024,
                    help="longest side of the viewer's pictures in pixels (0: no viewer)")
    ap.add_argument("--force", action="store_true", help="redo finished fields")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="setting overrides for this call")
    args = ap.parse_args(argv)
    parse_shard(args.shard)  # a malformed --shard is a usage error before any work
    if args.viewer_size and args.viewer_size < 64:
        ap.error("--viewer-size must be 0 (no viewer) or >= 64")
    run_stage("08_predict_new", args.out, lambda: run(args))


def run(args):
    cfg = load_run_config(args.run).merged(parse_overrides(args.overrides))
    shard = parse_shard(args.shard)
    name = "08_predict_new" + (f"_shard{shard[0]}of{shard[1]}" if shard[1] > 1 else "")
    with stage_timer(args.out, name):
        stats = predict_new(args.run, args.data, args.out, cfg, cycle=args.cycle, split=args.split, ids_csv=args.ids,
                            shard=shard, workers=args.workers, viewer_size=args.viewer_size, force=args.force,
                            progress=not args.no_progress)
    print(f"stage 08: {stats['computed']} field(s) answered, {stats['done_before']} done before, {stats['skipped']} "
          f"skipped (cycle-{stats['cycle']} cell model)")
    if stats["complete"]:
        print(f"submission: {args.out}/submission.csv\ncells: {args.out}/cell_predictions.csv")
        if args.viewer_size:
            print(f"viewer: {args.out}/viewer/index.html")
    else:
        print("other fields are not answered yet (other shards?): the summary files come with the last of them")


if __name__ == "__main__":
    main()
