"""Shards of a per-image stage: parse ``i/N``, pick every N-th item, name and find shard files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, TypeVar

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
