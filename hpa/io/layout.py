"""The Kaggle data layout: ``train.csv`` / ``test.csv`` label tables, the image IDs of a split,
and which of them have readable channel files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from hpa.constants import NUM_CLASSES
from hpa.io.errors import InputError
from hpa.io.fields import channel_paths


def parse_label_string(text, where: str) -> list[int]:
    """Parse ``"0|5|16"`` into ``[0, 5, 16]``; ``where`` names the file and row for errors."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        raise InputError(f"{where}: empty Label")
    if isinstance(text, (int, np.integer)):
        parts = [str(int(text))]
    else:
        parts = str(text).strip().split("|")
    labels = []
    for p in parts:
        p = p.strip()
        if not p.lstrip("-").isdigit():
            raise InputError(f"{where}: Label {text!r} is not a '|'-separated list of class numbers")
        c = int(p)
        if not 0 <= c < NUM_CLASSES:
            raise InputError(f"{where}: class {c} outside 0..{NUM_CLASSES - 1} in Label {text!r}")
        labels.append(c)
    return sorted(set(labels))


def read_csv_table(path: str | os.PathLike, what: str, columns: Sequence[str] = (),
                   error: type[Exception] = InputError) -> pd.DataFrame:
    """A CSV file read as strings (no NaN), with the required ``columns``.

    Raises ``error`` naming the file and ``what`` it is when it is missing or unparsable, and
    the columns found when a required one is missing.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except Exception as exc:
        raise error(f"{path}: cannot parse CSV ({exc})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise error(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    return df


def read_labels(csv_path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read a Kaggle ``train.csv`` (``ID,Label``) into ``(ids, multi_hot)``.

    ``multi_hot`` is uint8 ``(N, 19)``. Raises :class:`InputError` naming the file and
    row for missing columns, malformed labels, classes outside 0..18 and duplicate IDs.
    """
    df = read_csv_table(csv_path, "labels file", ("ID", "Label"))
    ids = [s.strip() for s in df["ID"]]
    y = np.zeros((len(df), NUM_CLASSES), np.uint8)
    seen: dict[str, int] = {}
    for i, (image_id, label) in enumerate(zip(ids, df["Label"])):
        where = f"{csv_path} row {i + 2}"  # +1 header, +1 one-based
        if not image_id:
            raise InputError(f"{where}: empty ID")
        if image_id in seen:
            raise InputError(f"{where}: duplicate ID {image_id!r} (first at row {seen[image_id] + 2})")
        seen[image_id] = i
        if label == "":
            raise InputError(f"{where}: empty Label for ID {image_id!r}")
        y[i, parse_label_string(label, where)] = 1
    return ids, y


def read_ids(csv_path: str | os.PathLike) -> list[str]:
    """IDs of a ``test.csv`` / ``sample_submission.csv`` (column ``ID``), checked for duplicates."""
    df = read_csv_table(csv_path, "ID list", ("ID",))
    ids = [s.strip() for s in df["ID"]]
    dup = pd.Series(ids)[pd.Series(ids).duplicated()]
    if len(dup):
        raise InputError(f"{csv_path} row {int(dup.index[0]) + 2}: duplicate ID {dup.iloc[0]!r}")
    return ids


def list_split(data_dir: str | os.PathLike, split: str) -> tuple[list[str], np.ndarray | None]:
    """IDs (and multi-hot labels for ``train``) of a split of a Kaggle-layout data folder.

    ``train``: ``DATA/train.csv``. ``test``: ``DATA/test.csv``, else
    ``DATA/sample_submission.csv``, else every ``*_red.*`` file in ``DATA/test/``.
    Labels are ``None`` for the test split.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"data folder {data_dir} does not exist")
    if split == "train":
        return read_labels(data_dir / "train.csv")
    if split != "test":
        raise ValueError(f"unknown split {split!r}; valid: train, test")
    for name in ("test.csv", "sample_submission.csv"):
        if (data_dir / name).is_file():
            return read_ids(data_dir / name), None
    folder = data_dir / "test"
    if not folder.is_dir():
        raise InputError(f"{data_dir}: no test.csv, sample_submission.csv or test/ folder")
    ids = sorted({p.name[: -len(p.name.split("_red")[-1]) - 4] for p in folder.glob("*_red.*")})
    return ids, None


def check_images_exist(folder: str | os.PathLike, ids: list[str]) -> None:
    """Raise :class:`InputError` listing IDs whose channel files are missing (checked up front)."""
    bad = []
    for image_id in ids:
        try:
            channel_paths(folder, image_id)
        except InputError as exc:
            bad.append(str(exc))
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise InputError(f"{len(bad)} of {len(ids)} images lack channel files in {folder}:\n  " + "\n  ".join(bad[:5]) + more)


def usable_images(folder: str | os.PathLike, ids: list[str], on_bad_image: str = "error") -> tuple[list[str], dict[str, str]]:
    """Check channel files up front: ``error`` raises (see :func:`check_images_exist`);
    ``skip`` returns ``(ids that have all four files, {bad id: reason})``."""
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    if on_bad_image == "error":
        check_images_exist(folder, ids)
        return list(ids), {}
    bad = {}
    for image_id in ids:
        try:
            channel_paths(folder, image_id)
        except InputError as exc:
            bad[image_id] = str(exc)
    return [i for i in ids if i not in bad], bad


def link_layout(out: str | os.PathLike, fields: Sequence[tuple[str | os.PathLike, str, str]], copies: int = 1,
                splits: Sequence[str] = ("train", "test")) -> list[str]:
    """A Kaggle-layout folder of symbolic links to fields that lie elsewhere (nothing is copied).

    ``fields``: ``(folder, ID, label string)`` per field, whose channel files are
    ``folder/{ID}_{red,green,blue,yellow}.*``. Each field is linked into ``out/{split}/`` for every
    split of ``splits`` under ``copies`` IDs (its own ID when ``copies`` is 1, else ``{ID}-{k}``);
    ``out/train.csv`` gets the IDs and labels, ``out/test.csv`` the IDs. Returns the IDs in order.
    A missing channel file raises :class:`InputError` naming it.
    """
    from hpa.constants import CHANNELS

    out = Path(out)
    rows = []
    for folder, image_id, label in fields:
        sources = {}
        for ch in CHANNELS:
            found = sorted(Path(folder).glob(f"{image_id}_{ch}.*"))
            if not found:
                raise InputError(f"{Path(folder) / f'{image_id}_{ch}.*'}: channel file not found")
            sources[ch] = found[0].resolve()
        for k in range(copies):
            new_id = image_id if copies == 1 else f"{image_id}-{k}"
            for split in splits:
                (out / split).mkdir(parents=True, exist_ok=True)
                for ch, src in sources.items():
                    (out / split / f"{new_id}_{ch}{src.suffix}").symlink_to(src)
            rows.append((new_id, label))
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(out / "train.csv", index=False)
    pd.DataFrame({"ID": [r[0] for r in rows]}).to_csv(out / "test.csv", index=False)
    return [r[0] for r in rows]
