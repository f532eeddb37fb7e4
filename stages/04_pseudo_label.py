#!/usr/bin/env python
"""Stage 04: cell pseudo-labels from CAMs (cycle 1) or CAMs + the cycle-1 cell model (cycle 2).

Reads RUN/masks/train (stage 03), RUN/cams/train (stage 02) and, for cycle 2,
RUN/cycle1/cell_probs_train.parquet (stage 05). Writes RUN/cells/train.parquet (once),
RUN/cycle{k}/pseudo_labels.parquet (ID, cell_id, label 0..18, confidence, weight) and
RUN/cycle{k}/pseudo_report.json (thresholds, coverage, precision/recall against gt/ when present).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpa.config import add_common_args, setup_run  # noqa: E402
from hpa.labelling import make_pseudo_labels  # noqa: E402
from hpa.log import setup_logging  # noqa: E402
from hpa.timing import stage_timer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--cycle", type=int, choices=(1, 2), required=True, help="1: CAM only; 2: adds cycle-1 cell model")
    ap.add_argument("--force", action="store_true", help="rebuild the cell table and labels even if present")
    args = ap.parse_args(argv)
    setup_logging()
    cfg = setup_run(args.run, args.data, args.profile, args.config, args.overrides)
    out = Path(args.run) / f"cycle{args.cycle}" / "pseudo_labels.parquet"
    if out.is_file() and not args.force:
        print(f"{out} exists; use --force to redo")
        return
    with stage_timer(args.run, f"04_pseudo_label_cycle{args.cycle}"):
        make_pseudo_labels(args.run, cfg["data"], args.cycle, cfg["pseudo"], force=args.force)


if __name__ == "__main__":
    main()
