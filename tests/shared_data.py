"""The real HPA data beside the checkout (``../shared/data``), read by path, never copied.

Tests that need it are marked with :func:`needs`; where the folder is absent they are skipped
with a reason that starts with :data:`SKIP_PREFIX`, which ``pytest -rs`` prints and ``.ci/run``
looks for: when the data is present, such a skip fails CI.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
HPA_REAL = SHARED / "hpa_real"  # five Kaggle fields (2048/3072 px), labels.csv, HPA-Cell-Segmentation masks
HPA_PORTAL = SHARED / "hpa_portal_jpg"  # two HPA website fields as colour JPEGs (2048 and 1728 px)
LABELS_2021 = SHARED / "hpa_train_labels_2021.csv"  # the competition's 21,806 image labels
SKIP_PREFIX = "real HPA data absent"


def needs(path: Path):
    """Skip marker: the test runs only where ``path`` exists."""
    return pytest.mark.skipif(not Path(path).exists(), reason=f"{SKIP_PREFIX}: {path} not found")
