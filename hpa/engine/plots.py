"""Training curves (loss, validation mAP / F1 per epoch) as a PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from hpa.utils.fs import atomic_path


def plot_curves(history: list[dict], path: str | os.PathLike) -> Path:
    """Loss (train, val) and validation mAP/F1 per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(history)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(df["epoch"], df["train_loss"], "o-", label="train")
    val = df.dropna(subset=["val_loss"]) if "val_loss" in df else df.iloc[:0]
    if len(val):
        a1.plot(val["epoch"], val["val_loss"], "o-", label="validation")
    a1.set_xlabel("epoch"), a1.set_ylabel("loss"), a1.legend(), a1.grid(alpha=0.3)
    for key in ("mAP", "f1", "acc"):
        if key in val:
            a2.plot(val["epoch"], val[key], "o-", label=f"validation {key}")
    a2.set_xlabel("epoch"), a2.set_ylim(0, 1), a2.grid(alpha=0.3)
    if a2.lines:
        a2.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(path)
