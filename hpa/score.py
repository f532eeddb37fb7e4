"""Command line of the stand-alone scorer (the library is :mod:`hpa.eval.score`)::

    python -m hpa.score SUBMISSION_CSV DATA_DIR [--split test] [--mode oid|strict] [--iou 0.6]
"""

import sys

from hpa.eval.score import main

if __name__ == "__main__":
    sys.exit(main())
