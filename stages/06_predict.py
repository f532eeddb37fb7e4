#!/usr/bin/env python
"""Stage 06: a confidence for every class for every test cell, and the submission.

Reads RUN/masks/test (stage 03), RUN/cams/test (stage 02: image probabilities and CAMs) and
RUN/cycle{k}/cell_probs_test.parquet (stage 05). Writes RUN/cells/test.parquet (once),
RUN/predictions_test.parquet (ID, cell_id, model, bbox, area, conf0..conf18 as submitted,
rank0..rank18 for ranking cells across images) and RUN/submission.csv
(ID,ImageWidth,ImageHeight,PredictionString; readable by python -m hpa.score).
How confidences are formed: hpa/cells/combine.py (settings predict.combine, predict.rank_combine,
predict.negative, ...).
The per-image part, the test cell table, can be sharded: --shard i/N writes
RUN/cells/test.shard-i-of-N.parquet (the last shard joins them into test.parquet); a run without
--shard (which joins a complete set of shard tables itself) or --merge N writes the predictions
and the submission:
    python stages/06_predict.py --run RUN --shard 0/4        # ... 3/4, e.g. as a job array
    python stages/06_predict.py --run RUN --merge 4
"""

import argparse

from hpa.config import add_common_args, resolve_device, setup_run
from hpa.pipeline.cli import run_stage
from hpa.pipeline.predict import predict_test
from hpa.pipeline.pseudo_labels import cell_table_shard_stage, merge_cell_tables
from hpa.utils.shards import parse_shard
from hpa.utils.timing import stage_timer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--split", choices=("test",), default="test", help="only the test split is predicted")
    ap.add_argument("--shard", default=None, help="i/N: only the cell table of every N-th image from the i-th")
    ap.add_argument("--merge", type=int, metavar="N", default=None, help="join the N shard tables, then predict")
    ap.add_argument("--force", action="store_true", help="rebuild the test cell table (or shard table)")
    args = ap.parse_args(argv)
    shard = parse_shard(args.shard)
    if shard[1] > 1 and args.merge:
        ap.error("--merge N joins the shards after they all ran: give it without --shard")
    run_stage("06_predict", args.run, lambda: run(args))


def run(args):
    shard = parse_shard(args.shard)
    cfg = setup_run(args.run, args.data, args.profile, args.config, args.overrides)
    if shard[1] > 1:
        cell_table_shard_stage(args.run, cfg, "test", shard, "06", force=args.force)
        return
    with stage_timer(args.run, "06_predict"):
        if args.merge:
            merge_cell_tables(args.run, cfg.data, "test", args.merge)
        _, sub = predict_test(args.run, cfg, force=args.force and not args.merge, device=resolve_device(cfg.device))
    print(f"submission: {sub}")


if __name__ == "__main__":
    main()
