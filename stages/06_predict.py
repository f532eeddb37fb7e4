#!/usr/bin/env python
"""Stage 06: a confidence for every class for every test cell, and the submission.

Reads RUN/masks/test (stage 03), RUN/cams/test (stage 02: image probabilities and CAMs) and
RUN/cycle{k}/cell_probs_test.parquet (stage 05). Writes RUN/cells/test.parquet (once),
RUN/predictions_test.parquet (ID, cell_id, model, bbox, area, conf0..conf18) and
RUN/submission.csv (ID,ImageWidth,ImageHeight,PredictionString; readable by python -m hpa.score).
How confidences are formed: hpa/predict.py (setting predict.combine, predict.negative, ...).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpa.config import add_common_args, setup_run  # noqa: E402
from hpa.evaluate import predict_test  # noqa: E402
from hpa.log import setup_logging  # noqa: E402
from hpa.timing import stage_timer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--split", choices=("test",), default="test", help="only the test split is predicted")
    ap.add_argument("--force", action="store_true", help="rebuild the test cell table")
    args = ap.parse_args(argv)
    setup_logging()
    cfg = setup_run(args.run, args.data, args.profile, args.config, args.overrides)
    with stage_timer(args.run, "06_predict"):
        _, sub = predict_test(args.run, cfg, force=args.force)
    print(f"submission: {sub}")


if __name__ == "__main__":
    main()
