"""Atomic file writes, shard selection and small filesystem helpers.

Every output of every stage goes through :func:`atomic_path` (or one of the
``write_*`` helpers built on it): the data are written to a temporary name in the
destination folder and renamed into place only when complete, so an interrupted
stage never leaves a half file that a later stage would trust.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary file keeps the destination's suffix so that libraries which pick a
    format from the extension (PIL, pandas, numpy) still work. On any exception the
    temporary file is removed and the destination is left untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(f"cannot create output folder {path.parent}", exc) from exc
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as exc:  # read-only folder, no space for even an empty file
        raise write_error(f"could not write {path}", exc) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise write_error(f"could not write {path}", exc) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_error(what: str, exc: OSError) -> OSError:
    """``OSError("{what}: {reason}")`` keeping ``exc``'s errno (``ENOSPC``, ``EACCES``, ...)."""
    err = OSError(f"{what}: {exc.strerror or exc}")
    err.errno = exc.errno
    return err


def new_memmap(path: str | os.PathLike, shape: tuple[int, ...], dtype=None):
    """Create a ``.npy`` file of ``shape`` (uint8 by default) opened as a writable memmap, its
    disk space reserved up front.

    Writing into a memmap whose file has holes kills the process with SIGBUS when the disk
    fills up; reserving the space turns that into an ``OSError`` naming ``path`` and the size
    before any work. File systems that cannot reserve space are used as they are.
    """
    import numpy as np

    path = Path(path)
    dtype = np.dtype(np.uint8 if dtype is None else dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise write_error(f"could not create {path}", exc) from exc
    size = path.stat().st_size  # header + data
    if hasattr(os, "posix_fallocate") and arr.nbytes:
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                del arr
                path.unlink(missing_ok=True)
                raise write_error(f"could not reserve {size / 2**20:.1f} MiB for {path}", exc) from exc
    return arr


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_csv(path: str | os.PathLike, df) -> Path:
    """Write a pandas DataFrame as CSV (no index) atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def write_parquet(path: str | os.PathLike, df) -> Path:
    """Write a pandas DataFrame as Parquet (no index) atomically."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


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
