#!/usr/bin/env python
"""Stage 07: score every method on the test split and write the report.

With DATA/gt/: cell-level mAP (IoU >= 0.6) of broadcast, CAM, cell view, cycle 1, cycle 2
and oracle in both scoring modes (oid: the competition's; strict), per-class AP, paired step
gains, combination-rule ablations, segmentation match rate. With or without gt/: the cell
models aggregated to the image on the validation fold next to the image model, pseudo-label
coverage per class, predicted top classes of the test cells, cells per field, skipped fields,
the segmenter and why, stage timings. Writes RUN/report.json, RUN/report.md, RUN/report_ap.png, and
RUN/model_card.md (what the models were trained on, the settings that matter, validation figures,
the segmenter, and the command that answers new fields with them).
"""

import argparse
from pathlib import Path

from hpa.config import add_common_args, setup_run
from hpa.eval.report import summary_table
from hpa.pipeline.cli import run_stage
from hpa.pipeline.evaluate import build_report, write_report
from hpa.pipeline.model_card import write_model_card


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--mode", choices=("oid", "strict"), default="oid",
                    help="which scoring mode leads the report (both are always scored): oid, as the competition "
                         "(predictions of classes absent from the image are ignored); strict: they count as false "
                         "positives")
    args = ap.parse_args(argv)
    run_stage("07_evaluate", args.run, lambda: run(args))


def run(args):
    cfg = setup_run(args.run, args.data, args.profile, args.config, args.overrides)
    report = build_report(args.run, cfg, args.mode)
    write_report(args.run, report)
    card = write_model_card(args.run, cfg)
    print(summary_table(report))
    print(f"report: {Path(args.run) / 'report.md'}")
    print(f"model card: {card}")


if __name__ == "__main__":
    main()
