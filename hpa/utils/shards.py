"""Shards of a per-image stage: parse ``i/N``, pick every N-th item, name, find and join shard files.

A per-image stage run as shard ``(i, N)`` (a job of a cluster's array) handles every N-th image
from the i-th and writes its table beside the whole split's as ``NAME.shard-i-of-N.EXT``
(:func:`shard_path`); the shard that finishes last joins them (:func:`merge_when_complete`,
:func:`merge_shard_tables`) into the table one process would have written.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

T = TypeVar("T")


def parse_shard(spec: str | None) -> tuple[int, int]:
    """Parse ``"i/N"`` (0-based shard i of N) into ``(i, N)``; ``None`` means ``(0, 1)``."""
    if spec is None or spec == "":
        return 0, 1
    try:
        i_str, n_str = spec.split("/")
        i, n = int(i_str), int(n_str)
    except ValueError:
        raise ValueError(f"--shard must look like i/N (for example 0/4), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {spec!r}: need N >= 1 and 0 <= i < N")
    return i, n


def select_shard(items: Sequence[T], shard: tuple[int, int]) -> list[T]:
    """Items of shard ``(i, N)``: every N-th item starting at i (stable, balanced)."""
    i, n = shard
    return list(items[i::n])


def shard_path(path: str | os.PathLike, shard: tuple[int, int]) -> Path:
    """The file of shard ``(i, N)`` beside a whole-split file: ``cells/train.parquet`` ->
    ``cells/train.shard-i-of-N.parquet``; ``path`` itself when N == 1."""
    path = Path(path)
    i, n = shard
    return path if n == 1 else path.with_name(f"{path.stem}.shard-{i}-of-{n}{path.suffix}")


def shard_sets(path: str | os.PathLike) -> dict[int, list[int]]:
    """Shard files present beside ``path``: ``{N: sorted shard indices i found}``."""
    path = Path(path)
    found: dict[int, list[int]] = {}
    for p in path.parent.glob(f"{path.stem}.shard-*-of-*{path.suffix}"):
        middle = p.name[len(path.stem) + len(".shard-"): len(p.name) - len(path.suffix)]
        i_str, _, n_str = middle.partition("-of-")
        if i_str.isdigit() and n_str.isdigit() and int(i_str) < int(n_str):
            found.setdefault(int(n_str), []).append(int(i_str))
    return {n: sorted(v) for n, v in sorted(found.items())}


def missing_shards(path: str | os.PathLike, n: int) -> list[str]:
    """File names of the shard files ``(i, N)`` of ``path`` that do not exist."""
    return [shard_path(path, (i, n)).name for i in range(n) if not shard_path(path, (i, n)).is_file()]


def merge_shard_tables(path: str | os.PathLike, n: int, ids: Sequence[str], read: Callable[[Path], pd.DataFrame],
                       write: Callable[[Path, pd.DataFrame], object], what: str = "table") -> pd.DataFrame:
    """Join the N shard tables beside ``path`` into ``path``, rows in the order of ``ids`` (column ``ID``).

    ``read`` / ``write`` load and store one table (CSV or parquet; ``write`` atomic). The joined
    table is the one a single process would have written. Raises FileNotFoundError listing the
    missing shard files, ValueError naming an image that is not in ``ids`` (stale shards).
    """
    path = Path(path)
    missing = missing_shards(path, n)
    if missing:
        raise FileNotFoundError(f"cannot merge the {what} {path}: shard file(s) missing in {path.parent}: {missing} "
                                "(run those shards first)")
    parts = [read(shard_path(path, (i, n))) for i in range(n)]
    full = [t for t in parts if len(t)] or parts[:1]  # an empty shard's columns carry no dtypes
    table = pd.concat(full, ignore_index=True)
    order = {image_id: k for k, image_id in enumerate(ids)}
    key = table["ID"].map(order)
    if key.isna().any():
        raise ValueError(f"{path.parent}: shard files of the {what} hold image(s) not among the split's IDs, e.g. "
                         f"{table['ID'][key.isna()].iloc[0]!r} (stale shards? rebuild them with --force)")
    table = table.iloc[np.argsort(key.to_numpy(), kind="stable")].reset_index(drop=True)
    write(path, table)
    log.info("merged %d shard files into %s (%d rows)", n, path, len(table))
    return table


def merge_when_complete(path: str | os.PathLike, shard: tuple[int, int], merge: Callable[[int], object]) -> bool:
    """After shard ``(i, N)`` wrote its file beside ``path``: call ``merge(N)`` if every shard's file
    exists (the last shard to finish joins them). Returns whether it merged."""
    n = shard[1]
    if n > 1 and not missing_shards(path, n):
        merge(n)
        return True
    return False
